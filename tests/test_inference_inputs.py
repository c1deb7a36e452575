"""Bad and hostile inference inputs through the library (issue 16, items 12-14): bounds on work,
one-line typed errors instead of tracebacks, nothing silently wrong. Every crafted input (PNG, TIFF,
tokenizer file) is built here; each test runs in well under two seconds on the fixture model.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import REF
from showo_mlx import images
from showo_mlx.errors import GenerationInputError, ImageInputError, ShowoConfigError
from showo_mlx.images import NOTES_KEY, fit_mask, load_image, load_mask, preprocess_image
from showo_mlx.limits import MAX_IMAGES, MAX_STEPS, check_seed, check_text
from showo_mlx.pipeline import GenerationSettings, extended_canvas_shape
from showo_mlx.prompting import TOKENIZER_FILES, Prompting

IMAGE = REF / "images" / "magvit_in_0.png"  # 128x128 RGB, the model's resolution
NAN, INF = float("nan"), float("inf")


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


def never(*args):
    """A MaskGIT callback for calls that must be refused before any step runs."""
    raise AssertionError("a MaskGIT step ran for an input that should have been refused")


# ------------------------------------------------------------------------------------------------
# 12. Bounds on work
# ------------------------------------------------------------------------------------------------


def test_steps_over_the_limit_need_allow_long(pipe):
    with pytest.raises(GenerationInputError) as e:
        pipe.generate("a cat", seed=0, steps=MAX_STEPS + 1, callback=never)
    assert "allow_long" in one_line(e) and str(MAX_STEPS) in str(e.value)
    with pytest.raises(GenerationInputError):
        pipe.inpaint(IMAGE, IMAGE, "a cat", seed=0, steps=10**9, callback=never)
    with pytest.raises(GenerationInputError):
        pipe.extrapolate(IMAGE, "a cat", ["left"], seed=0, steps=5000, callback=never)
    # the limit itself is allowed, and allow_long (the CLI's --force) lifts it
    assert pipe.settings("generate", steps=MAX_STEPS).steps == MAX_STEPS
    assert pipe.settings("generate", steps=5000, allow_long=True).steps == 5000
    assert GenerationSettings(5000, 1.75).validate(allow_long=True).steps == 5000
    with pytest.raises(GenerationInputError):
        GenerationSettings(5000, 1.75).validate()


def test_number_of_images_is_bounded(pipe):
    with pytest.raises(GenerationInputError) as e:
        pipe.generate("a cat", seed=0, n=MAX_IMAGES + 1, steps=1, callback=never)
    assert "allow_long" in one_line(e)
    with pytest.raises(GenerationInputError) as e:  # prompts x seeds counts, not n alone
        pipe.generate(["a cat", "a dog"], seed=list(range(MAX_IMAGES // 2 + 1)), steps=1, callback=never)
    assert "prompts x seeds" in one_line(e)
    for n in (0, -1, 2.5, "3"):
        with pytest.raises(GenerationInputError):
            pipe.generate("a cat", seed=0, n=n, steps=1, callback=never)


def test_extension_canvas_is_bounded(pipe):
    assert extended_canvas_shape((8, 8), ["left", "up", "right"], 4) == (12, 16)
    # 40 steps of 4 columns: an 8x168 canvas = 21 windows > 16. Refused before the image is read
    # (the path does not exist: the old code failed on it only after accepting the directions).
    with pytest.raises(GenerationInputError) as e:
        pipe.extrapolate(REF / "no-such.png", "a lake", ["left"] * 40, seed=0, steps=1, callback=never)
    assert "16 model windows" in one_line(e)


def _text_of_tokens(prompting, n: int) -> str:
    """A text that, with the leading <|endoftext|>, is exactly n tokens."""
    k = n
    for _ in range(20):
        text = " ".join(["cat"] * k)
        got = len(prompting.encode(text)) + 1
        if got == n:
            return text
        k += n - got
    raise AssertionError("could not build a text of the requested length")


def test_max_tokens_lowered_to_the_positions_left(pipe, monkeypatch):
    assert pipe.cfg.max_position_embeddings == 2048  # the fixture's (and Phi-1.5's) positions
    # A 2045-token prefill takes seconds on this CPU; the rule reads the config, so a smaller limit
    # exercises the same code quickly.
    limit = 40
    monkeypatch.setattr(pipe.cfg, "max_position_embeddings", limit)
    text = _text_of_tokens(pipe.prompting, limit - 3)
    seen = {}
    original = pipe.answer_tokens

    def spy(ids, layouts, max_tokens, options, prompt_embeddings=None):
        seen["length"], seen["max_tokens"] = ids.shape[1], max_tokens
        tokens = list(original(ids, layouts, max_tokens, options, prompt_embeddings))
        seen["generated"] = len(tokens)
        return iter(tokens)

    monkeypatch.setattr(pipe, "answer_tokens", spy)
    pipe.complete(text, max_tokens=100)
    assert seen["length"] == limit - 3 and seen["max_tokens"] == 3  # prompt + answer <= 2048
    assert seen["generated"] <= 3
    assert pipe.notes == [f"max tokens lowered from 100 to 3: the prompt takes {limit - 3} of the model's {limit} positions"]
    # room for exactly one token (max_tokens=1 crashed with UnboundLocalError in the decoding loop)
    pipe.complete(_text_of_tokens(pipe.prompting, limit - 1), max_tokens=5)
    assert (seen["max_tokens"], seen["generated"]) == (1, 1)
    pipe.complete("Once upon a time", max_tokens=1)
    assert (seen["max_tokens"], seen["generated"]) == (1, 1) and pipe.notes == []


def test_prompts_that_leave_no_room_are_refused(pipe):
    limit = pipe.cfg.max_position_embeddings
    with pytest.raises(GenerationInputError) as e:
        pipe.complete(_text_of_tokens(pipe.prompting, limit), max_tokens=1)
    assert f"{limit} positions" in one_line(e) and "shorten it by at least 1 tokens" in str(e.value)
    # ask: the question is measured with the image tokens before anything is read or encoded (the
    # image path does not exist: a refusal about the image would mean the question was not checked)
    question = _text_of_tokens(pipe.prompting, limit)
    with pytest.raises(GenerationInputError) as e:
        pipe.ask(REF / "no-such.png", question)
    assert "question" in one_line(e) and f"{pipe.cfg.num_vq_tokens} image tokens" in str(e.value)
    n = pipe.cfg.num_vq_tokens
    assert pipe.prompting.mmu_length("What is this?", n) == pipe.prompting.mmu_gen(np.zeros((1, n), np.int64), "What is this?").ids.shape[1]


def test_elongated_image_is_resized_inside_its_crop(tmp_path, monkeypatch):
    """A 1x50000 PNG of a few hundred bytes used 3.6 GB: the short side went to 128 px and the long
    one to 6.4 M before the centre crop. Now no resize may ask for more than FULL_RESIZE_MAX_PIXELS."""
    strip = np.zeros((50000, 1), np.uint8)
    strip[25000 - 300 : 25000 + 300] = 255  # a white band around the centre, 600 rows tall
    path = tmp_path / "strip.png"
    Image.fromarray(strip).save(path)
    assert path.stat().st_size < 1000
    original_resize = Image.Image.resize

    def bounded_resize(self, size, *args, **kwargs):
        assert size[0] * size[1] <= images.FULL_RESIZE_MAX_PIXELS, f"resize to {size} allocates the whole strip"
        return original_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    strip_image = load_image(path)
    x = preprocess_image(strip_image, 128)
    assert x.shape == (1, 128, 128, 3)
    # the crop covers source rows 24999.5 +- 0.5 (128 output rows per source row): inside the band
    np.testing.assert_array_equal(x, 1.0)
    notes: list[str] = []
    images.resize_and_crop(strip_image, 128, notes)
    assert len(notes) == 1 and "very elongated image (1x50000)" in notes[0]


def test_crop_only_resize_matches_the_full_resize_closely(monkeypatch):
    """Under a lowered threshold the crop-only path runs on an image whose full resize is cheap:
    same region, same filter; Pillow's float32 box and pass order leave at most a few levels."""
    yy, xx = np.mgrid[0:900, 0:6]
    smooth = (127 + 100 * np.sin(yy / 13.0) * np.cos(xx / 3.0)).astype(np.uint8)
    im = Image.fromarray(np.stack([smooth, smooth[::-1], 255 - smooth], -1))
    want = np.asarray(images.resize_and_crop(im, 64)).astype(int)  # 64x9600: full resize
    monkeypatch.setattr(images, "FULL_RESIZE_MAX_PIXELS", 64 * 64)
    notes: list[str] = []
    got = np.asarray(images.resize_and_crop(im, 64, notes)).astype(int)
    assert notes and got.shape == want.shape == (64, 64, 3)
    assert np.abs(got - want).max() <= 2 and np.abs(got - want).mean() < 0.1


