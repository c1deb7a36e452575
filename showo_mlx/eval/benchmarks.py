"""POPE, MME and GQA: reading each published format, building the prompt, judging an answer, scoring.

Prompts and answer handling follow lmms-eval's task definitions (EvolvingLMMs-Lab/lmms-eval,
`lmms_eval/tasks/{pope,mme,gqa}/`): the question plus the post prompt
"\\nAnswer the question using a single word or phrase."; for MME the question's own
" Please answer yes or no." is replaced by it (`mme/utils.py`, `mme_doc_to_text`). Where lmms-eval
departs from a benchmark's own definition the benchmark's definition is used and the difference
is noted (POPE below).

* POPE (object hallucination; lmms-lab/POPE, splits adversarial / popular / random as `category`):
  an answer is "no" if its first sentence contains the word "no", "No" or "not", else "yes" — the
  rule of the POPE authors' evaluation as used for LLaVA-1.5's numbers (haotian-liu/LLaVA,
  `llava/eval/eval_pope.py`). Accuracy, precision, recall and F1 with "yes" as the positive class,
  and yes-ratio = share of "yes" predictions, per split and over all questions; `f1_mean` is the F1
  averaged over the splits (LLaVA-1.5's convention). lmms-eval instead requires the lower-cased
  answer to equal "yes"/"no" exactly and its yes-ratio counts ground-truth yeses; for a model that
  answers "Yes"/"No" the accuracy, precision, recall and F1 agree.
* MME (lmms-lab/MME or the official MME_Benchmark_release_version folders): answers parsed as in
  lmms-eval `mme/utils.py` `parse_pred_ans` (lower-case, drop ".", exact yes/no, "y"/"n", else
  "yes"/"no" within the first 4 characters, else "other"). Per category: accuracy (per question)
  and accuracy+ (per image: all of its questions right), score = accuracy + accuracy+ in percent
  (max 200); Perception = sum over the 10 perception categories (max 2000) — the "MME" column of
  the Show-o paper and LLaVA-1.5 — and Cognition over the 4 cognition categories (max 800).
* GQA (testdev-balanced: lmms-lab/GQA parquet, the official questions JSON + images, or JSONL):
  exact match after lower-casing, removing ASCII punctuation and surrounding/duplicate whitespace
  (lmms-eval's `exact_match` with ignore_case and ignore_punctuation; LLaVA's
  `convert_gqa_for_eval.py` lower-cases and strips the final period).

All metrics are reported in percent.
"""

from __future__ import annotations

import json
import string
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

from . import EvalError
from .sources import (
    download_dataset,
    find_image,
    is_hidden,
    lazy_cell,
    lazy_file,
    looks_like_dataset_id,
    parquet_columns,
    parquet_files,
    read_parquet,
)

DEFAULT_SUFFIX = "\nAnswer the question using a single word or phrase."
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_ASKS = " Please answer yes or no."
POPE_SPLITS = ("adversarial", "popular", "random")


@dataclass
class VQAItem:
    id: str  # unique within the benchmark (the resume key)
    question: str
    target: str
    image: Callable[[], Image.Image]  # decoded on demand
    category: str = "all"  # POPE split, MME category
    group: str = ""  # MME: the image its questions share (accuracy+)
    image_key: str = ""  # the same for questions about the same picture: its codes are computed once

    def __post_init__(self):
        self.image_key = self.image_key or self.group or self.id


def unique_ids(items: list[VQAItem]) -> list[VQAItem]:
    """Make ids unique in dataset order (a repeated id gets #2, #3, ...): deterministic, so a rerun
    maps every answer back to the same question."""
    seen: dict[str, int] = {}
    for item in items:
        n = seen.get(item.id, 0) + 1
        seen[item.id] = n
        if n > 1:
            item.id = f"{item.id}#{n}"
    return items


def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


# -- the benchmarks --------------------------------------------------------------------------------
class Benchmark:
    name = ""
    max_tokens = 16  # lmms-eval's max_new_tokens

    def prompt(self, question: str, suffix: str) -> str:
        return question.strip() + suffix

    def parse(self, answer: str) -> str:
        """The model's answer reduced to what is compared with the target."""
        raise NotImplementedError

    def normalise_target(self, target: str) -> str:
        return target.strip().lower()

    def is_correct(self, answer: str, target: str) -> bool:
        return self.parse(answer) == self.normalise_target(target)

    def score(self, records: list[dict]) -> dict:
        raise NotImplementedError

    def headline(self, metrics: dict) -> dict:
        """The few numbers logged during training and shown last."""
        raise NotImplementedError

    def read(self, folder: Path) -> list[VQAItem]:
        raise NotImplementedError


