"""MAGVIT-v2 against the official reference fixtures (tests/fixtures/reference/magvit.npz).

The fixture model is the official architecture at small width (ch 32, 6-bit codebook, 16x
downsampling); every comparison is NHWC here and NCHW in the fixture, hence the transposes."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

from showo_mlx.config import MagvitConfig
from showo_mlx.errors import CheckpointError
from showo_mlx.images import to_uint8
from showo_mlx.magvit import MagvitV2, load_magvit_folder, load_magvit_weights, sanitize_magvit_weights

FIX = Path(__file__).parent / "fixtures" / "reference"
MAGVIT_DIR = FIX / "magvitv2"


def nhwc(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIX / "magvit.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def config() -> MagvitConfig:
    return MagvitConfig.from_hub_dict(json.loads((MAGVIT_DIR / "config.json").read_text()))


@pytest.fixture(scope="module")
def official_weights() -> dict[str, np.ndarray]:
    return load_file(str(MAGVIT_DIR / "pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def weights(official_weights) -> dict[str, np.ndarray]:
    return sanitize_magvit_weights(official_weights)


def build(config: MagvitConfig, weights, dtype=mx.float32, with_encoder=True) -> MagvitV2:
    return load_magvit_weights(MagvitV2(config, with_encoder=with_encoder), weights, dtype)


@pytest.fixture(scope="module")
def model(config, weights) -> MagvitV2:
    return build(config, weights)


DECODE_CASES = [
    ("codes", "decoded", None),
    ("random_codes", "random_decoded", None),
    ("nonsquare_codes", "nonsquare_decoded", (6, 10)),
]


# ---------------------------------------------------------------------------------------------------
# Weights and construction
# ---------------------------------------------------------------------------------------------------


def test_config_from_fixture(config):
    assert config.codebook_bits == 6 and config.codebook_size == 64
    assert config.downsample_factor == 16
    assert config.encoder.ch == 32 and config.decoder.num_res_blocks == (1, 1, 1, 2, 1)


def test_sanitize_drops_buffers_and_transposes_convs(official_weights, weights):
    assert not any(k.startswith("quantize.") for k in weights)
    assert len(weights) == len(official_weights) - 2  # embedding + power_vals
    w = official_weights["encoder.conv_in.weight"]  # OIHW (32, 3, 3, 3)
    np.testing.assert_array_equal(weights["encoder.conv_in.weight"], w.transpose(0, 2, 3, 1))
    assert weights["decoder.up.3.block.0.nin_shortcut.weight"].shape == (32, 1, 1, 64)
    assert weights["decoder.norm_out.weight"].shape == (32,)


def test_parameter_names_match_official(config, weights):
    names = {k for k, _ in tree_flatten(MagvitV2(config).parameters())}
    assert names == set(weights)


def test_default_config_matches_official_sizes():
    """The full-size architecture has the official 380 trainable tensors (the official MAGVITv2 state_dict: 382
    tensors and 95,493,513 elements including the 8192x13 + 13 quantizer buffers)."""
    params = dict(tree_flatten(MagvitV2(MagvitConfig()).parameters()))
    assert len(params) == 380
    assert sum(v.size for v in params.values()) == 95_493_513 - 8192 * 13 - 13
    assert params["encoder.conv_in.weight"].shape == (128, 3, 3, 3)
    assert params["encoder.down.3.block.0.nin_shortcut.weight"].shape == (512, 1, 1, 256)
    assert params["encoder.conv_out.weight"].shape == (13, 3, 3, 512)
    assert params["decoder.conv_in.weight"].shape == (512, 3, 3, 13)
    assert params["decoder.up.1.block.0.nin_shortcut.weight"].shape == (128, 1, 1, 256)
    assert params["decoder.up.4.upsample.conv.weight"].shape == (512, 3, 3, 512)
    assert "decoder.up.0.upsample.conv.weight" not in params
    assert "encoder.down.4.downsample.conv.weight" not in params
    assert len([k for k in params if k.startswith("decoder.up.3.block.") and k.endswith("conv1.weight")]) == 4


def test_mismatched_weights_raise(config, weights):
    bad = dict(weights)
    bad.pop("decoder.conv_out.bias")
    with pytest.raises(CheckpointError):
        build(config, bad)
    wrong = dict(weights)
    wrong["decoder.conv_in.weight"] = np.zeros((64, 6, 3, 3), np.float32)  # OIHW, not sanitized
    with pytest.raises(CheckpointError):
        build(config, wrong)


def test_load_official_folder_and_converted_folder(tmp_path, model, ref):
    official = load_magvit_folder(MAGVIT_DIR, with_encoder=False)
    assert not official.has_encoder
    # A converted folder: our config.json + model.safetensors with our names (OHWI).
    conv = tmp_path / "magvit"
    conv.mkdir()
    (conv / "config.json").write_text(json.dumps(model.config.to_dict()))
    mx.save_safetensors(str(conv / "model.safetensors"), dict(tree_flatten(model.parameters())))
    converted = load_magvit_folder(conv)
    codes = mx.array(ref["codes"])
    want = np.array(model.decode(codes))
    np.testing.assert_array_equal(np.array(official.decode(codes)), want)
    np.testing.assert_array_equal(np.array(converted.decode(codes)), want)
    assert np.array_equal(np.array(converted.encode(mx.array(nhwc(ref["pixels_in"])))), ref["codes"])


def test_load_folder_errors(tmp_path, model):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    with pytest.raises(CheckpointError, match="not found"):
        load_magvit_folder(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors: safetensors header is truncated or corrupt") as e:
        load_magvit_folder(folder)
    assert "\n" not in str(e.value)


def test_decoder_only_cannot_encode(config, weights):
    dec = build(config, weights, with_encoder=False)
    assert not any(k.startswith("encoder.") for k, _ in tree_flatten(dec.parameters()))
    with pytest.raises(RuntimeError, match="decoder-only"):
        dec.encode(mx.zeros((1, 32, 32, 3)))


# ---------------------------------------------------------------------------------------------------
# LFQ
# ---------------------------------------------------------------------------------------------------


def test_lfq_bit_order_and_zero(model):
    z = np.full((1, 1, 4, 6), -1.0, np.float32)
    z[0, 0, 0, 0] = 0.5  # channel 0 -> most significant bit
    z[0, 0, 1, 5] = 2.0  # last channel -> 1
    z[0, 0, 2, :] = 0.0  # exact zero -> bit 0
    z[0, 0, 3, :] = 1e-30
    codes = np.array(model.quantize(mx.array(z)))
    assert codes.tolist() == [[32, 1, 0, 63]]


def test_codebook_entry_exact(model, ref):
    got = np.array(model.codebook_entry(mx.array(ref["codes"])))
    np.testing.assert_array_equal(got, nhwc(ref["codebook_entry"]))
    all_codes = mx.arange(64)[None]
    entries = np.array(model.codebook_entry(all_codes, shape=(8, 8))).reshape(64, 6)
    np.testing.assert_array_equal(np.array(model.quantize(mx.array(entries.reshape(1, 8, 8, 6))))[0], np.arange(64))


def test_grid_shape_errors(model):
    with pytest.raises(ValueError, match="shape"):
        model.codebook_entry(mx.zeros((1, 60), dtype=mx.int32))
    with pytest.raises(ValueError):
        model.codebook_entry(mx.zeros((1, 60), dtype=mx.int32), shape=(7, 9))


def test_decode_clamps_codes(model):
    a = np.array(model.decode(mx.array([[-5] * 63 + [1000]])))
    b = np.array(model.decode(mx.array([[0] * 63 + [63]])))
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Fixture parity (float32)
# ---------------------------------------------------------------------------------------------------


def test_encoder_latents(model, ref):
    got = np.array(model.encode_latents(mx.array(nhwc(ref["pixels_in"]))))
    err = np.abs(got - nhwc(ref["encoder_out"])).max()
    # measured 7.2e-06 (float32 rounding; the codes' smallest |latent| margin is 8.7e-4)
    assert err < 1e-4, err


def test_encode_codes_exact(model, ref):
    codes = model.encode(mx.array(nhwc(ref["pixels_in"])))
    assert codes.dtype == mx.int32
    np.testing.assert_array_equal(np.array(codes), ref["codes"])


def test_encode_rejects_nchw(model, ref):
    with pytest.raises(ValueError, match="NCHW"):
        model.encode(mx.array(ref["pixels_in"]))


@pytest.mark.parametrize("codes_key,out_key,shape", DECODE_CASES)
def test_decode_float32(model, ref, codes_key, out_key, shape):
    got = np.array(model.decode(mx.array(ref[codes_key]), shape=shape))
    want = nhwc(ref[out_key])
    assert got.shape == want.shape and got.dtype == np.float32
    err = np.abs(got - want).max()
    assert err <= 1e-4, err  # measured 9.9e-06 / 1.2e-05 / 1.0e-05


def test_decode_uint8(model, ref):
    got = to_uint8(model.decode(mx.array(ref["codes"])))
    diff = np.abs(got.astype(np.int16) - ref["decoded_uint8"].astype(np.int16))
    assert diff.max() <= 1
    # the stored float decode goes through the same rule bit-exactly
    np.testing.assert_array_equal(to_uint8(nhwc(ref["decoded"])), ref["decoded_uint8"])


def test_reconstruction_call(model, ref):
    out = np.array(model(mx.array(nhwc(ref["pixels_in"]))))
    np.testing.assert_allclose(out, nhwc(ref["decoded"]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Half precision
# ---------------------------------------------------------------------------------------------------

# Measured max / mean abs error of decode vs the float32 reference on the three fixture cases
# (codes, random_codes, nonsquare 6x10), outputs spanning [-1.7, 3.4]:
#   float16 : max 0.0105 / 0.0102 / 0.0094, mean 0.0013 / 0.0011 / 0.0011
#   bfloat16: max 0.104  / 0.119  / 0.088,  mean 0.0107 / 0.0090 / 0.0096
# Bounds: 64 unit roundoffs of each format (fp16 u = 2^-11, bf16 u = 2^-8) for the max error, i.e.
# 0.031 and 0.25, about 2-3x the measured values; the mean bounds are 8 u (0.0039, 0.031). bf16 has
# 3 fewer mantissa bits than fp16, and its errors are ~8-10x larger, as expected.
HALF_BOUNDS = {
    "float16": (64 * 2.0**-11, 8 * 2.0**-11),
    "bfloat16": (64 * 2.0**-8, 8 * 2.0**-8),
}


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_decode_half_precision(config, weights, ref, dtype_name):
    dtype = getattr(mx, dtype_name)
    dec = build(config, weights, dtype=dtype, with_encoder=False)
    assert dec.dtype == dtype
    max_bound, mean_bound = HALF_BOUNDS[dtype_name]
    for codes_key, out_key, shape in DECODE_CASES:
        got = np.array(dec.decode(mx.array(ref[codes_key]), shape=shape))
        assert got.dtype == np.float32
        err = np.abs(got - nhwc(ref[out_key]))
        assert err.max() <= max_bound, (out_key, err.max())
        assert err.mean() <= mean_bound, (out_key, err.mean())
