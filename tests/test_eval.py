"""`showo eval`: benchmark readers for every published layout, the metrics against hand-computed
values, resumable answering through Pipeline.ask on the fixture model, GenEval's folder layout, and
the evaluation hook of `showo train`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REF
from PIL import Image
from typer.testing import CliRunner

from showo_mlx.eval import EvalError
from showo_mlx.eval.benchmarks import BENCHMARKS, DEFAULT_SUFFIX, detect, load_benchmark

IMAGES = [REF / "images" / "magvit_in_0.png", REF / "images" / "magvit_in_1.png"]
TOKENS = 3  # answers of the random-weight fixture model are noise: a few tokens show the wiring


# -- tiny datasets in each published layout ----------------------------------------------------------
def _image_cell(path: Path) -> dict:
    return {"bytes": path.read_bytes(), "path": path.name}  # HF datasets' Image feature in parquet


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def make_pope(folder: Path) -> Path:
    """lmms-lab/POPE: data/test-*.parquet, question_id restarting per split (category)."""
    rows = [
        {"id": str(k), "question_id": qid, "question": q, "answer": a, "image_source": f"COCO_{img}",
         "image": _image_cell(IMAGES[img]), "category": cat}
        for k, (qid, q, a, img, cat) in enumerate([
            ("1", "Is there a cat in the image?", "yes", 0, "adversarial"),
            ("2", "Is there a dog in the image?", "no", 0, "adversarial"),
            ("1", "Is there a bird in the image?", "yes", 1, "random"),
            ("2", "Is there a car in the image?", "no", 1, "random"),
        ])
    ]
    _write_parquet(folder / "data" / "test-00000-of-00002.parquet", rows[:2])
    _write_parquet(folder / "data" / "test-00001-of-00002.parquet", rows[2:])
    return folder


def make_mme(folder: Path) -> Path:
    """MME_Benchmark_release_version: `images/` + `questions_answers_YN/` (artwork) or side by side (existence)."""
    (folder / "existence").mkdir(parents=True)
    shutil.copy(IMAGES[0], folder / "existence" / "000000006040.png")
    (folder / "existence" / "000000006040.txt").write_text(
        "Is there a cat in this image? Please answer yes or no.\tYes\nIs there a train in this image? Please answer yes or no.\tNo\n")
    (folder / "artwork" / "images").mkdir(parents=True)
    (folder / "artwork" / "questions_answers_YN").mkdir()
    shutil.copy(IMAGES[1], folder / "artwork" / "images" / "10002.png")
    (folder / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by da Vinci? Please answer yes or no.\tNo\nIs this artwork a painting? Please answer yes or no.\tYes\n")
    return folder


def make_gqa_json(folder: Path) -> Path:
    """The official testdev_balanced_questions.json ({question id: {...}}) + images/<imageId>.png."""
    (folder / "images").mkdir(parents=True)
    for i, path in enumerate(IMAGES):
        shutil.copy(path, folder / "images" / f"n16131{i}.png")
    questions = {"201307251": {"imageId": "n161310", "question": "What color is the cat?", "answer": "red", "fullAnswer": "The cat is red."},
                 "201640614": {"imageId": "n161311", "question": "Is it overcast?", "answer": "no", "fullAnswer": "No, it is clear."}}
    (folder / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    return folder


# -- readers ------------------------------------------------------------------------------------------
def test_readers_of_every_layout(tmp_path):
    pope, items = load_benchmark(str(make_pope(tmp_path / "pope")))
    assert pope.name == "pope" and [i.id for i in items] == ["adversarial/1", "adversarial/2", "random/1", "random/2"]
    assert items[3].target == "no" and items[3].category == "random" and items[3].image().size == (128, 128)
    assert np.array_equal(np.asarray(items[0].image()), np.asarray(Image.open(IMAGES[0]).convert("RGB")))

    mme, items = load_benchmark(str(make_mme(tmp_path / "mme")))
    assert mme.name == "mme" and [i.category for i in items] == ["artwork", "artwork", "existence", "existence"]
    assert items[0].group == items[1].group == "artwork/10002.png" and items[1].id == "artwork/10002.png#2"
    assert items[2].target == "Yes" and items[2].question.endswith("Please answer yes or no.")
    _write_parquet(tmp_path / "mme_hub" / "data" / "test-00000-of-00001.parquet", [
        {"question_id": "code_reasoning/0020.png", "question": q, "answer": a, "image": _image_cell(IMAGES[0]), "category": "code_reasoning"}
        for q, a in (("Is the output 5? Please answer yes or no.", "Yes"), ("Is the output 6? Please answer yes or no.", "No"))])
    assert detect(tmp_path / "mme_hub") == "mme"
    items = BENCHMARKS["mme"].read(tmp_path / "mme_hub")
    assert [i.id for i in items] == ["code_reasoning/0020.png", "code_reasoning/0020.png#2"] and items[1].target == "No"

    gqa, items = load_benchmark(str(make_gqa_json(tmp_path / "gqa")))
    assert gqa.name == "gqa" and [(i.id, i.target, i.group) for i in items] == [("201307251", "red", "n161310"), ("201640614", "no", "n161311")]
    (tmp_path / "gqa" / "testdev_balanced_questions.json").unlink()
    (tmp_path / "gqa" / "questions.jsonl").write_text(json.dumps({"question_id": 7, "image": "n161311.png", "text": "Is it sunny?", "answer": "yes"}) + "\n")
    _, items = load_benchmark(str(tmp_path / "gqa"))
    assert (items[0].id, items[0].question, items[0].image().size) == ("7", "Is it sunny?", (128, 128))
    hub = tmp_path / "gqa_hub"  # lmms-lab/GQA: questions and images in two parquet configs, joined on imageId
    _write_parquet(hub / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet",
                   [{"id": "05515938", "imageId": "n161311", "question": "Which side is the bird on?", "answer": "left", "fullAnswer": "On the left."}])
    _write_parquet(hub / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
                   [{"id": f"n16131{i}", "image": _image_cell(p)} for i, p in enumerate(IMAGES)])
    _, items = load_benchmark(str(hub), limit=1)
    assert (items[0].id, items[0].target) == ("05515938", "left")
    assert np.array_equal(np.asarray(items[0].image()), np.asarray(Image.open(IMAGES[1]).convert("RGB")))

    with pytest.raises(EvalError, match="unknown benchmark 'vqav2'"):
        load_benchmark(str(tmp_path / "pope"), benchmark="vqav2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="cannot tell which benchmark"):
        load_benchmark(str(tmp_path / "empty"))


def test_hub_datasets_are_fetched_as_datasets_with_only_the_needed_files(tmp_path, monkeypatch):
    import huggingface_hub

    local = make_pope(tmp_path / "pope")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):  # the network is the only thing replaced
        calls.append((repo_id, kwargs))
        if repo_id == "lmms-lab/GQA":
            raise OSError("401 Client Error: gated dataset")
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    bench, items = load_benchmark("lmms-lab/POPE", limit=3)
    assert bench.name == "pope" and len(items) == 3
    assert calls == [("lmms-lab/POPE", {"repo_type": "dataset", "allow_patterns": ["data/*.parquet"]})]
    with pytest.raises(EvalError, match="could not fetch the dataset lmms-lab/GQA.*401"):
        load_benchmark("lmms-lab/GQA")
    assert calls[-1][1]["allow_patterns"] == ["testdev_balanced_instructions/*.parquet", "testdev_balanced_images/*.parquet"]
    with pytest.raises(EvalError, match="--benchmark"):
        load_benchmark("someone/my-vqa-set")


def test_prompts_follow_lmms_eval():
    q = "Is there a cat in this image? Please answer yes or no."
    assert BENCHMARKS["mme"].prompt(q, DEFAULT_SUFFIX) == "Is there a cat in this image?\nAnswer the question using a single word or phrase."
    assert BENCHMARKS["mme"].prompt(q, "") == q  # no post prompt: MME's own instruction stays
    assert BENCHMARKS["pope"].prompt(" Is there a dog in the image? ", DEFAULT_SUFFIX) == \
        "Is there a dog in the image?\nAnswer the question using a single word or phrase."


# -- metrics against hand-computed values ------------------------------------------------------------
def _records(rows):
    return [{"id": str(i), "answer": a, "target": t, "category": c, "group": g} for i, (a, t, c, g) in enumerate(rows)]


def test_pope_metrics_by_hand():
    pope = BENCHMARKS["pope"]
    assert [pope.parse(a) for a in ("Yes", "No, there is not.", "There is no dog.", "yes, a cat. No dog.", "Not sure")] == \
        ["yes", "no", "no", "yes", "yes"]  # first sentence only; "Not" is not one of the words No/no/not
    records = _records([
        ("Yes", "yes", "adversarial", ""), ("No, there is not.", "yes", "adversarial", ""),   # TP, FN
        ("yes", "no", "adversarial", ""), ("There is no dog.", "no", "adversarial", ""),      # FP, TN
        ("Yes", "yes", "random", ""), ("Yes.", "no", "random", ""), ("yes", "yes", "random", ""),  # TP, FP, TP
    ])
    m = pope.score(records)
    adv, rnd, every = m["splits"]["adversarial"], m["splits"]["random"], m["all"]
    assert (adv["tp"], adv["fp"], adv["tn"], adv["fn"]) == (1, 1, 1, 1)
    assert [adv[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == [50.0, 50.0, 50.0, 50.0, 50.0]
    assert rnd["accuracy"] == pytest.approx(200 / 3) and rnd["precision"] == pytest.approx(200 / 3)
    assert rnd["recall"] == 100.0 and rnd["f1"] == pytest.approx(80.0) and rnd["yes_ratio"] == 100.0
    # all 7: TP 3, FP 2, TN 1, FN 1 → acc 4/7, precision 3/5, recall 3/4, F1 2·.6·.75/1.35, yes 5/7
    assert every["accuracy"] == pytest.approx(400 / 7) and every["precision"] == pytest.approx(60.0)
    assert every["recall"] == pytest.approx(75.0) and every["f1"] == pytest.approx(200 / 3) and every["yes_ratio"] == pytest.approx(500 / 7)
    assert m["f1_mean"] == pytest.approx(65.0) and m["n"] == 7


def test_mme_metrics_by_hand():
    mme = BENCHMARKS["mme"]
    assert [mme.parse(a) for a in ("Yes.", "no", "Y", "n", "Nope", "I think yes", "yes, it is")] == \
        ["yes", "no", "yes", "no", "no", "other", "yes"]
    records = _records([
        ("Yes", "Yes", "existence", "a"), ("No", "No", "existence", "a"),          # image a: both right
        ("Yes", "Yes", "existence", "b"), ("Yes", "No", "existence", "b"),         # image b: one right
        ("maybe", "Yes", "code_reasoning", "c"), ("maybe", "No", "code_reasoning", "c"),  # "other": both wrong
        ("No.", "No", "OCR", "d"), ("yes", "Yes", "OCR", "d"),                     # image d: both right
    ])
    m = mme.score(records)
    ex, code, ocr = m["categories"]["existence"], m["categories"]["code_reasoning"], m["categories"]["OCR"]
    assert (ex["questions"], ex["images"], ex["accuracy"], ex["accuracy_plus"], ex["score"]) == (4, 2, 75.0, 50.0, 125.0)
    assert (code["accuracy"], code["accuracy_plus"], code["score"]) == (0.0, 0.0, 0.0)
    assert ocr["score"] == 200.0
    assert (m["perception"], m["cognition"], m["total"]) == (325.0, 0.0, 325.0)  # existence + OCR are perception
    assert m["accuracy"] == pytest.approx(100 * 5 / 8)


def test_gqa_exact_match_after_normalisation():
    gqa = BENCHMARKS["gqa"]
    pairs = [("Left.", "left", True), ("The Car", "the car", True), (" red ", "red", True), ("t-shirt", "tshirt", True),
             ("a dog", "dog", False), ("blue", "red", False)]
    assert [gqa.is_correct(a, t) for a, t, _ in pairs] == [ok for _, _, ok in pairs]
    m = gqa.score(_records([(a, t, "all", "") for a, t, _ in pairs]))
    assert m["accuracy"] == pytest.approx(400 / 6)


# -- the answer log -----------------------------------------------------------------------------------
def test_answer_log_tolerates_a_torn_last_line(tmp_path):
    from showo_mlx.eval.answers import AnswerLog

    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": "a", "answer": "yes"}\n{"id": "b", "answer": "no"}\n{"id": "c", "ans')
    notes = []
    log = AnswerLog(path, log=notes.append)
    assert sorted(log.load()) == ["a", "b"] and notes  # the torn record is dropped and reported
    log.append({"id": "c", "answer": "yes"})
    log.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
    path.write_text(path.read_text() + '{"id": "d", "answer": "no"}')  # complete record, newline lost
    assert sorted(AnswerLog(path).load()) == ["a", "b", "c", "d"] and path.read_text().endswith("}\n")
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(EvalError, match="line 2 is damaged"):
        AnswerLog(path).load()


# -- answering on the fixture model --------------------------------------------------------------------
class Asker:
    """The fixture Pipeline, counting its questions and encoded pictures, with a kill injected
    before the n-th question when asked."""

    def __init__(self, pipe, crash_at: int | None = None):
        self.pipe, self.crash_at, self.asked, self.encoded = pipe, crash_at, [], 0

    def encode_image(self, image):
        self.encoded += 1
        return self.pipe.encode_image(image)

    def ask(self, image, question, **kwargs):
        if self.crash_at is not None and len(self.asked) == self.crash_at:
            raise KeyboardInterrupt
        self.asked.append(question)
        return self.pipe.ask(image, question, **kwargs)


def test_pope_run_resumes_after_a_kill_without_repeating_or_losing_answers(pipe, tmp_path):
    from showo_mlx.eval.vqa import run_vqa

    bench, items = load_benchmark(str(make_pope(tmp_path / "pope")))
    out = tmp_path / "out"
    run = {"benchmark": "pope", "data": "pope", "model": "fixture", "prompt_suffix": DEFAULT_SUFFIX, "max_tokens": TOKENS}
    kwargs = dict(run=run, suffix=DEFAULT_SUFFIX, max_tokens=TOKENS, progress=False, log=lambda m: None)
    first = Asker(pipe, crash_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_vqa(first, bench, items, out, **kwargs)
    kept = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == ["adversarial/1", "adversarial/2"] and not (out / "results.json").exists()
    with open(out / "answers.jsonl", "a") as f:  # killed in the middle of writing the third record
        f.write('{"id": "random/1", "category": "random", "answ')
    second = Asker(pipe)
    metrics = run_vqa(second, bench, items, out, **kwargs)
    assert second.asked == [bench.prompt(i.question, DEFAULT_SUFFIX) for i in items[2:]]  # only the missing ones
    # each picture is encoded once for all its questions (the first run died after encoding picture 2)
    assert (first.encoded, second.encoded) == (2, 1)
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [i.id for i in items] and records[:2] == kept
    assert all(r["prediction"] == bench.parse(r["answer"]) and r["question"].endswith("single word or phrase.") for r in records)
    result = json.loads((out / "results.json").read_text())
    assert result["answered"] == 4 and result["metrics"] == metrics == bench.score(records)
    assert metrics["all"]["n"] == 4 and set(metrics["splits"]) == {"adversarial", "random"}
    third = Asker(pipe)
    assert run_vqa(third, bench, items, out, **kwargs) == metrics and third.asked == []  # all done: nothing asked
    with pytest.raises(EvalError, match="another evaluation.*max_tokens"):
        run_vqa(third, bench, items, out, **{**kwargs, "run": {**run, "max_tokens": 9}})


def test_eval_vqa_command_on_mme_and_gqa(converted, tmp_path):
    from showo_mlx.cli import app

    runner = CliRunner()
    mme = make_mme(tmp_path / "mme")
    shutil.rmtree(mme / "artwork")  # one image, two questions
    result = runner.invoke(app, ["eval", "vqa", str(mme), "--model", str(converted), "--max-tokens", str(TOKENS), "-o", str(tmp_path / "mme_out")])
    assert result.exit_code == 0, result.output
    assert "existence" in result.stdout and "Perception" in result.stdout
    saved = json.loads((tmp_path / "mme_out" / "results.json").read_text())
    answers = [json.loads(line) for line in (tmp_path / "mme_out" / "answers.jsonl").read_text().splitlines()]
    assert saved["benchmark"] == "mme" and saved["answered"] == 2 and saved["metrics"] == BENCHMARKS["mme"].score(answers)
    assert answers[0]["question"] == "Is there a cat in this image?\nAnswer the question using a single word or phrase."
    gqa = runner.invoke(app, ["eval", "vqa", str(make_gqa_json(tmp_path / "gqa")), "--model", str(converted), "--limit", "1",
                              "--max-tokens", str(TOKENS), "--prompt-suffix", "", "-o", str(tmp_path / "gqa_out")])
    assert gqa.exit_code == 0, gqa.output
    assert "GQA accuracy" in gqa.stdout
    record = json.loads((tmp_path / "gqa_out" / "answers.jsonl").read_text())
    assert record["question"] == "What color is the cat?" and record["target"] == "red"
    bad = runner.invoke(app, ["eval", "vqa", str(tmp_path / "nowhere"), "--model", str(converted)])
    assert bad.exit_code == 2 and "does not exist" in bad.output and "Traceback" not in bad.output


# -- GenEval -------------------------------------------------------------------------------------------
def test_geneval_layout_and_resume(converted, tmp_path):
    from showo_mlx.cli import app

    prompts = tmp_path / "evaluation_metadata.jsonl"
    meta = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
    prompts.write_text(json.dumps(meta) + "\n")
    out = tmp_path / "geneval"
    args = ["eval", "geneval", str(prompts), str(out), "--model", str(converted), "--steps", "1", "--seed", "5"]
    sample = out / "00000" / "samples" / "0000.png"
    sample.parent.mkdir(parents=True)
    shutil.copy(IMAGES[0], sample)  # as if an interrupted earlier run had made sample 0
    before = sample.read_bytes()
    result = CliRunner().invoke(app, [*args, "--n", "2"])  # resumed: only sample 1 is made
    assert result.exit_code == 0, result.output
    assert "(1 new)" in result.stdout and sample.read_bytes() == before
    assert json.loads((out / "00000" / "metadata.jsonl").read_text()) == meta  # json.load-able, as evaluate_images.py reads it
    assert sorted(p.name for p in (out / "00000" / "samples").iterdir()) == ["0000.png", "0001.png"]
    info = Image.open(out / "00000" / "samples" / "0001.png").info
    assert info["seed"] == "6" and info["prompt"] == "a photo of a bench" and info["steps"] == "1"
    prompts.write_text(json.dumps({**meta, "prompt": "a photo of a cat"}) + "\n")
    clash = CliRunner().invoke(app, [*args, "--n", "2"])
    assert clash.exit_code == 2 and "another prompt" in clash.output


# -- during training -----------------------------------------------------------------------------------
def test_eval_every_logs_the_metric_per_step(converted, tmp_path):
    from test_init import make_prepared

    from showo_mlx.train.config import TrainConfig
    from showo_mlx.train.trainer import Trainer

    make_prepared(tmp_path / "prep")
    data = make_pope(tmp_path / "pope")
    cfg = TrainConfig.from_dict({"model": str(converted), "data": str(tmp_path / "prep"), "output": str(tmp_path / "run"),
                                 "batch_t2i": 1, "batch_lm": 0, "batch_mmu": 1, "max_steps": 2, "warmup_steps": 1,
                                 "eval_every": 2, "eval_data": str(data), "eval_limit": 2, "progress": False, "save_every": 100})
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval" in line]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2] and [e["step"] for e in evals] == [2]
    summary = evals[0]["eval"]
    assert summary["benchmark"] == "pope" and summary["questions"] == 2 and set(summary) >= {"accuracy", "f1", "yes_ratio"}
    assert trainer._evaluator.pipe.model is trainer.model and trainer.model.training  # the trained weights, no copy
    with pytest.raises(Exception, match="eval_every needs eval_data"):
        TrainConfig.from_dict({"eval_every": 5})