class Pope(Benchmark):
    name = "pope"
    max_tokens = 128

    def parse(self, answer: str) -> str:
        text = answer.strip()
        if "." in text:
            text = text.split(".")[0]
        words = text.replace(",", "").split()
        return "no" if any(w in ("No", "not", "no") for w in words) else "yes"

    def score(self, records: list[dict]) -> dict:
        splits: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            splits[r["category"]].append(r)
        per_split = {name: self._confusion(rs) for name, rs in sorted(splits.items())}
        overall = self._confusion(records)
        f1s = [m["f1"] for m in per_split.values()]
        return {"benchmark": self.name, "n": len(records), "splits": per_split, "all": overall,
                "f1_mean": sum(f1s) / len(f1s) if f1s else 0.0}

    def _confusion(self, records: list[dict]) -> dict:
        tp = fp = tn = fn = 0
        for r in records:
            pred, gold = self.parse(r["answer"]), self.normalise_target(r["target"])
            if pred == "yes":
                tp, fp = tp + (gold == "yes"), fp + (gold != "yes")
            else:
                tn, fn = tn + (gold != "yes"), fn + (gold == "yes")
        n = tp + fp + tn + fn
        precision, recall = _pct(tp, tp + fp), _pct(tp, tp + fn)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"n": n, "accuracy": _pct(tp + tn, n), "precision": precision, "recall": recall, "f1": f1,
                "yes_ratio": _pct(tp + fp, n), "tp": tp, "fp": fp, "tn": tn, "fn": fn}

    def headline(self, metrics: dict) -> dict:
        a = metrics["all"]
        return {"accuracy": a["accuracy"], "f1": a["f1"], "f1_mean": metrics["f1_mean"], "yes_ratio": a["yes_ratio"]}

    def read(self, folder: Path) -> list[VQAItem]:
        files = parquet_files(folder)
        if not files:
            raise EvalError(f"{folder} holds no parquet files; POPE is read from lmms-lab/POPE's data/*.parquet")
        names = parquet_columns(files[0])
        id_col = "question_id" if "question_id" in names else ("id" if "id" in names else None)
        cat_col = "category" if "category" in names else None
        src_col = "image_source" if "image_source" in names else None  # the COCO image a question is about
        table = read_parquet(files, ["question", "answer", "image"] + [c for c in (id_col, cat_col, src_col) if c])
        questions, answers = table.column("question").to_pylist(), table.column("answer").to_pylist()
        ids = table.column(id_col).to_pylist() if id_col else list(range(len(questions)))
        cats = table.column(cat_col).to_pylist() if cat_col else ["all"] * len(questions)
        sources = table.column(src_col).to_pylist() if src_col else [None] * len(questions)
        images = table.column("image")
        items = [VQAItem(f"{c}/{i}", q, a, lazy_cell(images, k, folder), category=str(c), group=f"{c}/{i}",
                         image_key=str(src) if src else f"row {k}")
                 for k, (i, q, a, c, src) in enumerate(zip(ids, questions, answers, cats, sources))]
        return unique_ids(items)


