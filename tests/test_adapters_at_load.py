"""LoRA adapters applied at load time (`load(..., adapter_path=)`, `--adapter-path`) give the fused
model's outputs; `showo fuse` accepts mlx-lm's --model/--adapter-path/--save-path."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_unflatten
from PIL import Image
from typer.testing import CliRunner

from conftest import load_npz
from showo_mlx.cli import app
from showo_mlx.errors import ShowoError
from showo_mlx.images import read_png_metadata
from showo_mlx.pipeline import Pipeline

T = load_npz("transformer")
runner = CliRunner()


@pytest.fixture(scope="module")
def adapters(converted, tmp_path_factory):
    """Adapters as `showo train --lora` saves them, with random (non-zero) matrices."""
    from showo_mlx.loading import load_transformer
    from showo_mlx.train.checkpoint import model_fingerprint
    from showo_mlx.train.lora import adapter_config, adapter_weights, apply_lora, save_adapters

    model = load_transformer(converted)
    fingerprint = model_fingerprint(model)
    keys = ["self_attn.q_proj", "self_attn.v_proj", "mlp.fc1", "lm_head"]
    mx.random.seed(3)
    apply_lora(model, rank=4, scale=2.0, dropout=0.0, keys=keys)
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.05) for k, v in adapter_weights(model).items()]))
    config = adapter_config(rank=4, scale=2.0, dropout=0.0, keys=keys, num_layers=-1,
                            base={"model": str(converted), "fingerprint": fingerprint, "quantize_at_load": None})
    return save_adapters(tmp_path_factory.mktemp("run") / "adapters", model, config)


@pytest.fixture(scope="module")
def fused(converted, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "model"
    r = runner.invoke(app, ["fuse", "--model", str(converted), "--adapter-path", str(adapters), "--save-path", str(out)])
    assert r.exit_code == 0, r.output
    return out


def logits(model) -> np.ndarray:
    """The fixture's first CFG row (a t2i prompt and image tokens, omni-attention mask)."""
    return np.array(model(mx.array(T["t2i.input_ids"][:1]), mask=mx.array(T["t2i.allowed"][:1, None])))


def test_adapter_path_equals_the_fused_model(converted, adapters, fused, pipe):
    with_lora = Pipeline(converted, adapter_path=adapters)
    baked = Pipeline(fused)
    want = logits(baked.model)
    np.testing.assert_allclose(logits(with_lora.model), want, atol=1e-5)
    assert np.abs(want - logits(pipe.model)).max() > 1e-2  # the adapters change the model
    assert with_lora.complete("a red cat", max_tokens=6) == baked.complete("a red cat", max_tokens=6)
    # (greedy images: test_cli_adapter_path_paints_what_the_fused_model_paints)

    # adapter_scale multiplies the trained scale: 0 is the base model, 0.5 lies in between
    base = logits(pipe.model)
    off = Pipeline(converted, adapter_path=adapters, adapter_scale=0.0)
    np.testing.assert_array_equal(logits(off.model), base)
    half = logits(Pipeline(converted, adapter_path=adapters, adapter_scale=0.5).model)
    assert 1e-3 < np.abs(half - base).max() < np.abs(want - base).max()


def test_adapter_scale_must_be_finite_and_have_adapters(converted, adapters):
    with pytest.raises(ShowoError, match="needs --adapter-path"):
        Pipeline(converted, adapter_scale=0.5)
    with pytest.raises(ShowoError, match="finite"):
        Pipeline(converted, adapter_path=adapters, adapter_scale=float("nan"))


def test_cli_adapter_path_paints_what_the_fused_model_paints(converted, adapters, fused, tmp_path):
    common = ["generate", "a red cat", "--greedy", "--steps", "2"]
    r = runner.invoke(app, [*common, "--model", str(converted), "--adapter-path", str(adapters), "-o", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*common, "--model", str(fused), "-o", str(tmp_path / "f.png")])
    assert r.exit_code == 0, r.output
    a, f = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "f.png"))
    assert np.array_equal(a, f)
    meta = read_png_metadata(tmp_path / "a.png")
    assert meta["adapters"] == str(adapters) and meta["adapter_scale"] == "1.0"


def test_adapter_errors_are_one_line(converted, adapters, fused, tmp_path):
    r = runner.invoke(app, ["complete", "hi", "--model", str(converted), "--adapter-path", str(tmp_path / "none")])
    assert r.exit_code == 2 and "not a folder" in r.stderr
    r = runner.invoke(app, ["complete", "hi", "--model", str(fused), "--adapter-path", str(adapters)])
    assert r.exit_code == 2 and "trained on another base model" in r.stderr
    r = runner.invoke(app, ["fuse", str(converted), "--adapter-path", str(adapters)])
    assert r.exit_code == 2 and "missing OUT (or --save-path)" in r.stderr
    r = runner.invoke(app, ["fuse", str(converted), str(adapters), str(tmp_path / "o"), "--model", str(fused)])
    assert r.exit_code == 2 and "MODEL is given twice" in r.stderr and not (tmp_path / "o").exists()
