"""Image loading, reference-exact preprocessing (tests/fixtures/reference/preprocess.npz), mask
downsampling, uint8 conversion and PNG saving."""

from __future__ import annotations

import io
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from showo_mlx.errors import ImageInputError
from showo_mlx.images import (
    NOTES_KEY,
    bicubic_resize,
    load_image,
    load_mask,
    mask_to_grid,
    mask_tokens,
    preprocess_image,
    preprocess_mask,
    read_png_metadata,
    resize_and_crop,
    save_png,
    to_uint8,
)

FIX = Path(__file__).parent / "fixtures" / "reference"
IMAGES = FIX / "images"


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIX / "preprocess.npz") as f:
        return {k: f[k] for k in f.files}


# ---------------------------------------------------------------------------------------------------
# Preprocessing parity
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", [0, 1])
def test_preprocess_matches_reference(ref, i):
    x = preprocess_image(load_image(IMAGES / f"preprocess_in_{i}.png"), 128)
    assert x.shape == (1, 128, 128, 3) and x.dtype == np.float32
    err = np.abs(x[0] - ref[f"image_{i}"].transpose(1, 2, 0)).max()
    assert err <= 1e-6, err  # measured 0 (bit-identical)


def test_resize_sizes_and_crop_rounding():
    # 190x257 -> short side 128, long int(128*257/190) = 173; crop top = round(22.5) = 22 (half-even)
    arr = np.zeros((257, 190, 3), np.uint8)
    arr[:, :, 0] = np.arange(257)[:, None] % 256
    im = Image.fromarray(arr)
    out = resize_and_crop(im, 128)
    assert out.size == (128, 128)
    resized = np.asarray(im.resize((128, 173), Image.BICUBIC))
    np.testing.assert_array_equal(np.asarray(out), resized[22:150])
    # landscape, odd margin: 300x200 -> 192x128, left = round(32.0) = 32
    assert resize_and_crop(Image.new("RGB", (300, 200)), 128).size == (128, 128)


def test_preprocess_identity_size_is_plain_scaling():
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = preprocess_image(arr, 32)
    np.testing.assert_array_equal(x[0], (arr.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5))


def test_magvit_inputs_match_fixture():
    with np.load(FIX / "magvit.npz") as f:
        pixels = f["pixels_in"]
    for i in range(2):
        x = preprocess_image(load_image(IMAGES / f"magvit_in_{i}.png"), 128)
        np.testing.assert_array_equal(x[0], pixels[i].transpose(1, 2, 0))


# ---------------------------------------------------------------------------------------------------
# Inpainting mask
# ---------------------------------------------------------------------------------------------------


def test_mask_pipeline_matches_reference(ref):
    m = preprocess_mask(load_mask(IMAGES / "inpaint_mask.png"), 128)
    assert m.shape == (1, 128, 128, 1)
    assert np.abs(m[0] - ref["mask"].transpose(1, 2, 0)).max() <= 1e-6
    interp = mask_to_grid(m, (8, 8))
    err = np.abs(interp - ref["mask_interp"][:, 0]).max()
    assert err <= 1e-6, err  # measured 1.2e-07
    np.testing.assert_array_equal(mask_tokens(m, (8, 8)), ref["mask_tokens"])


def test_bicubic_factor16_is_the_fixed_block_centre_filter():
    rng = np.random.default_rng(1)
    x = rng.random((2, 64, 48))
    got = bicubic_resize(x, (4, 3))
    w = np.array([-0.09375, 0.59375, 0.59375, -0.09375])
    for i in range(4):
        for j in range(3):
            block = x[:, 16 * i + 6 : 16 * i + 10, 16 * j + 6 : 16 * j + 10]
            want = np.einsum("r,brc,c->b", w, block, w)
            np.testing.assert_allclose(got[:, i, j], want, rtol=0, atol=1e-6)


def test_bicubic_general_factor_properties():
    # rows of the interpolation sum to one (constants are kept); edges are clamped, not zero-padded
    np.testing.assert_allclose(bicubic_resize(np.full((1, 37, 23), 0.7), (5, 9)), 0.7, atol=1e-6)
    ramp = np.tile(np.arange(8.0), (8, 1))[None]
    up = bicubic_resize(ramp, (8, 16))[0, 0]
    # x2 upsampling, first column: source -0.25 -> index -1, t = 0.75; taps -2..1 clamp to values
    # (0, 0, 0, 1), so the result is the far weight W(1.25) = -0.10546875 (A = -0.75 overshoot)
    assert up[0] == pytest.approx(-0.10546875, abs=1e-7)
    # factor 2, t = 0.5: taps at 2i-1..2i+2 (clamped at the border)
    x = np.arange(8.0)[None, None, :].repeat(2, axis=1)
    got = bicubic_resize(x, (2, 4))[0, 0]
    w = np.array([-0.09375, 0.59375, 0.59375, -0.09375])
    xi = np.arange(8.0)
    want = [w @ xi[np.clip([2 * j - 1, 2 * j, 2 * j + 1, 2 * j + 2], 0, 7)] for j in range(4)]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_mask_threshold_is_inclusive():
    m = np.full((1, 32, 32, 1), 0.5, np.float32)
    assert mask_tokens(m, (2, 2)).all()
    assert not mask_tokens(m - 1e-3, (2, 2)).any()


