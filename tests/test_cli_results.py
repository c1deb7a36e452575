"""What the commands produce (issue 11 items 5-8, issue 16 item 12 for -n): PNG metadata that
`showo info` prints and `--config-from-metadata` re-runs byte for byte; mlx-lm's streamed responses
and summary lines; `extend -n` and progress totals; caption's sampling flags; images saved as they
finish; `showo bench` defaults and ETAs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import REF
from showo_mlx import __version__
from showo_mlx import bench as bench_module
from showo_mlx import cli as cli_module
from showo_mlx.cli import app
from showo_mlx.metadata import KEY, read_record
from showo_mlx.images import read_png_metadata

IMAGE = REF / "images" / "magvit_in_0.png"
runner = CliRunner()


@pytest.fixture
def run(converted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def invoke(*args, model=True):
        r = runner.invoke(app, [str(a) for a in args] + (["--model", str(converted)] if model else []))
        assert r.exit_code == 0, (r.exit_code, r.stdout, r.stderr, r.exception)
        return r

    return invoke


# -- item 6: metadata, info, --config-from-metadata ------------------------------------------------------
def test_save_info_and_config_from_metadata_round_trip(run, tmp_path, converted, pipe):
    run("generate", "a red cat", "--greedy", "--steps", "2", "--schedule", "linear", "-s", "9", "-o", "a.png")
    record = read_record(tmp_path / "a.png")
    assert record == {
        "format": 1, "software": f"showo-mlx {__version__}", "task": "generate", "prompt": "a red cat", "seed": 9,
        "greedy": True, "steps": 2, "guidance": 1.75, "temperature": 1.0, "schedule": "linear",
        "model": str(converted.resolve()), "dtype": None, "quantize": None, "width": 128, "height": 128,
    }
    text = read_png_metadata(tmp_path / "a.png")
    assert text["Software"] == f"showo-mlx {__version__}"
    assert text["Comment"].startswith('generate "a red cat", greedy (argmax, no noise), 2 steps, guidance 1.75')
    assert (text["prompt"], text["seed"], text["model"]) == ("a red cat", "greedy", str(converted.resolve()))

    # showo info prints what generate wrote
    info = run("info", "a.png", "--json", model=False)
    assert json.loads(info.stdout) == record
    lines = run("info", "a.png", model=False).stdout.splitlines()
    assert lines[:2] == [f"Software: {text['Software']}", f"Comment: {text['Comment']}"]
    assert "prompt: a red cat" in lines and "steps: 2" in lines and f"model: {converted.resolve()}" in lines

    # the same settings again: the same PNG, byte for byte (no --model: the recorded one is used)
    run("generate", "--config-from-metadata", "a.png", "-o", "b.png", model=False)
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()


def test_config_from_metadata_overrides_and_refusals(run, tmp_path, pipe, monkeypatch):
    image = pipe.generate("a blue bird", seed=4, steps=1, guidance=0.5, schedule="pow2")[0]
    image.save(tmp_path / "bird.png")  # the API's GeneratedImage.save writes the same record as the CLI
    assert json.loads(read_png_metadata(tmp_path / "bird.png")[KEY]) == image.record()
    assert image.record()["model"] == str(pipe.folder.resolve()) and image.record()["seed"] == 4
    seen = []
    monkeypatch.setattr(cli_module, "load_pipeline", lambda model, dtype, spec, low_ram: seen.append((model, dtype, spec)) or pipe)
    monkeypatch.setattr(pipe, "generate", lambda prompts, **kw: seen.append((prompts, kw)) or [], raising=False)
    run("generate", "--config-from-metadata", "bird.png", "--steps", "3", "--seed", "11", model=False)
    (model, dtype, spec), (prompts, kw) = seen
    assert (model, dtype, spec) == (str(pipe.folder.resolve()), None, None)
    assert prompts == ["a blue bird"] and kw["seed"] == [11]
    assert (kw["steps"], kw["guidance"], kw["schedule"], kw["greedy"]) == (3, 0.5, "pow2", False)
    dataclasses.replace(image, task="inpaint").save(tmp_path / "bus.png")
    for png, needle in (("bus.png", "showo inpaint"), (IMAGE, "no showo-mlx settings")):
        r = runner.invoke(app, ["generate", "--config-from-metadata", str(png)])
        assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


# -- item 5: mlx-lm's responses and summary -------------------------------------------------------------
def test_stream_responses_carry_mlx_lm_fields(pipe):
    responses = list(pipe.stream_complete("The glass book", max_tokens=6))
    assert "".join(responses) == pipe.complete("The glass book", max_tokens=6)
    assert [r.generation_tokens for r in responses] == list(range(1, len(responses) + 1))
    assert all(isinstance(r, str) and type(r.text) is str and r.text == r for r in responses)
    prompt_tokens = 1 + len(pipe.prompting.encode("The glass book"))
    assert {r.prompt_tokens for r in responses} == {prompt_tokens}
    assert all(r.prompt_tps > 0 and r.generation_tps > 0 and r.peak_memory > 0 for r in responses)
    eos = pipe.prompting.ids.eos
    assert responses[-1].finish_reason == ("stop" if responses[-1].token == eos else "length")
    assert all(r.finish_reason is None for r in responses[:-1])
    ids = np.asarray([pipe.prompting._with_bos(pipe.prompting.encode("The glass book"))])
    from showo_mlx.decoding import SamplingOptions
    from showo_mlx.layout import Layout

    assert [r.token for r in responses] == list(pipe.answer_tokens(ids, [Layout(ids.shape[1])], 6, SamplingOptions()))


def test_text_commands_print_the_summary(run, pipe):
    r = run("complete", "The glass book", "-m", "5")
    assert r.stdout == "The glass book" + pipe.complete("The glass book", max_tokens=5) + "\n"
    summary = [line for line in r.stderr.splitlines() if line.startswith(("Prompt:", "Generation:", "Peak memory:"))]
    assert len(summary) == 3, r.stderr
    n = 1 + len(pipe.prompting.encode("The glass book"))
    assert summary[0].startswith(f"Prompt: {n} tokens, ") and summary[0].endswith(" tokens-per-sec")
    assert summary[1].startswith("Generation: ") and summary[2].endswith(" GB")



def test_caption_takes_the_sampling_flags(run, pipe, monkeypatch):
    """caption had only --max-tokens; now --temp/--top-k/--top-p/--seed reach the sampler."""
    seen, real = [], pipe.stream_ask

    def spy(image, question, **kwargs):
        seen.append(kwargs)
        return real(image, question, **kwargs)

    monkeypatch.setattr(pipe, "stream_ask", spy, raising=False)
    monkeypatch.setattr(cli_module, "load_pipeline", lambda *a, **k: pipe)
    r = run("caption", "--image", IMAGE, "-m", "6", "--temp", "0.9", "--top-k", "5", "--top-p", "0.8", "--seed", "3")
    assert seen == [dict(max_tokens=6, temperature=0.9, top_k=5, top_p=0.8, seed=3)]
    assert r.stdout.strip() and "Generation: " in r.stderr


# -- item 7 and issue 16 item 12: -n, totals, saving as images finish ------------------------------------
def test_extend_n_with_progress_totals(run, tmp_path, monkeypatch):
    bars = []

    class Counting(cli_module.StepProgress):
        def __init__(self, total, desc):
            super().__init__(total, desc)
            self.total, self.calls = total, 0
            bars.append(self)

        def __call__(self, step, steps, tokens):
            self.calls += 1

    monkeypatch.setattr(cli_module, "StepProgress", Counting)
    r = run("extend", IMAGE, "a lake", "-d", "left", "--steps", "2", "-n", "2", "--seed", "5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extend.png", "extend_1.png"]
    assert [read_record(tmp_path / p)["seed"] for p in ("extend.png", "extend_1.png")] == [5, 6]
    # one window per image (left of an 8x8 canvas) x 2 steps x 2 images; tests/test_cli_tasks.py's
    # test_extend checks a chain with two windows in one step
    assert [(b.total, b.calls) for b in bars] == [(4, 4)]
    assert r.stdout.count("saved ") == 2


def test_interrupted_batch_keeps_finished_images(converted, tmp_path, monkeypatch):
    """-n 3 in batches of one, Ctrl-C during the second: the first image is saved, and complete."""
    monkeypatch.chdir(tmp_path)
    calls = []

    def interrupt_second_batch(self, step, steps, tokens):
        calls.append(step)
        if len(calls) == 3:  # 2 steps per batch: the first step of the second batch
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_module.StepProgress, "__call__", interrupt_second_batch)
    r = runner.invoke(app, ["generate", "a red cat", "-n", "3", "--batch-size", "1", "--steps", "2", "-s", "1",
                            "--model", str(converted)])
    assert r.exit_code == 130 and "interrupted" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]
    assert read_record(tmp_path / "image.png")["seed"] == 1


# -- item 8: bench -------------------------------------------------------------------------------------
def test_bench_defaults_are_quick(monkeypatch):
    """No options: 3 timed steps per path and the recompute at 5 of 100 answer positions (before,
    18 steps and all 100 positions: over a quarter of an hour on the development VM)."""
    seen = []

    def capture(opts, log):
        seen.append(opts)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_module, "run_bench", capture)
    monkeypatch.setattr("showo_mlx.launcher.slow_blas_hint", lambda: None)
    assert runner.invoke(app, ["bench"]).exit_code == 130
    (opts,) = seen
    assert (opts.model, opts.resolution, opts.tiny, opts.steps, opts.tokens, opts.recompute_tokens) == (None, 256, False, 3, 100, 5)
    assert opts.phases == bench_module.PHASES and opts.recompute and opts.warmup


def test_bench_small_random_run_with_etas():
    r = runner.invoke(app, ["bench", "--random", "small", "--steps", "1", "--tokens", "8", "--only", "ask"])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert "small random architecture" in r.stdout
    assert "ask per token (8 tokens; recompute at 5 of 8, evenly spaced)" in " ".join(r.stdout.split())
    etas = [line for line in r.stderr.splitlines() if "(ETA " in line]
    assert any("ask: KV cache, 8 tokens" in line for line in etas) and any("recompute at 5 of 8" in line for line in etas)
    assert all(line.startswith("[0:") for line in r.stderr.splitlines() if "ask:" in line)
