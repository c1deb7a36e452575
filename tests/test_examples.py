"""The example scripts run as a user would run them (`python examples/<name>.py ... --model <m>`),
here on the converted tiny fixture model. The four scripts start together (each is mostly
interpreter and import time) and each test checks one script's outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REF
from showo_mlx.images import read_png_metadata

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IMAGES = REF / "images"


@pytest.fixture(scope="module")
def runs(converted, tmp_path_factory):
    out = tmp_path_factory.mktemp("examples")
    commands = {
        "generate": ["generate.py", "a red cat", "--seed", "5", "-n", "2", "--steps", "2", "--output-dir", out],
        "inpaint": ["inpaint.py", IMAGES / "preprocess_in_0.png", IMAGES / "inpaint_mask.png", "a red bus",
                    "--steps", "2", "--output", out / "inpainted.png"],
        "extend": ["extend.py", IMAGES / "magvit_in_0.png", "a lake", "-d", "left", "-d", "down",
                   "--steps", "1", "--output", out / "extended.png"],
        "ask": ["ask.py", IMAGES / "magvit_in_0.png", "--max-tokens", "20"],
    }
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(EXAMPLES / args[0]), *map(str, args[1:]), "--model", str(converted)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out, env=env,
        )
        for name, args in commands.items()
    }
    results = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        results[name] = (p.returncode, stdout, stderr)
    return out, results


def finished(runs, name):
    code, stdout, stderr = runs[1][name]
    assert code == 0, stderr[-2000:]
    return stdout


def size(path):
    with Image.open(path) as im:
        return im.mode, im.size


def test_examples_are_short():
    for script in ("generate.py", "inpaint.py", "extend.py", "ask.py"):
        text = (EXAMPLES / script).read_text()
        assert len(text.splitlines()) < 40, script
        assert "showo_mlx.pipeline.load(args.model)" in text and '"showlab/show-o"' in text


def test_generate_example(runs):
    stdout = finished(runs, "generate")
    out = runs[0]
    for seed in (5, 6):
        path = out / f"generate_{seed}.png"
        assert size(path) == ("RGB", (128, 128))
        meta = read_png_metadata(path)
        assert (meta["prompt"], meta["seed"], meta["steps"]) == ("a red cat", str(seed), "2")
        assert str(path) in stdout
    with Image.open(out / "generate_5.png") as a, Image.open(out / "generate_6.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_inpaint_example(runs):
    stdout = finished(runs, "inpaint")
    assert size(runs[0] / "inpainted.png") == ("RGB", (128, 128))
    assert "repainted 23 tokens" in stdout
    assert read_png_metadata(runs[0] / "inpainted.png")["task"] == "inpaint"


def test_extend_example(runs):
    stdout = finished(runs, "extend")
    # 8x8 tokens → left: 8x12 → down: 12x12 (16 px per token)
    assert size(runs[0] / "extended.png") == ("RGB", (12 * 16, 12 * 16))
    assert "canvas 12x12 tokens" in stdout


def test_ask_example(runs, cases):
    stdout = finished(runs, "ask")
    case = cases["mmu_generate"][0]  # same image, same default question, greedy: the reference answer
    assert stdout == case["decoded_text"][0] + "\n"
