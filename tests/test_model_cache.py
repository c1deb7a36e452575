"""Which model gets loaded: the conversion cache keyed on the source (path + file fingerprint, Hub
repo + commit), pre-converted models on the Hub used in place, --vq/--tokenizer for official
folders, `convert` of a converted folder, `--upload-repo` (mocked Hub API), and the offline error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hub_layout import hub_snapshot
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from conftest import REF, load_npz
from showo_mlx import convert as conv
from showo_mlx.cli import app
from showo_mlx.errors import ShowoError
from showo_mlx.loading import load_transformer, read_model_config, resolve_model

T = load_npz("transformer")
runner = CliRunner()
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def logits(folder: Path) -> np.ndarray:
    model = load_transformer(folder)
    return np.array(model(mx.array(T["t2i.input_ids"][:1]), mask=mx.array(T["t2i.allowed"][:1, None])))


def official(folder: Path, scale: float = 1.0, tokenizer: bool = True) -> Path:
    """An official-layout Show-o folder with the fixture's weights, the head (so the logits) scaled by `scale`."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(REF / "showo" / "config.json", folder / "config.json")
    write_weights(folder, scale)
    if tokenizer:
        for p in (REF / "tokenizer").iterdir():
            shutil.copy(p, folder / p.name)
    return folder


