"""The `showo` task commands through typer's CliRunner on the converted tiny fixture model:
outputs (sizes, metadata, printed text) and the error contract (one `error:` line on stderr, exit
code 2, nothing written; Ctrl-C → 130)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import REF, load_npz
from showo_mlx import __version__
from showo_mlx import cli as cli_module
from showo_mlx.cli import app
from showo_mlx.images import preprocess_image, read_png_metadata, to_uint8

IMAGES = REF / "images"
IMAGE, MASK = IMAGES / "magvit_in_0.png", IMAGES / "inpaint_mask.png"


@pytest.fixture
def run(converted, tmp_path, monkeypatch):
    """Invoke the app with --model <converted> appended, in tmp_path (so default outputs land there)."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args, model=True):
        argv = [str(a) for a in args] + (["--model", str(converted)] if model else [])
        return runner.invoke(app, argv)

    return invoke


def files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def pixels(path):
    with Image.open(path) as im:
        return im.mode, im.size, np.asarray(im).copy()


def ok(result):
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------


def test_generate_two_seeds_with_metadata(run, tmp_path, converted):
    r = ok(run("generate", "a red cat", "--steps", "2", "--guidance", "1.5", "--schedule", "linear",
               "-s", "3", "-s", "4", "-o", "out/cat_{seed}.png"))
    assert "truncated" not in r.stderr
    assert files(tmp_path) == ["out", "out/cat_3.png", "out/cat_4.png"]
    images = []
    for seed in (3, 4):
        path = tmp_path / f"out/cat_{seed}.png"
        mode, size, px = pixels(path)
        assert (mode, size) == ("RGB", (128, 128))
        images.append(px)
        meta = read_png_metadata(path)
        assert meta["prompt"] == "a red cat"
        assert meta["seed"] == str(seed)
        assert (meta["steps"], meta["guidance"], meta["schedule"]) == ("2", "1.5", "linear")
        assert meta["model"] == str(converted)
        assert meta["Software"] == f"showo-mlx {__version__}"
    assert not np.array_equal(images[0], images[1])


def test_generate_seed_placeholder_is_the_seed_with_several_prompts(run, tmp_path):
    """Two prompts, one seed: {seed} must be the seed (5), {i} the image index."""
    ok(run("generate", "a red cat", "a blue bird", "--steps", "1", "-s", "5", "-o", "b_{seed}_{i}.png"))
    assert files(tmp_path) == ["b_5_0.png", "b_5_1.png"]
    for i, prompt in enumerate(["a red cat", "a blue bird"]):
        meta = read_png_metadata(tmp_path / f"b_5_{i}.png")
        assert (meta["prompt"], meta["seed"]) == (prompt, "5")


def test_generate_batch_of_two_prompts(run, tmp_path):
    ok(run("generate", "a red cat", "a blue bird", "--steps", "1", "-s", "5", "-o", "p_{i}.png"))
    assert files(tmp_path) == ["p_0.png", "p_1.png"]
    metas = [read_png_metadata(tmp_path / f"p_{i}.png") for i in (0, 1)]
    assert [m["prompt"] for m in metas] == ["a red cat", "a blue bird"]
    assert [m["seed"] for m in metas] == ["5", "5"]
    assert all(pixels(tmp_path / f"p_{i}.png")[1] == (128, 128) for i in (0, 1))


def test_generate_two_prompts_default_output(run, tmp_path):
    """The default --output is mflux's: image.png, image_1.png, … and it never overwrites (a second
    run moves on to the next free numbers)."""
    ok(run("generate", "a red cat", "a blue bird", "--steps", "1"))
    assert files(tmp_path) == ["image.png", "image_1.png"]
    assert [read_png_metadata(tmp_path / p)["prompt"] for p in ("image.png", "image_1.png")] == ["a red cat", "a blue bird"]
    seeds = {read_png_metadata(tmp_path / p)["seed"] for p in ("image.png", "image_1.png")}
    assert len(seeds) == 1
    before = (tmp_path / "image.png").read_bytes()
    ok(run("generate", "a green frog", "--steps", "1", "--greedy"))
    assert files(tmp_path) == ["image.png", "image_1.png", "image_2.png"]
    assert (tmp_path / "image.png").read_bytes() == before
    assert read_png_metadata(tmp_path / "image_2.png")["prompt"] == "a green frog"


