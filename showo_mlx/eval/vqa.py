"""Answer a VQA benchmark with a Pipeline, resumably, and score it.

    OUT/run.json        what is being evaluated (benchmark, data, model, prompt suffix, max tokens, ...)
    OUT/answers.jsonl   one record per answered question, appended as it is answered (answers.py)
    OUT/results.json    the metrics (written atomically at the end of every run)

Every answer comes from `Pipeline.ask` (greedy, KV-cached, the model's own MMU prompt); this module
only chooses the questions, writes the answers down and counts. A rerun with the same settings
skips the questions already answered; different settings in an existing OUT are refused unless
`force` (which starts over).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from . import EvalError
from .answers import AnswerLog
from .benchmarks import Benchmark, VQAItem, select

RUN_KEYS = ("benchmark", "data", "model", "prompt_suffix", "max_tokens", "dtype", "quantize")


class Answerer:
    """`Pipeline.ask` for benchmark questions, encoding each picture once: GQA asks ~30 questions
    per image, POPE 18, MME 2, and the MAGVIT codes do not depend on the question."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.codes: dict[str, object] = {}

    def __call__(self, item: VQAItem, prompt: str, max_tokens: int) -> str:
        codes = self.codes.get(item.image_key)
        if codes is None:
            codes = self.codes[item.image_key] = self.pipe.encode_image(item.image())
        return self.pipe.ask(None, prompt, codes=codes, max_tokens=max_tokens)


def check_run(out: Path, run: dict, force: bool) -> None:
    """Write OUT/run.json, or check that an existing one describes the same evaluation."""
    from ..fsutil import atomic_write_bytes

    path = out / "run.json"
    if path.exists() and not force:
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise EvalError(f"{path} is unreadable; pass --force to start this evaluation over") from None
        changed = [k for k in RUN_KEYS if old.get(k) != run.get(k)]
        if changed:
            raise EvalError(f"{out} holds answers for another evaluation ({', '.join(f'{k}: {old.get(k)!r}' for k in changed)}); "
                            "choose another --output or pass --force to start over")
        return
    if force:
        for name in ("answers.jsonl", "results.json"):
            (out / name).unlink(missing_ok=True)
    atomic_write_bytes(path, (json.dumps(run, indent=2) + "\n").encode())


def run_vqa(
    pipe,
    bench: Benchmark,
    items: list[VQAItem],
    out: str | Path,
    *,
    run: dict,
    suffix: str,
    max_tokens: int,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Answer every item not yet in OUT/answers.jsonl, then score all of `items`; returns the metrics."""
    from ..fsutil import atomic_write_bytes

    if max_tokens < 2:  # decoding.generate_tokens cannot stop after a single token today
        raise EvalError(f"--max-tokens must be at least 2, got {max_tokens}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_run(out, run, force)
    answers = AnswerLog(out / "answers.jsonl", log=log)
    done = answers.load()
    todo = [item for item in items if item.id not in done]
    previous = select(done.values(), items)
    correct = sum(bool(r.get("correct")) for r in previous)
    if previous:
        log(f"resuming: {len(previous)} of {len(items)} answers already in {answers.path}")
    bar = _bar(progress, len(items), len(previous), bench.name)
    answer = Answerer(pipe)
    try:
        for n, item in enumerate(todo, len(previous) + 1):
            prompt = bench.prompt(item.question, suffix)
            text = answer(item, prompt, max_tokens)
            ok = bench.is_correct(text, item.target)
            answers.append({"id": item.id, "category": item.category, "group": item.group, "question": prompt,
                            "answer": text, "prediction": bench.parse(text), "target": item.target, "correct": ok})
            correct += ok
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"accuracy {100.0 * correct / n:.1f}%")
    finally:
        answers.close()
        if bar is not None:
            bar.close()
    records = select(AnswerLog(answers.path).load().values(), items)
    metrics = bench.score(records)
    result = {**{k: run.get(k) for k in RUN_KEYS}, "questions": len(items), "answered": len(records), "metrics": metrics}
    atomic_write_bytes(out / "results.json", (json.dumps(result, indent=2) + "\n").encode())
    return metrics


def _bar(enabled: bool, total: int, initial: int, name: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="q", file=sys.stderr, dynamic_ncols=True)


# -- the final table -------------------------------------------------------------------------------
def format_table(metrics: dict) -> str:
    name = metrics["benchmark"]
    if name == "pope":
        rows = [f"{'split':<12} {'n':>6} {'acc':>7} {'prec':>7} {'recall':>7} {'F1':>7} {'yes%':>7}"]
        for split, m in [*metrics["splits"].items(), ("all", metrics["all"])]:
            rows.append(f"{split:<12} {m['n']:>6} {m['accuracy']:>7.2f} {m['precision']:>7.2f} {m['recall']:>7.2f} "
                        f"{m['f1']:>7.2f} {m['yes_ratio']:>7.2f}")
        rows.append(f"F1 averaged over the splits: {metrics['f1_mean']:.2f}")
        return "\n".join(rows)
    if name == "mme":
        rows = [f"{'category':<22} {'questions':>9} {'images':>7} {'acc':>7} {'acc+':>7} {'score':>7}"]
        for cat, m in metrics["categories"].items():
            rows.append(f"{cat:<22} {m['questions']:>9} {m['images']:>7} {m['accuracy']:>7.2f} {m['accuracy_plus']:>7.2f} {m['score']:>7.2f}")
        rows.append(f"Perception {metrics['perception']:.2f} (max 2000; the paper's MME)   "
                    f"Cognition {metrics['cognition']:.2f} (max 800)   question accuracy {metrics['accuracy']:.2f}%")
        return "\n".join(rows)
    return f"GQA accuracy {metrics['accuracy']:.2f}% over {metrics['n']} questions"