def write_weights(folder: Path, scale: float) -> None:
    weights = load_file(str(REF / "showo" / "pytorch_model.safetensors"))
    for k in ("showo.lm_head.weight", "showo.lm_head.bias"):  # logits scale by `scale` exactly
        weights[k] = weights[k] * np.float32(scale)
    save_file(weights, str(folder / "pytorch_model.safetensors"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty showo-mlx cache; MAGVIT from the fixture (no Hub access for it)."""
    monkeypatch.setenv("SHOWO_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(conv, "DEFAULT_VQ", str(REF / "magvitv2"))
    return tmp_path / "cache" / "converted"


def test_same_named_official_folders_are_different_models(tmp_path, cache, converted):
    a = official(tmp_path / "one" / "showo")
    b = official(tmp_path / "two" / "showo", scale=-1.0)  # same folder name, other weights
    fa, fb = resolve_model(a, log=lambda m: None), resolve_model(b, log=lambda m: None)
    assert fa != fb and fa.parent == fb.parent == cache
    assert fa.name.startswith("local--showo-") and fb.name.startswith("local--showo-")
    la, lb = logits(fa), logits(fb)
    np.testing.assert_array_equal(la, logits(converted))  # a is the fixture model itself
    np.testing.assert_allclose(lb, -la, atol=1e-5)  # b really is b (its head is negated)
    assert read_model_config(fb)["source"]["cache_key"]["model"]["path"] == str(b.resolve())


def test_changed_weights_are_converted_again_and_stale_conversions_are_removed(tmp_path, cache):
    src = official(tmp_path / "src" / "showo")
    gone = official(tmp_path / "gone" / "showo", scale=3.0)
    legacy = cache / "local--showo"  # what older versions wrote: no key, any folder named showo
    logs: list[str] = []
    first = resolve_model(src, log=logs.append)
    before = logits(first)
    assert any(m.startswith(f"converting {src} once into {first}") for m in logs)
    assert resolve_model(src, log=lambda m: pytest.fail(f"converted again: {m}")) == first
    old = resolve_model(gone, log=lambda m: None)
    shutil.copytree(first, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    cfg["source"].pop("cache_key")
    (legacy / "config.json").write_text(json.dumps(cfg))
    shutil.rmtree(gone)

    write_weights(src, scale=0.5)  # the user replaces the weights in place
    stat = (src / "pytorch_model.safetensors").stat()
    os.utime(src / "pytorch_model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    logs.clear()
    again = resolve_model(src, log=logs.append)
    assert again == first  # the same slot, replaced
    assert any("inputs changed since it was converted" in m for m in logs)
    assert any("removed 2 superseded conversions" in m for m in logs)
    assert not old.exists() and not legacy.exists() and sorted(cache.iterdir()) == [first]
    halved = resolve_model(official(tmp_path / "halved" / "showo", scale=0.5), log=lambda m: None)
    np.testing.assert_array_equal(logits(again), logits(halved))  # the new weights are the ones used
    assert not np.allclose(logits(again), before, atol=1e-3)


# -- the Hub, offline (huggingface_hub's cache layout built here) ----------------------------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, cache):
    """huggingface_hub in offline mode over an empty cache in tmp_path (this process)."""
    from huggingface_hub import constants

    hub = tmp_path / "hf"
    hub.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def test_hub_repo_with_a_new_commit_is_converted_again(tmp_path, offline_hub, cache):
    a = official(tmp_path / "a")
    b = official(tmp_path / "b", scale=2.0)
    files = lambda d: {n: d / n for n in ("config.json", "pytorch_model.safetensors", "tokenizer.json", "tokenizer_config.json")}
    hub_snapshot(offline_hub, "lab/tiny", commit=COMMIT_A, files=files(a))
    first = resolve_model("lab/tiny", log=lambda m: None)
    assert read_model_config(first)["source"]["cache_key"]["model"] == {"repo": "lab/tiny", "commit": COMMIT_A}
    la = logits(first)
    hub_snapshot(offline_hub, "lab/tiny", commit=COMMIT_B, files=files(b))  # refs/main moves to the new commit
    logs: list[str] = []
    second = resolve_model("lab/tiny", log=logs.append)
    assert second == first and any("inputs changed" in m for m in logs)
    np.testing.assert_allclose(logits(second), 2 * la, rtol=1e-5, atol=1e-5)
    assert resolve_model("lab/tiny", log=lambda m: pytest.fail(f"converted again: {m}")) == first
    shutil.rmtree(offline_hub / "models--lab--tiny")  # the user frees the Hub's copy, still offline
    logs.clear()
    assert resolve_model("lab/tiny", log=logs.append) == first
    assert logs == [f"note: could not check the Hub for a newer lab/tiny; using its conversion of commit {COMMIT_B[:12]} ({first})"]


def test_preconverted_hub_repo_loads_in_place_offline(tmp_path, converted, pipe):
    """The acceptance test: a converted folder laid out as a Hub snapshot loads by repo id with
    HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing here, straight from the Hub cache."""
    hub = tmp_path / "hf"
    snap = hub_snapshot(hub, "someone/showo-tiny-mlx", commit=COMMIT_A, files={p.name: p for p in converted.iterdir()})
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", SHOWO_MLX_CACHE=str(tmp_path / "showo"),
               SHOWO_OPENBLAS="0")
    code = ("import showo_mlx; p = showo_mlx.load('someone/showo-tiny-mlx'); print(p.folder); "
            "print(repr(p.complete('a red cat', max_tokens=8)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    folder, text = out.stdout.strip().splitlines()[-2:]
    assert Path(folder) == snap  # used in place
    assert text == repr(pipe.complete("a red cat", max_tokens=8))
    assert "converting" not in out.stdout + out.stderr and not (tmp_path / "showo").exists()  # no second copy


def test_vq_and_tokenizer_for_an_official_folder(tmp_path, offline_hub, monkeypatch, converted, pipe):
    monkeypatch.setattr(conv, "DEFAULT_VQ", "showlab/magvitv2")  # not in the (empty, offline) Hub cache
    src = official(tmp_path / "showo", tokenizer=False)
    with pytest.raises(ShowoError, match="could not fetch showlab/magvitv2"):
        resolve_model(src, log=lambda m: None)
    vq, tok = str(REF / "magvitv2"), str(REF / "tokenizer")
    r = runner.invoke(app, ["complete", "a red cat", "--max-tokens", "8", "--model", str(src), "--vq", vq, "--tokenizer", tok])
    assert r.exit_code == 0, r.output
    assert r.stdout == "a red cat" + pipe.complete("a red cat", max_tokens=8) + "\n"
    folder = resolve_model(src, vq=vq, tokenizer=tok, log=lambda m: pytest.fail("converted twice"))
    assert read_model_config(folder)["source"]["vq"] == vq
    other_vq = tmp_path / "vq2"
    shutil.copytree(REF / "magvitv2", other_vq)
    assert resolve_model(src, vq=other_vq, tokenizer=tok, log=lambda m: None) != folder  # another MAGVIT, another slot
    r = runner.invoke(app, ["reconstruct", str(REF / "images" / "magvit_in_0.png"), str(tmp_path / "r.png"),
                            "--model", str(converted), "--vq", vq])
    assert r.exit_code == 2 and "already converted" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_offline_error_for_the_default_model_names_the_fix(offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["complete", "hi"])
    assert r.exit_code == 2
    [line] = r.stderr.strip().splitlines()  # nothing before it: no "converting" announcement
    assert line.startswith("error: could not fetch showlab/show-o from the Hugging Face Hub: HF_HUB_OFFLINE is set")
    assert str(offline_hub) in line and "--model PATH" in line


def test_clip_words_never_cuts_a_word():
    from showo_mlx.hub import clip_words

    text = "Cannot find an appropriate cached snapshot folder for the specified revision on the local disk"
    short = clip_words(text, 40)
    assert short == "Cannot find an appropriate cached …"
    assert clip_words("short", 40) == "short"


# -- convert of a converted folder; publishing ------------------------------------------------------
def test_convert_of_a_converted_folder(tmp_path, converted):
    out = tmp_path / "out"
    r = runner.invoke(app, ["convert", str(converted), str(out)])
    assert r.exit_code == 0, r.output
    assert "already converted" in r.stderr and "nothing to do" in r.stderr and not out.exists()
    # -q re-quantizes it: the same tensors as quantizing the official checkpoint directly
    r = runner.invoke(app, ["convert", str(converted), str(out), "-q", "--q-bits", "4"])
    assert r.exit_code == 0, r.output
    direct = tmp_path / "direct"
    conv.convert(REF / "showo", direct, quantize=conv.QuantizeSpec(bits=4), vq=REF / "magvitv2",
                 tokenizer=REF / "tokenizer", log=lambda m: None)
    for name in ("model.safetensors", "magvit.safetensors"):  # float16 MAGVIT beside 4-bit, as convert -q
        got, want = mx.load(str(out / name)), mx.load(str(direct / name))
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and mx.array_equal(got[k], want[k]).item(), k
    mine, theirs = read_model_config(out), read_model_config(direct)
    for key in ("quantization", "dtype", "magvit_dtype", "showo", "magvit"):
        assert mine[key] == theirs[key], key
    assert (out / "tokenizer.json").read_bytes() == (converted / "tokenizer.json").read_bytes()


class FakeHfApi:
    calls: list = []

    def create_repo(self, **kw):
        FakeHfApi.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        FakeHfApi.calls.append(("upload_folder", kw, sorted(os.listdir(kw["folder_path"]))))


def test_upload_repo_publishes_the_converted_folder(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    dst = tmp_path / "tiny"
    args = ["convert", str(REF / "showo"), str(dst), "--vq", str(REF / "magvitv2"), "--tokenizer", str(REF / "tokenizer")]
    r = runner.invoke(app, [*args, "--upload-repo", "not a repo"])
    assert r.exit_code == 2 and "owner/name" in r.stderr and not dst.exists() and not FakeHfApi.calls
    r = runner.invoke(app, [*args, "--upload-repo", "me/showo-tiny-mlx"])
    assert r.exit_code == 0, r.output
    (_, create), (_, upload, listed) = FakeHfApi.calls
    assert create["repo_id"] == "me/showo-tiny-mlx" and create["exist_ok"]
    assert upload["repo_id"] == "me/showo-tiny-mlx" and Path(upload["folder_path"]) == dst
    assert {"config.json", "model.safetensors", "magvit.safetensors", "tokenizer.json", "README.md"} <= set(listed)
    assert "showo_mlx.load(\"me/showo-tiny-mlx\")" in (dst / "README.md").read_text()
    assert "uploaded" in r.stderr