# ------------------------------------------------------------------------------------------------
# 13. Typed one-line errors instead of tracebacks
# ------------------------------------------------------------------------------------------------


def test_invalid_unicode_text_is_a_typed_error(pipe):
    bad = "a cat \ud800 on a mat"  # what Python makes of undecodable argv bytes
    calls = [
        lambda: pipe.generate(bad, seed=0, steps=1, callback=never),
        lambda: pipe.generate(["fine", bad], seed=0, steps=1, callback=never),
        lambda: pipe.inpaint(IMAGE, IMAGE, bad, seed=0, steps=1, callback=never),
        lambda: pipe.extrapolate(IMAGE, [bad], ["left"], seed=0, steps=1, callback=never),
        lambda: pipe.ask(IMAGE, "what is \udcff?"),
        lambda: pipe.complete(bad, max_tokens=1),
    ]
    for call in calls:
        with pytest.raises(GenerationInputError) as e:
            call()
        assert "not valid Unicode" in one_line(e) and "U+D" in str(e.value)
    for value in (b"a cat", None, 3):
        with pytest.raises(GenerationInputError) as e:
            pipe.generate(value, seed=0, steps=1, callback=never)
        assert "must be a string" in one_line(e)
    assert check_text("un café 🚀") == "un café 🚀"