class MME(Benchmark):
    name = "mme"

    def prompt(self, question: str, suffix: str) -> str:
        question = question.strip()
        if suffix:  # lmms-eval: the post prompt replaces MME's own instruction
            question = question.replace(MME_ASKS, "")
        return question + suffix

    def parse(self, answer: str) -> str:
        text = answer.lower().strip().replace(".", "")
        if text in ("yes", "no"):
            return text
        if len(text) == 1:
            return {"y": "yes", "n": "no"}.get(text, "other")
        head = text[:4]
        return "yes" if "yes" in head else ("no" if "no" in head else "other")

    def normalise_target(self, target: str) -> str:
        return target.lower().strip().replace(".", "")

    def score(self, records: list[dict]) -> dict:
        by_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            by_cat[r["category"]][r["group"]].append(self.is_correct(r["answer"], r["target"]))
        categories = {}
        for cat in sorted(by_cat):
            groups = by_cat[cat]
            answers = [ok for g in groups.values() for ok in g]
            acc, acc_plus = _pct(sum(answers), len(answers)), _pct(sum(all(g) for g in groups.values()), len(groups))
            categories[cat] = {"questions": len(answers), "images": len(groups), "accuracy": acc,
                               "accuracy_plus": acc_plus, "score": acc + acc_plus}
        perception = sum(m["score"] for c, m in categories.items() if c in MME_PERCEPTION)
        cognition = sum(m["score"] for c, m in categories.items() if c in MME_COGNITION)
        correct = sum(self.is_correct(r["answer"], r["target"]) for r in records)
        return {"benchmark": self.name, "n": len(records), "categories": categories, "perception": perception,
                "cognition": cognition, "total": perception + cognition, "accuracy": _pct(correct, len(records))}

    def headline(self, metrics: dict) -> dict:
        return {"perception": metrics["perception"], "cognition": metrics["cognition"], "accuracy": metrics["accuracy"]}

    def read(self, folder: Path) -> list[VQAItem]:
        if parquet_files(folder):
            return self._read_parquet(folder)
        return self._read_release_folders(folder)

    def _read_parquet(self, folder: Path) -> list[VQAItem]:
        table = read_parquet(parquet_files(folder), ["question_id", "question", "answer", "image", "category"])
        cols = [table.column(c).to_pylist() for c in ("question_id", "question", "answer", "category")]
        images = table.column("image")
        items = [VQAItem(str(qid), q, a, lazy_cell(images, k, folder), category=str(c), group=str(qid))
                 for k, (qid, q, a, c) in enumerate(zip(*cols))]
        return unique_ids(items)

    def _read_release_folders(self, folder: Path) -> list[VQAItem]:
        """MME_Benchmark_release_version: one folder per category holding either `images/` +
        `questions_answers_YN/` or the images and their .txt files side by side; each .txt names its
        image by stem and has one "question<TAB>answer" line per question."""
        items: list[VQAItem] = []
        for cat_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p)):
            if (cat_dir / "questions_answers_YN").is_dir():
                qa_dir, image_dir = cat_dir / "questions_answers_YN", cat_dir / "images"
            else:
                qa_dir = image_dir = cat_dir
            for txt in sorted(qa_dir.glob("*.txt")):
                image = find_image(image_dir, txt.stem)
                if image is None:
                    raise EvalError(f"{txt} has no image {txt.stem}.jpg/.png in {image_dir}; is the MME folder complete?")
                group = f"{cat_dir.name}/{image.name}"
                for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                    if not line.strip():
                        continue
                    if "\t" not in line:
                        raise EvalError(f"{txt} line {n} is not 'question<TAB>answer'")
                    question, answer = line.rstrip("\n").split("\t")[:2]
                    items.append(VQAItem(group, question, answer.strip(), lazy_file(image), category=cat_dir.name, group=group))
        if not items:
            raise EvalError(f"{folder} holds no MME data (no parquet files, no category folders with .txt questions)")
        return unique_ids(items)


class GQA(Benchmark):
    name = "gqa"

    def parse(self, answer: str) -> str:
        return normalise_short_answer(answer)

    def normalise_target(self, target: str) -> str:
        return normalise_short_answer(target)

    def score(self, records: list[dict]) -> dict:
        correct = sum(self.is_correct(r["answer"], r["target"]) for r in records)
        return {"benchmark": self.name, "n": len(records), "accuracy": _pct(correct, len(records))}

    def headline(self, metrics: dict) -> dict:
        return {"accuracy": metrics["accuracy"]}

    def read(self, folder: Path) -> list[VQAItem]:
        if folder.is_file():
            return self._read_questions_file(folder, folder.parent)
        if parquet_files(folder):
            return self._read_parquet(folder)
        files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".jsonl") and not is_hidden(p))
        if not files:
            raise EvalError(f"{folder} holds no GQA data (parquet, a questions .json or a .jsonl)")
        return self._read_questions_file(files[0], folder)

    def _read_parquet(self, folder: Path) -> list[VQAItem]:
        """lmms-lab/GQA: testdev_balanced_instructions (id, imageId, question, answer) joined with
        testdev_balanced_images (id, image), as lmms-eval's `gqa/utils.py` does."""
        q_files = [p for p in parquet_files(folder) if "instructions" in str(p.relative_to(folder))]
        i_files = [p for p in parquet_files(folder) if "images" in str(p.relative_to(folder))]
        if not q_files or not i_files:
            raise EvalError(f"{folder} needs testdev_balanced_instructions/ and testdev_balanced_images/ parquet files (lmms-lab/GQA)")
        questions = read_parquet(q_files, ["id", "imageId", "question", "answer"])
        images = read_parquet(i_files, ["id", "image"])
        row_of = {str(i): k for k, i in enumerate(images.column("id").to_pylist())}
        cells = images.column("image")
        items = []
        for qid, image_id, q, a in zip(*(questions.column(c).to_pylist() for c in ("id", "imageId", "question", "answer"))):
            if str(image_id) not in row_of:
                raise EvalError(f"GQA question {qid} refers to image {image_id}, which is not in the images parquet")
            items.append(VQAItem(str(qid), q, a, lazy_cell(cells, row_of[str(image_id)], folder), group=str(image_id)))
        return unique_ids(items)

    def _read_questions_file(self, path: Path, folder: Path) -> list[VQAItem]:
        """The official `testdev_balanced_questions.json` ({question id: {imageId, question,
        answer, ...}}) or JSONL lines ({"question_id"/"id", "image"/"imageId", "question"/"text",
        "answer"}); images in `images/` next to it (or beside it)."""
        image_dir = folder / "images" if (folder / "images").is_dir() else folder
        try:
            if path.suffix == ".jsonl":
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            else:
                data = json.loads(path.read_text(encoding="utf-8"))
                rows = [{"question_id": k, **v} for k, v in data.items()] if isinstance(data, dict) else data
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvalError(f"{path} is not valid JSON ({e})") from None
        items = []
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise EvalError(f"{path} entry {n} is not an object")
            qid = row.get("question_id", row.get("id", n))
            question, answer = row.get("question", row.get("text")), row.get("answer")
            image = row.get("imageId", row.get("image"))
            if question is None or answer is None or image is None:
                raise EvalError(f"{path} entry {n} needs question, answer and imageId/image")
            image = str(image)
            file = image_dir / image if Path(image).suffix else find_image(image_dir, image)
            if file is None:
                raise EvalError(f"image {image} of GQA question {qid} not found in {image_dir}")
            items.append(VQAItem(str(qid), str(question), str(answer), lazy_file(file), group=image))
        return unique_ids(items)


