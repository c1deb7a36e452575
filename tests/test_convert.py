"""Conversion: both official formats, safety, atomicity, quantization."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import torch_format as tf
from conftest import REF, load_npz
from showo_mlx import convert as conv
from showo_mlx.convert import QuantizeSpec, convert
from showo_mlx.errors import CheckpointError, ShowoError, UnsafeOutputError
from showo_mlx.loading import load_transformer, read_model_config

T = load_npz("transformer")
QUIET = dict(vq=REF / "magvitv2", tokenizer=REF / "tokenizer", log=lambda m: None)


def official_folder(tmp_path: Path, weights_file: str) -> Path:
    src = tmp_path / f"src-{weights_file}"
    src.mkdir()
    shutil.copy(REF / "showo" / "config.json", src / "config.json")
    shutil.copy(REF / "showo" / weights_file, src / weights_file)
    return src


def transformer_weights(folder: Path) -> dict[str, np.ndarray]:
    files = read_model_config(folder)["files"]["transformer"]
    out = {}
    for f in files:
        out.update({k: np.array(v) for k, v in mx.load(str(folder / f)).items()})
    return out


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(T["t2i.input_ids"]), mask=mx.array(T["t2i.allowed"][:, None])).astype(mx.float32))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_bin_and_safetensors_convert_to_identical_weights(tmp_path, converted):
    dst = tmp_path / "from-bin"
    convert(official_folder(tmp_path, "pytorch_model.bin"), dst, **QUIET)
    a, b = transformer_weights(dst), transformer_weights(converted)
    assert sorted(a) == sorted(b) and len(a) == 41
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (dst / "magvit.safetensors").exists() and (dst / "tokenizer.json").exists()


def test_sharded_output_loads_back(tmp_path, monkeypatch, converted):
    monkeypatch.setattr(conv, "SHARD_BYTES", 400_000)
    dst = tmp_path / "sharded"
    convert(REF / "showo", dst, **QUIET)
    files = read_model_config(dst)["files"]["transformer"]
    assert len(files) > 1 and (dst / "model.safetensors.index.json").exists()
    np.testing.assert_array_equal(logits(load_transformer(dst)), logits(load_transformer(converted)))


def test_malicious_bin_is_refused_and_never_runs(tmp_path):
    src = tmp_path / "evil"
    src.mkdir()
    shutil.copy(REF / "showo" / "config.json", src / "config.json")
    marker = tmp_path / "pwned"
    tf.save_malicious_torch(src / "pytorch_model.bin", marker)
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        convert(src, dst, **QUIET)
    assert "refusing" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists(), "the pickle payload ran"
    assert not dst.exists()


@pytest.mark.parametrize("weights_file", ["pytorch_model.bin", "pytorch_model.safetensors"])
def test_truncated_input_gives_one_line_and_no_output(tmp_path, weights_file):
    src = official_folder(tmp_path, weights_file)
    path = src / weights_file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        convert(src, dst, **QUIET)
    assert "\n" not in str(e.value) and weights_file in str(e.value)
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary folder left behind"


def test_existing_destination_needs_force(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    with pytest.raises(ShowoError, match="--force"):
        convert(REF / "showo", dst, **QUIET)
    assert (dst / "keep.txt").read_text() == "user data"
    # --force replaces only a previous conversion (or an empty folder), never a folder of user data
    with pytest.raises(UnsafeOutputError, match="only replaces an empty folder or one written by `showo convert`"):
        convert(REF / "showo", dst, force=True, **QUIET)
    assert (dst / "keep.txt").read_text() == "user data"
    (dst / "keep.txt").unlink()
    convert(REF / "showo", dst, force=True, **QUIET)  # empty: replaced
    (dst / "extra.txt").write_text("left by the user in a converted folder")
    convert(REF / "showo", dst, force=True, **QUIET)  # a previous conversion: replaced
    assert not (dst / "extra.txt").exists() and (dst / "model.safetensors").exists()


def test_wrong_shapes_are_refused_by_name(tmp_path):
    src = official_folder(tmp_path, "pytorch_model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["llm_config"]["intermediate_size"] = 512
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="fc1"):
        convert(src, tmp_path / "out", **QUIET)


# Measured 2026-11-26 (Linux CPU, mlx 0.32.4) on the fixture model (random Gaussian weights, harder
# to quantize than trained ones), t2i CFG batch, relative L2 error of the logits vs float32, group 64:
# 8-bit 0.0083, 4-bit 0.158 (19× worse: 2^4 coarser steps), 4-bit + 8-bit embedding/head 0.158,
# 8-bit everywhere 0.011. Bounds: about 2× the measurements.
@pytest.mark.parametrize("bits,head_bits,bound", [(8, None, 0.02), (4, None, 0.35), (4, 8, 0.35), (8, 8, 0.025)])
def test_quantized_logits_error_and_round_trip(tmp_path, converted, bits, head_bits, bound):
    spec = QuantizeSpec(bits=bits, group_size=64, head_bits=head_bits)
    reference = logits(load_transformer(converted))
    in_memory = load_transformer(converted, quantize=spec)  # quantized at load time
    dst = tmp_path / f"q{bits}"
    convert(REF / "showo", dst, dtype="float32", quantize=spec, **QUIET)  # as `converted`
    block = read_model_config(dst)["quantization"]
    assert block["bits"] == bits and block["group_size"] == 64
    reloaded = load_transformer(dst)
    np.testing.assert_array_equal(logits(reloaded), logits(in_memory))
    assert rel_err(logits(reloaded), reference) <= bound


def test_eight_bits_are_far_tighter_than_four(converted):
    reference = logits(load_transformer(converted))
    errors = {b: rel_err(logits(load_transformer(converted, quantize=QuantizeSpec(bits=b))), reference) for b in (8, 4)}
    assert errors[8] * 8 < errors[4], errors


def test_quantized_files_shrink_as_expected(tmp_path, converted):
    weights = transformer_weights(converted)
    matrices = sum(v.size for v in weights.values() if v.ndim == 2)
    others = sum(v.nbytes for v in weights.values() if v.ndim != 2)  # LayerNorms and biases stay float32
    full = (converted / "model.safetensors").stat().st_size
    sizes = {}
    for bits in (8, 4):
        dst = tmp_path / f"q{bits}"
        convert(REF / "showo", dst, dtype="float32", quantize=QuantizeSpec(bits=bits, head_bits=bits), **QUIET)
        payload = sum(v.nbytes for v in mx.load(str(dst / "model.safetensors")).values())
        # affine quantization: bits/8 bytes per weight + a float32 scale and bias per group of 64
        assert payload == matrices * bits // 8 + matrices // 64 * 8 + others
        sizes[bits] = (dst / "model.safetensors").stat().st_size
        assert sizes[bits] - payload < 32_000  # the safetensors JSON header
    assert sizes[4] < sizes[8] < full / 2.5


def test_bad_quantization_settings(tmp_path):
    for spec in (QuantizeSpec(bits=7), QuantizeSpec(group_size=48), QuantizeSpec(head_bits=1)):
        with pytest.raises(ShowoError):
            convert(REF / "showo", tmp_path / "out", quantize=spec, **QUIET)
    assert not (tmp_path / "out").exists()