@pytest.fixture
def tokenizer_copy(converted, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        if (converted / name).exists():
            shutil.copy(converted / name, folder / name)
    return folder


@pytest.mark.parametrize("content", ['{"broken', '{"version": "1.0", "model": 42}'], ids=["truncated", "wrong-structure"])
def test_corrupt_tokenizer_is_a_one_line_error(pipe, tokenizer_copy, content):
    (tokenizer_copy / "tokenizer.json").write_text(content)
    with pytest.raises(ShowoConfigError) as e:
        Prompting(tokenizer_copy, pipe.cfg)
    assert "tokenizer" in one_line(e) and "showo convert" in str(e.value)


def test_tokenizer_special_or_huge_files_are_refused_without_reading(pipe, tokenizer_copy):
    big = tokenizer_copy / "tokenizer.json"
    with open(big, "r+b") as f:  # sparse: no disk space, 65 MB of NULs to a reader
        f.truncate(65 * 2**20)
    with pytest.raises(ShowoConfigError) as e:
        Prompting(tokenizer_copy, pipe.cfg)
    assert "not a regular tokenizer file" in one_line(e)

    big.unlink()
    os.mkfifo(big)  # reading a FIFO blocks until a writer comes: it must not be opened at all
    result = {}

    def load():
        try:
            Prompting(tokenizer_copy, pipe.cfg)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion below
            result["error"] = exc

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock the reader so the thread ends, then fail
        with open(big, "w"):
            pass
        pytest.fail("loading a tokenizer folder with a FIFO tokenizer.json blocked")
    assert isinstance(result.get("error"), ShowoConfigError), result


def test_seed_range_is_checked(pipe):
    assert check_seed(0) == 0 and check_seed(2**63 - 1) == 2**63 - 1 and check_seed(np.int64(7)) == 7
    for seed in (-1, 2**63, 2**70, 1.5, "3", True, None):
        with pytest.raises(GenerationInputError) as e:
            check_seed(seed)
        one_line(e)
    for seed in (-1, 2**63, 2**70, [1, -2], 1.5):
        with pytest.raises(GenerationInputError) as e:
            pipe.generate("a cat", seed=seed, steps=1, callback=never)
        assert "seed" in one_line(e)
    with pytest.raises(GenerationInputError) as e:  # s, s+1: the second one is out of range
        pipe.generate("a cat", seed=2**63 - 1, n=2, steps=1, callback=never)
    assert "last seed" in one_line(e)
    for call in (lambda: pipe.complete("cat", seed=-1, temperature=1.0, max_tokens=1),
                 lambda: pipe.ask(IMAGE, "what?", seed=2**64, temperature=1.0)):
        with pytest.raises(GenerationInputError) as e:
            call()
        assert "seed" in one_line(e)


# ------------------------------------------------------------------------------------------------
# 14. Nothing silently wrong
# ------------------------------------------------------------------------------------------------


def test_sampling_options_refuse_nan_inf_and_bad_values(pipe):
    # ask(temperature=nan) returned "" with no error: NaN logits sample the end token first.
    # Refused before the image is encoded (a missing image must not be what is reported).
    bad = [
        dict(temperature=NAN), dict(temperature=INF), dict(temperature=-1.0),
        dict(top_p=NAN), dict(top_p=-0.5), dict(top_p=INF), dict(top_p=1.5),
        dict(top_k=-1), dict(top_k=2.5), dict(max_tokens=0), dict(max_tokens=1.5),
    ]
    for kwargs in bad:
        with pytest.raises(GenerationInputError) as e:
            pipe.ask(REF / "no-such.png", "what is this?", **kwargs)
        one_line(e)
        with pytest.raises(GenerationInputError):
            pipe.complete("Once upon a time", **kwargs)
    with pytest.raises(GenerationInputError):
        pipe.ask(IMAGE, "what is this?", temperature=NAN, max_tokens=5)
    # top-k at or above the vocabulary keeps every token: the same as no top-k (mlx-lm refused it)
    kw = dict(temperature=1.0, seed=3, max_tokens=4)
    assert pipe.complete("Once upon a time", top_k=10**6, **kw) == pipe.complete("Once upon a time", top_k=0, **kw)


def test_mask_of_another_size_repaints_where_it_was_painted(pipe, monkeypatch):
    """A 256x128 image and a 64x64 mask whose second quarter of columns is white. Stretched to the
    image, the white is image columns 64..127 = the first half of the centre crop (columns 64..191):
    token columns 0-3, 32 tokens. Cropped on its own (the old behaviour) the mask marked token
    columns 2-3 only (16 tokens): a different place than painted."""
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (128, 256, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 16:32] = 255
    h, w = pipe.grid
    want = np.zeros((h, w), bool)
    want[:, : w // 2] = True
    np.testing.assert_array_equal(pipe.mask_region(image, Image.fromarray(mask)).reshape(h, w), want)

    prompt = "a red bus " * 80  # also over the 126-token prompt limit: truncated with a note
    encoded = {}
    original = pipe.encode_image

    def keep(img):
        encoded["codes"] = original(img)
        return encoded["codes"]

    monkeypatch.setattr(pipe, "encode_image", keep)
    out = pipe.inpaint(image, Image.fromarray(mask), prompt, seed=0, steps=1, greedy=True)
    assert out[0].extra["repainted_tokens"] == int(want.sum()) == 32
    codes = encoded["codes"][0].reshape(h, w)
    np.testing.assert_array_equal(out[0].codes.reshape(h, w)[:, w // 2 :], codes[:, w // 2 :])  # kept
    assert any("mask 64x64 resized to the image's 256x128" in n for n in pipe.notes)
    assert any("prompt truncated" in n for n in pipe.notes)
    # a mask of the image's size is used as it is (the reference's preprocessing, bit for bit)
    same = load_mask(REF / "images" / "inpaint_mask.png")
    assert fit_mask(same, same.size) is same


def _tiff(tmp_path, name, array):
    path = tmp_path / name
    Image.fromarray(array).save(path)
    return path


def test_32_bit_tiffs_are_scaled_by_their_range_with_a_true_note(tmp_path):
    ints = (np.arange(64, dtype=np.int32).reshape(8, 8) * 15625)  # 0 .. 984375, past 16 bits
    im = load_image(_tiff(tmp_path, "i32.tif", ints))
    want = np.floor(ints.astype(np.float64) * 255 / ints.max() + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(im)[..., 0], want)  # saturated at 255 before
    assert im.info[NOTES_KEY] == ["32-bit integer image scaled from its value range [0, 984375] to 8 bits"]

    floats = np.linspace(-10.0, 1000.0, 64, dtype=np.float32).reshape(8, 8)
    im = load_image(_tiff(tmp_path, "f.tif", floats))
    got = np.asarray(im)[..., 0].astype(int)
    assert got[0, 0] == 0 and got[-1, -1] == 255
    np.testing.assert_allclose(got, (floats - floats.min()) * 255 / (floats.max() - floats.min()), atol=0.51)
    assert im.info[NOTES_KEY] == ["float image scaled from its value range [-10, 1000] to 8 bits"]

    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    unit[0, 0], unit[0, 1], unit[0, 2] = NAN, INF, -INF
    im = load_image(_tiff(tmp_path, "unit.tif", unit))
    got = np.asarray(im)[..., 0]
    assert (got[0, 0], got[0, 1], got[0, 2]) == (0, 255, 0)
    np.testing.assert_array_equal(got.ravel()[3:], np.floor(unit.ravel()[3:].astype(np.float64) * 255 + 0.5))
    assert im.info[NOTES_KEY] == ["float image scaled from [0, 1] to 8 bits; 3 NaN/infinite pixels (NaN and -inf as black, +inf as white)"]


def test_32_bit_pil_images_given_to_the_pipeline_are_not_clipped(pipe):
    """The pipeline brought PIL images to RGB with Image.convert, which clips mode I/F at 255."""
    ints = np.arange(64, dtype=np.int32).reshape(8, 8) * 15625  # 0 .. 984,375
    pipe.notes = []
    got = np.asarray(pipe._pil(Image.fromarray(ints)))
    scaled = np.floor(ints.astype(np.float64) * 255 / ints.max() + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(got, np.stack([scaled] * 3, -1))
    assert pipe.notes == ["32-bit integer image scaled from its value range [0, 984375] to 8 bits"]


def test_decompression_bomb_warning_becomes_a_note_and_the_error_names_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warned = _tiff(tmp_path, "big.png", np.zeros((40, 40), np.uint8))  # 1600 px: warning range
    refused = _tiff(tmp_path, "bigger.png", np.zeros((50, 50), np.uint8))  # 2500 px > 2 x 1000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        im = load_image(warned)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert im.info[NOTES_KEY] == [
        "large image: 40x40 = 1,600 pixels, over Pillow's 1,000-pixel decompression-bomb warning limit "
        "(decoded anyway; the hard limit is 2,000)"
    ]
    with pytest.raises(ImageInputError) as e:
        load_image(refused)
    assert "2000 pixels" in one_line(e) and "downscale" in str(e.value) and "MAX_IMAGE_PIXELS" in str(e.value)