def normalise_short_answer(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (Pope(), MME(), GQA())}


# -- finding the data --------------------------------------------------------------------------------
def detect(path: Path) -> str:
    """Which benchmark a local folder or file holds, from its contents."""
    if path.is_file():
        if path.suffix in (".json", ".jsonl"):
            return "gqa"
        raise EvalError(f"{path} is a file; pass the benchmark's folder (or a GQA .json/.jsonl)")
    files = parquet_files(path)
    if files:
        names = set(parquet_columns(files[0]))
        if "imageId" in names or any("instructions" in str(p) for p in files):
            return "gqa"
        if "image_source" in names:
            return "pope"
        if {"question_id", "category"} <= names:
            cats = set(read_parquet(files[:1], ["category"]).column("category").to_pylist())
            if cats and cats <= set(POPE_SPLITS):
                return "pope"
            if cats & set(MME_PERCEPTION + MME_COGNITION):
                return "mme"
    else:
        subdirs = {p.name for p in path.iterdir() if p.is_dir()}
        if subdirs & set(MME_PERCEPTION + MME_COGNITION):
            return "mme"
        if any(p.suffix in (".json", ".jsonl") for p in path.iterdir()):
            return "gqa"
    raise EvalError(f"cannot tell which benchmark {path} holds; pass --benchmark pope, mme or gqa")


def benchmark_from_name(text: str) -> str | None:
    low = text.lower()
    hits = [name for name in BENCHMARKS if name in low]
    return hits[0] if len(hits) == 1 else None


def load_benchmark(data: str, benchmark: str | None = None, limit: int | None = None) -> tuple[Benchmark, list[VQAItem]]:
    """(benchmark, items) for a local folder/file or a Hub dataset id; `limit` keeps the first N."""
    if benchmark is not None and benchmark not in BENCHMARKS:
        raise EvalError(f"unknown benchmark {benchmark!r}; choose one of {sorted(BENCHMARKS)}")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    path = Path(data).expanduser()
    if path.exists():
        name = benchmark or detect(path)
    elif looks_like_dataset_id(data):
        name = benchmark or benchmark_from_name(data)
        if name is None:
            raise EvalError(f"cannot tell which benchmark the dataset {data} is; pass --benchmark pope, mme or gqa")
        path = download_dataset(data, name)
    else:
        raise EvalError(f"{data} does not exist and is not a Hub dataset id (owner/name); check the path")
    bench = BENCHMARKS[name]
    items = bench.read(path)
    if not items:
        raise EvalError(f"{data} holds no {name} questions")
    return bench, items[:limit] if limit else items


def select(records: Iterable[dict], items: list[VQAItem]) -> list[dict]:
    """The answer records of `items`, in item order (answers of other items are ignored)."""
    by_id = {r["id"]: r for r in records}
    return [by_id[i.id] for i in items if i.id in by_id]
