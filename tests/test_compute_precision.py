"""Compute precision per backend: on MLX's CPU backend a float16 or quantized folder computes in
float32 unless --dtype says otherwise (with one line saying so); on Metal the stored precision is
kept."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from conftest import load_npz
from showo_mlx.cli import app
from showo_mlx.convert import QuantizeSpec, convert
from showo_mlx.loading import read_model_config
from showo_mlx.pipeline import Pipeline

T = load_npz("transformer")
pytestmark = pytest.mark.skipif(mx.default_device().type != mx.DeviceType.cpu,
                                reason="the float32 default applies to MLX's CPU backend only")


@pytest.fixture(scope="module")
def half(converted, tmp_path_factory):
    """The fixture model stored in float16 (MAGVIT too), written from the converted folder."""
    return convert(converted, tmp_path_factory.mktemp("f16") / "m", dtype="float16", vq_dtype="float16", log=lambda m: None)


@pytest.fixture(scope="module")
def q4(converted, tmp_path_factory):
    """The fixture model with 4-bit weights (float16 scales, float16 MAGVIT), as `convert -q` writes it."""
    return convert(converted, tmp_path_factory.mktemp("q4") / "m", quantize=QuantizeSpec(bits=4), log=lambda m: None)


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(T["t2i.input_ids"][:1]), mask=mx.array(T["t2i.allowed"][:1, None])).astype(mx.float32))


def dtypes(model) -> set:
    return {v.dtype for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}


def quantized_layers(model) -> int:
    return sum(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def test_float16_folder_computes_in_float32_on_the_cpu(half):
    notes: list[str] = []
    pipe = Pipeline(half, log=notes.append)
    assert dtypes(pipe.model) == {mx.float32} and pipe.vq_dtype == "float32" and pipe.compute_dtype == "float32"
    [note] = notes
    assert "float16 weights" in note and "float32" in note and "--dtype float16" in note
    # the same numbers as the stored float16 weights cast by hand: nothing but the precision changed
    stored = Pipeline(half, dtype="float16")
    assert dtypes(stored.model) == {mx.float16} and stored.vq_dtype is None  # --dtype overrides, MAGVIT as stored
    cast = Pipeline(half, dtype="float32")
    np.testing.assert_array_equal(logits(pipe.model), logits(cast.model))


def test_quantized_folder_is_dequantized_on_the_cpu_unless_dtype_is_given(q4):
    notes: list[str] = []
    pipe = Pipeline(q4, log=notes.append)
    assert quantized_layers(pipe.model) == 0 and dtypes(pipe.model) == {mx.float32}
    [note] = notes
    assert "4-bit weights" in note and "dequantizes them to float32" in note
    explicit16 = Pipeline(q4, dtype="float16", log=notes.append)
    explicit32 = Pipeline(q4, dtype="float32", log=notes.append)
    assert len(notes) == 1  # an explicit --dtype is obeyed silently
    n = quantized_layers(explicit16.model)
    assert n > 0 and quantized_layers(explicit32.model) == n
    assert dtypes(explicit16.model) == {mx.float16} and dtypes(explicit32.model) == {mx.float32}
    # dequantized float32 = the 4-bit weights with float32 activations (same weights, float32 math)
    np.testing.assert_allclose(logits(pipe.model), logits(explicit32.model), atol=1e-5)


def test_metal_keeps_the_stored_precision(q4, half):
    from showo_mlx.loading import compute_plan

    for folder in (q4, half):
        config = read_model_config(folder)
        plan = compute_plan(config, cpu=False)
        assert (plan.dtype, plan.dequantize, plan.vq_dtype, plan.note) == (None, False, None, None)
        assert compute_plan(config, "float16", cpu=True).dtype == "float16"
    assert compute_plan(read_model_config(q4), cpu=True).dequantize


def test_cli_says_so_once(q4, pipe):
    r = CliRunner().invoke(app, ["complete", "a red cat", "--max-tokens", "6", "--model", str(q4)])
    assert r.exit_code == 0, r.output
    assert sum("dequantizes them to float32" in line for line in r.stderr.splitlines()) == 1
    r = CliRunner().invoke(app, ["complete", "a red cat", "--max-tokens", "6", "--model", str(q4), "--dtype", "float16"])
    assert r.exit_code == 0 and "dequantizes" not in r.stderr
