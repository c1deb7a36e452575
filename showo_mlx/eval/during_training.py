"""`showo train` with `eval_every: N` and `eval_data: DATA`: every N steps (rank 0) the model being
trained answers the first `eval_limit` questions of a POPE/MME/GQA set through a Pipeline built
around it (no second copy of the weights), and one line

    {"step": N, "eval": {"benchmark": "pope", "questions": 200, "accuracy": ..., "f1": ...}}

is appended to RUN/log.jsonl. Answers are capped at `MAX_TOKENS` (a short answer needs a few; an
early model that never stops would otherwise cost 128 tokens per question). A failure (missing data, pyarrow not installed) turns the evaluation
off with one warning instead of stopping a long run, like the validation images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .benchmarks import DEFAULT_SUFFIX, load_benchmark
from .vqa import Answerer

MAX_TOKENS = 16


class TrainingEvaluator:
    def __init__(self, model_folder: Path, model, data: str, *, limit: int, log: Callable[[str], None]):
        self.folder, self.model, self.data, self.limit, self.log = Path(model_folder), model, data, limit, log
        self.enabled = True
        self.pipe = self.bench = self.items = None

    def __call__(self, step: int, log_path: Path) -> dict | None:
        if not self.enabled:
            return None
        try:
            summary = self._evaluate()
        except Exception as e:  # evaluation must never kill training
            self.enabled = False
            self.log(f"warning: evaluation during training disabled ({type(e).__name__}: {' '.join(str(e).split())[:160]})")
            return None
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "eval": summary}) + "\n")
        self.log(f"step {step}: {summary['benchmark']} " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()
                                                                    if isinstance(v, float)))
        return summary

    def _evaluate(self) -> dict:
        from ..pipeline import Pipeline

        if self.pipe is None:
            self.bench, self.items = load_benchmark(self.data, limit=self.limit)
            self.pipe = Pipeline(self.folder, model=self.model)
            self.answer = Answerer(self.pipe)  # MAGVIT is not trained: the codes stay valid across steps
        was_training = self.model.training
        self.model.eval()
        try:
            records = []
            for item in self.items:
                text = self.answer(item, self.bench.prompt(item.question, DEFAULT_SUFFIX), min(MAX_TOKENS, self.bench.max_tokens))
                records.append({"id": item.id, "category": item.category, "group": item.group, "answer": text, "target": item.target})
        finally:
            if was_training:
                self.model.train()
        metrics = self.bench.score(records)
        return {"benchmark": self.bench.name, "questions": len(records), **self.bench.headline(metrics)}