# ---------------------------------------------------------------------------------------------------
# uint8 output
# ---------------------------------------------------------------------------------------------------


def test_to_uint8_truncates_and_clamps():
    x = np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0], np.float32)
    # (0 + 1) / 2 * 255 = 127.5 -> 127 (truncation, not rounding)
    assert to_uint8(x).tolist() == [0, 0, 127, 254, 255, 255]
    assert to_uint8(mx.array(x)).tolist() == to_uint8(x).tolist()


# ---------------------------------------------------------------------------------------------------
# Loading arbitrary images
# ---------------------------------------------------------------------------------------------------


def _save(tmp_path: Path, name: str, im: Image.Image, **kw) -> Path:
    p = tmp_path / name
    im.save(p, **kw)
    return p


def test_rgba_alpha_drop_and_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200  # red-ish colour under full transparency
    arr[:2, ..., 3] = 255
    p = _save(tmp_path, "a.png", Image.fromarray(arr, "RGBA"))
    dropped = load_image(p)
    assert dropped.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(dropped), arr[..., :3])  # the reference's convert("RGB")
    assert any("alpha" in n for n in dropped.info[NOTES_KEY])
    white = np.asarray(load_image(p, alpha="white"))
    np.testing.assert_array_equal(white[:2], arr[:2, :, :3])
    np.testing.assert_array_equal(white[2:], 255)


def test_palette_grey_and_16bit(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    got = load_image(_save(tmp_path, "p.png", pal))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(pal.convert("RGB")))

    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    g = np.asarray(load_image(_save(tmp_path, "g.png", grey)))
    assert g.shape == (8, 8, 3)
    np.testing.assert_array_equal(g[..., 1], np.asarray(grey))

    a16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040).astype(np.uint16)
    im16 = load_image(_save(tmp_path, "g16.png", Image.fromarray(a16)))
    want = (a16.astype(np.int64) * 255 + 32767) // 65535  # rescaled, not clipped at 255
    np.testing.assert_array_equal(np.asarray(im16)[..., 0], want)
    assert any("16" in n for n in im16.info[NOTES_KEY])


def test_exif_orientation_applied(tmp_path):
    arr = np.random.default_rng(3).integers(0, 256, (2, 4, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = _save(tmp_path, "o.png", Image.fromarray(arr), exif=exif)
    got = load_image(p)
    assert got.size == (2, 4)
    np.testing.assert_array_equal(np.asarray(got), np.rot90(arr, k=-1))
    assert any("EXIF" in n for n in got.info[NOTES_KEY])


def test_mask_from_rgb_file(tmp_path):
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, 8:] = 255
    m = load_mask(_save(tmp_path, "m.png", Image.fromarray(arr)))
    assert m.mode == "L"
    assert mask_tokens(preprocess_mask(m, 16), (1, 2)).tolist() == [[False, True]]


def _assert_one_line_error(path, match):
    with pytest.raises(ImageInputError, match=match) as e:
        load_image(path)
    assert "\n" not in str(e.value)


def test_bad_images(tmp_path):
    _assert_one_line_error(tmp_path / "missing.png", "no such file")
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n" * 10)
    _assert_one_line_error(text, "not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    _assert_one_line_error(empty, "empty")
    data = (IMAGES / "magvit_in_0.png").read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(cut, "truncated")
    _assert_one_line_error(tmp_path, "directory")


# ---------------------------------------------------------------------------------------------------
# PNG writing
# ---------------------------------------------------------------------------------------------------


def test_save_png_roundtrip_with_metadata(tmp_path):
    img = np.random.default_rng(4).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    meta = {"prompt": "un café à Tōkyō 🚀", "seed": 7, "guidance": 1.75, "model": "showlab/show-o"}
    dest = tmp_path / "sub" / "out.png"
    assert save_png(img, dest, meta) == dest
    np.testing.assert_array_equal(np.asarray(Image.open(dest)), img)
    assert read_png_metadata(dest) == {k: str(v) for k, v in meta.items()}
    assert sorted(os.listdir(dest.parent)) == ["out.png"]  # no temporary file left behind
    # overwrite in place
    save_png(img[:4], dest, {"seed": 8})
    assert read_png_metadata(dest) == {"seed": "8"}
    assert Image.open(dest).size == (12, 4)


def test_save_png_failure_leaves_no_temp(tmp_path):
    with pytest.raises(ValueError):
        save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.png", {"": "empty key"})
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError):
        save_png(np.zeros((4, 4, 3), np.float32), tmp_path / "y.png")


def test_save_png_of_decoder_output(tmp_path):
    pixels = np.linspace(-1.2, 1.2, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    u8 = to_uint8(pixels)
    p = save_png(u8[1], tmp_path / "d.png", {})
    np.testing.assert_array_equal(np.asarray(Image.open(p)), u8[1])
    buf = io.BytesIO(p.read_bytes())
    assert Image.open(buf).format == "PNG"