def test_generate_num_images(run, tmp_path):
    ok(run("generate", "a red cat", "--steps", "1", "-n", "2", "-s", "7", "-o", "n_{i}.png"))
    assert files(tmp_path) == ["n_0.png", "n_1.png"]
    assert [read_png_metadata(tmp_path / f"n_{i}.png")["seed"] for i in (0, 1)] == ["7", "8"]


def test_generate_greedy_is_reproducible(run, tmp_path):
    ok(run("generate", "a red cat", "--steps", "2", "--greedy", "-s", "1", "-o", "g1.png"))
    ok(run("generate", "a red cat", "--steps", "2", "--greedy", "-s", "2", "-o", "g2.png"))
    a, b = pixels(tmp_path / "g1.png"), pixels(tmp_path / "g2.png")
    assert a[:2] == b[:2] == ("RGB", (128, 128))
    np.testing.assert_array_equal(a[2], b[2])
    assert read_png_metadata(tmp_path / "g1.png")["seed"] == "greedy"


def test_generate_truncates_long_prompt(run, tmp_path, cases):
    long = cases["prompts"][6]["text"]
    r = ok(run("generate", long, "--steps", "1", "-s", "0", "-o", "long.png"))
    assert "truncated" in r.stderr
    assert read_png_metadata(tmp_path / "long.png")["prompt"] == long


def test_generate_ctrl_c(run, tmp_path, monkeypatch):
    def interrupt(self, step, steps, tokens):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module.StepProgress, "__call__", interrupt)
    r = run("generate", "a red cat", "--steps", "3", "-s", "0", "-o", "c.png")
    assert r.exit_code == 130
    assert not list(tmp_path.rglob("*.png"))
    assert "interrupted" in r.stderr


# ------------------------------------------------------------------------------------------------
# the other tasks
# ------------------------------------------------------------------------------------------------


def test_inpaint(run, tmp_path):
    ok(run("inpaint", IMAGES / "preprocess_in_0.png", MASK, "a red bus", "--steps", "2", "-s", "0", "-o", "inp.png"))
    mode, size, _ = pixels(tmp_path / "inp.png")
    assert (mode, size) == ("RGB", (128, 128))
    meta = read_png_metadata(tmp_path / "inp.png")
    assert (meta["task"], meta["prompt"], meta["seed"]) == ("inpaint", "a red bus", "0")
    assert meta["repainted_tokens"] == str(int(load_npz("preprocess")["mask_tokens"].sum()))


def test_extend(run, tmp_path, monkeypatch):
    bars = []

    class Counting(cli_module.StepProgress):  # the progress bar's total is the number of steps run
        def __init__(self, total, desc):
            super().__init__(total, desc)
            self.counts = [total, 0]
            bars.append(self.counts)

        def __call__(self, step, steps, tokens):
            self.counts[1] += 1

    monkeypatch.setattr(cli_module, "StepProgress", Counting)
    ok(run("extend", IMAGE, "a lake", "-d", "left", "-d", "right", "-d", "down", "--steps", "1", "-s", "0", "-o", "ext.png"))
    assert bars == [[4, 4]]  # left, right: one window each; down on the 8x16 canvas: two
    mode, size, _ = pixels(tmp_path / "ext.png")
    # 8x8 tokens → left 8x12 → right 8x16 → down 12x16; 16 px per token
    assert (mode, size) == ("RGB", (16 * 16, 12 * 16))
    meta = read_png_metadata(tmp_path / "ext.png")
    assert meta["directions"] == "left right down" and meta["canvas_tokens"] == "12x16"


def test_ask_prints_the_answer(run, cases):
    case = cases["mmu_generate"][0]
    r = ok(run("ask", IMAGES / case["image"], case["question"], "--max-tokens", "20"))
    assert r.stdout == case["decoded_text"][0] + "\n"


def test_low_ram_flag_changes_memory_use_not_outputs(run, tmp_path, cases, restore_limits):
    args = ("extend", IMAGE, "a lake", "-d", "left", "--steps", "2", "-s", "0")
    ok(run(*args, "-o", "plain.png"))
    ok(run(*args, "--low-ram", "-o", "low.png"))
    np.testing.assert_array_equal(pixels(tmp_path / "plain.png")[2], pixels(tmp_path / "low.png")[2])
    case = cases["mmu_generate"][0]
    r = ok(run("ask", IMAGES / case["image"], case["question"], "--max-tokens", "20", "--low-ram"))
    assert r.stdout == case["decoded_text"][0] + "\n"


