"""Model resolution: Hub ids through huggingface_hub's cache (offline), official folders, converted
folders, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REF
from showo_mlx.errors import ShowoConfigError, ShowoError
from showo_mlx.loading import read_model_config, resolve_model

from hub_layout import REVISION, hub_snapshot




@pytest.fixture()
def offline_hub(tmp_path):
    hub = tmp_path / "hf"
    hub_snapshot(hub, "showlab/show-o", {n: REF / "showo" / n for n in ("config.json", "pytorch_model.safetensors")})
    hub_snapshot(hub, "showlab/magvitv2", {n: REF / "magvitv2" / n for n in ("config.json", "pytorch_model.safetensors")})
    hub_snapshot(hub, "microsoft/phi-1_5", {p.name: p for p in (REF / "tokenizer").iterdir()})
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", SHOWO_MLX_CACHE=str(tmp_path / "showo"))
    return env, tmp_path


def run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)


def test_hub_id_converts_once_offline_then_reuses(offline_hub, pipe):
    env, tmp = offline_hub
    code = "import showo_mlx.pipeline as p; pipe = p.load('showlab/show-o'); print(repr(pipe.complete('a red cat', max_tokens=8)))"
    first = run(code, env)
    assert first.returncode == 0, first.stderr
    assert "converting showlab/show-o once into" in first.stdout
    [target] = (tmp / "showo" / "converted").glob("showlab--show-o-*")  # one slot, keyed by the repo
    assert read_model_config(target)["source"]["model"] == "showlab/show-o"
    assert first.stdout.strip().splitlines()[-1] == repr(pipe.complete("a red cat", max_tokens=8))
    second = run(code, env)
    assert second.returncode == 0 and "converting" not in second.stdout


def test_missing_hub_repo_offline_is_one_clear_error(offline_hub):
    env, _ = offline_hub
    out = run("import showo_mlx.pipeline as p\ntry:\n p.load('showlab/not-there')\nexcept Exception as e: print(type(e).__name__, e)", env)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("ShowoError could not fetch showlab/not-there")


def test_official_folder_is_converted_into_the_cache(tmp_path, monkeypatch):
    src = tmp_path / "official"
    src.mkdir()
    for name in ("config.json", "pytorch_model.safetensors"):
        shutil.copy(REF / "showo" / name, src / name)
    for p in (REF / "tokenizer").iterdir():
        shutil.copy(p, src / p.name)  # a folder that carries its tokenizer needs no Hub access for it
    monkeypatch.setenv("SHOWO_MLX_CACHE", str(tmp_path / "cache"))
    from showo_mlx import convert as conv

    monkeypatch.setattr(conv, "DEFAULT_VQ", str(REF / "magvitv2"))
    folder = resolve_model(src, log=lambda m: None)
    assert folder.parent == tmp_path / "cache" / "converted" and read_model_config(folder)["model_type"] == "showo"
    assert resolve_model(src, log=lambda m: pytest.fail("converted twice")) == folder


def test_converted_folder_is_used_as_is(converted):
    assert resolve_model(converted, log=lambda m: pytest.fail("should not convert")) == converted


def test_bad_model_arguments(tmp_path):
    with pytest.raises(ShowoError, match="neither a folder nor a Hub id"):
        resolve_model(str(tmp_path / "nope" / "deeper"), log=lambda m: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShowoConfigError, match="no config.json"):
        resolve_model(tmp_path / "empty", log=lambda m: None)
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "config.json").write_text(json.dumps({"model_type": "showo", "format_version": 99}))
    with pytest.raises(ShowoConfigError, match="newer showo-mlx"):
        read_model_config(newer)
