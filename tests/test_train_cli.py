"""`showo prepare` + `showo train --lora` + `showo fuse` + `showo generate` end to end through the
main `showo` app (typer's CliRunner)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import typer
from test_train_data import make_pairs, make_text
from typer.testing import CliRunner

from showo_mlx.cli import app as showo_app


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return showo_app


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_prepare_train_fuse_end_to_end(app, converted, tmp_path):
    from showo_mlx.loading import load_transformer
    from showo_mlx.train.lora import load_adapters

    runner = CliRunner()
    pairs = make_pairs(tmp_path / "pairs", broken=True)
    r = _ok(runner.invoke(app, ["prepare", str(pairs), str(tmp_path / "prep"), "--model", str(converted)]))
    assert "skipped 1 unreadable image" in r.output
    assert json.loads((tmp_path / "prep" / "index.json").read_text())["count"] == 5

    config = tmp_path / "lora.yaml"
    config.write_text(
        "preset: lora\n"
        "dtype: float32\n"
        "grad_checkpoint: true\n"
        "batch_t2i: 1\nbatch_lm: 1\nbatch_mmu: 1\n"
        "max_steps: 6\nwarmup_steps: 1\nlr: 1e-2\nsave_every: 3\nprogress: false\n"
        f"lm_data: {make_text(tmp_path / 'lm.txt')}\n"
    )
    run = tmp_path / "run"
    _ok(runner.invoke(app, ["train", str(config), "--model", str(converted), "--data", str(tmp_path / "prep"),
                            "--output", str(run), "--lora", "--set", "lora_rank=4"]))
    adapters = run / "adapters"
    acfg = json.loads((adapters / "adapter_config.json").read_text())
    assert acfg["lora_parameters"]["rank"] == 4 and (run / "checkpoints" / "step-00000006").is_dir()

    fused = tmp_path / "fused"
    _ok(runner.invoke(app, ["fuse", str(converted), str(adapters), str(fused)]))
    for name in ("config.json", "model.safetensors", "magvit.safetensors", "tokenizer.json"):
        assert (fused / name).exists(), name
    assert (fused / "magvit.safetensors").read_bytes() == (converted / "magvit.safetensors").read_bytes()

    ids = mx.array(np.random.default_rng(0).integers(0, 574, (2, 60)))
    base = load_transformer(converted)
    with_lora = load_transformer(converted)
    load_adapters(with_lora, adapters)
    got = np.array(load_transformer(fused)(ids, mask="causal"))
    want = np.array(with_lora(ids, mask="causal"))
    assert np.abs(got - np.array(base(ids, mask="causal"))).max() > 1e-2  # the adapters did something
    np.testing.assert_allclose(got, want, atol=1e-4)  # and fusing preserved it

    # the fused folder is an ordinary model: `showo generate` paints with it
    png = tmp_path / "fused.png"
    _ok(runner.invoke(app, ["generate", "a red cat", "--model", str(fused), "--steps", "4", "--seed", "1", "-o", str(png)]))
    from showo_mlx.images import read_png_metadata
    from PIL import Image

    assert Image.open(png).size == (128, 128) and read_png_metadata(png)["model"] == str(fused)

    # errors are one line and exit code 2
    r = runner.invoke(app, ["fuse", str(converted), str(adapters), str(fused)])
    assert r.exit_code == 2 and "already exists" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 1e-4\n")
    r = runner.invoke(app, ["train", str(bad)])
    assert r.exit_code == 2 and "'lerning_rate'" in r.output
    r = runner.invoke(app, ["train", str(config), "--model", str(converted), "--data", str(tmp_path / "prep"),
                            "--output", str(tmp_path / "fresh"), "--resume"])
    assert r.exit_code == 2 and "no checkpoint" in r.output