def test_caption_and_complete(run, pipe):
    r = ok(run("caption", IMAGE, "--max-tokens", "8"))
    assert r.stdout == pipe.caption(IMAGE, max_tokens=8) + "\n"
    assert len(r.stdout.strip()) > 0
    r = ok(run("complete", "The glass book", "--max-tokens", "8"))
    assert r.stdout == "The glass book" + pipe.complete("The glass book", max_tokens=8) + "\n"
    assert len(r.stdout) > len("The glass book\n")


def test_reconstruct(run, tmp_path):
    r = ok(run("reconstruct", IMAGE, "rec.png"))
    mode, size, px = pixels(tmp_path / "rec.png")
    assert (mode, size) == ("RGB", (128, 128))
    want = load_npz("magvit")["decoded_uint8"][0]
    assert np.abs(px.astype(int) - want.astype(int)).max() <= 1
    assert "8x8" in r.stdout
    with Image.open(IMAGE) as im:
        original = to_uint8(preprocess_image(im.convert("RGB"), 128))[0].astype(np.float64)
    psnr = 10 * np.log10(255.0**2 / np.mean((original - px.astype(np.float64)) ** 2))
    printed = float(re.search(r"PSNR ([0-9.]+) dB", r.stdout).group(1))
    assert printed == pytest.approx(psnr, abs=0.006)


# ------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit 2, nothing written
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def junk(tmp_path):
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "text.png").write_text("not an image\n")
    (d / "empty.png").write_bytes(b"")
    (d / "file").write_text("a regular file\n")
    (d / "existing.png").write_bytes(b"keep me")
    return d


BAD = {
    "missing image": ["inpaint", "{d}/nope.png", MASK, "x", "-o", "o.png"],
    "unreadable image": ["inpaint", "{d}/text.png", MASK, "x", "-o", "o.png"],
    "empty image": ["ask", "{d}/empty.png", "what?"],
    "missing mask": ["inpaint", IMAGE, "{d}/nope.png", "x", "-o", "o.png"],
    "mask not an image": ["inpaint", IMAGE, "{d}/text.png", "x", "-o", "o.png"],
    "missing image (extend)": ["extend", "{d}/nope.png", "x", "-d", "left", "-o", "o.png"],
    "missing image (ask)": ["ask", "{d}/nope.png", "what?"],
    "unknown direction": ["extend", IMAGE, "x", "-d", "sideways", "-o", "o.png"],
    "steps 0": ["generate", "x", "--steps", "0", "-o", "o.png"],
    "negative guidance": ["generate", "x", "--guidance=-1", "-o", "o.png"],
    "unknown schedule": ["generate", "x", "--schedule", "zigzag", "-o", "o.png"],
    "steps 0 (inpaint)": ["inpaint", IMAGE, MASK, "x", "--steps", "0", "-o", "o.png"],
    "unwritable output": ["generate", "x", "--steps", "1", "-o", "{d}/file/sub/o.png"],
    "seed not an integer": ["generate", "x", "--steps", "1", "--seed", "abc", "-o", "o.png"],
    "existing output": ["generate", "x", "--steps", "1", "-s", "0", "-o", "{d}/existing.png"],
    "output not png": ["generate", "x", "--steps", "1", "-o", "o.jpg"],
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, run, tmp_path, junk):
    args = [str(a).format(d=junk) for a in BAD[case]]
    before = files(tmp_path)
    r = run(*args)
    assert r.exit_code == 2, (r.stdout, r.stderr, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert files(tmp_path) == before
    assert (junk / "existing.png").read_bytes() == b"keep me"


def test_bad_input_is_caught_before_the_model_loads(run, tmp_path, monkeypatch):
    """Parameter errors need no model: they must be reported without loading the weights."""

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_module, "load_pipeline", no_load)
    for args in (["--steps", "0"], ["--guidance=-1"], ["--schedule", "zigzag"], ["--temperature=-1"]):
        r = run("generate", "x", *args, "-o", "o.png")
        assert r.exit_code == 2 and r.stderr.startswith("error: "), (args, r.stderr, r.exception)


def test_generate_without_prompts_is_a_usage_error(run, tmp_path):
    r = run("generate", "--steps", "1", "-o", "o.png")
    assert r.exit_code == 2
    assert r.stderr.startswith("error: no prompt given") and "--prompt" in r.stderr
    assert files(tmp_path) == []
