"""Model families: the table of released checkpoints, defaults picked by Hub id through a fake
huggingface_hub cache (offline), recorded in converted folders, and the errors around them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REF, TESTS
from showo_mlx.errors import ShowoConfigError
from showo_mlx.family import FAMILIES, family_for_hub_id, family_named, family_of, infer_family, resolve_family

CLIP_REF = TESTS / "fixtures" / "reference-clip"
from hub_layout import REVISION, hub_snapshot

EXPECTED = {  # Hub id → (family, generate (steps, guidance, top-k), inpaint (steps, guidance, top-k), understanding)
    "showlab/show-o": ("show-o", (18, 1.75, None), (16, 1.75, None), "magvit"),
    "showlab/show-o-512x512": ("show-o-512", (50, 5.0, None), (50, 5.0, None), "magvit"),
    "showlab/show-o-w-clip-vit": ("show-o-clip", (18, 1.75, None), (16, 1.75, None), "clip"),
    "showlab/show-o-w-clip-vit-512x512": ("show-o-clip-512", (50, 5.0, None), (50, 5.0, None), "clip"),
    "SJTU-Deng-Lab/Show-o-Turbo-256": ("turbo-256", (4, 0.0, 200), (4, 0.0, 200), "magvit"),
    "SJTU-Deng-Lab/Show-o-Turbo-512": ("turbo-512", (4, 0.0, 500), (4, 0.0, 500), "magvit"),
}




def test_table_lookups_and_turbo_top_k_by_steps():
    assert family_for_hub_id("sjtu-deng-lab/show-o-turbo-512").name == "turbo-512"  # the Hub ignores case
    assert family_for_hub_id("SJTU-Deng-Lab/UniCMs-256").name == "turbo-256"  # the repositories' new name
    assert family_for_hub_id("someone/else") is None
    t512, t256 = family_named("turbo-512").generate, family_named("turbo-256").generate
    # The Turbo scripts: top-k 200 at 2 steps, 500 (512 px) / 200 (256 px) at 4, none at 8 and 16.
    assert [t512.top_k(s) for s in (2, 3, 4, 8, 16)] == [200, 500, 500, None, None]
    assert [t256.top_k(s) for s in (2, 4, 8)] == [200, 200, None]
    assert infer_family(True, 1024).name == "show-o-clip-512" and infer_family(False, 256).name == "show-o"
    assert family_of({"showo": {"w_clip_vit": False, "num_vq_tokens": 1024}}).name == "show-o-512"  # no record
    assert family_of({"family": "turbo-256", "showo": {}}).name == "turbo-256"
    assert len({f.name for f in FAMILIES}) == 6
    with pytest.raises(ShowoConfigError, match="w_clip_vit"):
        resolve_family("local", w_clip_vit=False, num_vq_tokens=256, family="show-o-clip")
    with pytest.raises(ShowoConfigError, match="unknown model family"):
        family_named("turbo")


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """A test-built huggingface_hub cache with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing to it.
    huggingface_hub reads both into `constants` at import, and reads `constants` at call time, so
    they are set there too (the same process, without a second interpreter's import time)."""
    import huggingface_hub.constants as hf_constants

    hub = tmp_path / "hf"
    hub.mkdir()
    for key, value in (("HF_HUB_CACHE", str(hub)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(key, "1" if value is True else value)
        monkeypatch.setattr(hf_constants, key, value)
    monkeypatch.setenv("SHOWO_MLX_CACHE", str(tmp_path / "showo"))
    return hub


def test_every_family_by_hub_id_offline(offline_hub):
    import showo_mlx.pipeline as p
    from showo_mlx.errors import ShowoError

    hub = offline_hub
    showo = {n: REF / "showo" / n for n in ("config.json", "pytorch_model.safetensors")}
    clip_showo = {n: CLIP_REF / "showo" / n for n in ("config.json", "pytorch_model.safetensors")}
    clip_showo.update({q.name: q for q in (CLIP_REF / "tokenizer").iterdir()})  # the repo carries its tokenizer
    for repo, (name, *_rest) in EXPECTED.items():
        hub_snapshot(hub, repo, clip_showo if "clip" in name else showo)
    hub_snapshot(hub, "showlab/magvitv2", {n: REF / "magvitv2" / n for n in ("config.json", "pytorch_model.safetensors")})
    hub_snapshot(hub, "microsoft/phi-1_5", {q.name: q for q in (REF / "tokenizer").iterdir()})
    run0 = json.loads((CLIP_REF / "cases.json").read_text())["mmu_generate"][0]

    # A CLIP checkpoint whose tower is not available: one line that names the fix.
    with pytest.raises(ShowoError) as info:
        p.load("showlab/show-o-w-clip-vit", log=lambda m: None)
    missing = str(info.value)
    assert "\n" not in missing and "openai/clip-vit-large-patch14-336" in missing and "--vision-tower PATH" in missing
    hub_snapshot(hub, "openai/clip-vit-large-patch14-336",
                  {n: CLIP_REF / "clip" / n for n in ("config.json", "model.safetensors", "preprocessor_config.json")})

    for repo, (name, gen, inp, understanding) in EXPECTED.items():
        pipe = p.load(repo, log=lambda m: None)
        assert pipe.family.name == json.loads((pipe.folder / "config.json").read_text())["family"] == name, repo
        assert pipe.cfg.w_clip_vit == (understanding == "clip"), repo
        for task, want in (("generate", gen), ("inpaint", inp)):
            s = pipe.settings(task)
            assert (s.steps, s.guidance, s.top_k, s.schedule) == (*want, "cosine"), (repo, task)
        assert pipe.settings("generate", steps=8).top_k is None  # Turbo's scripts use no top-k at 8 steps
        assert pipe.settings("generate", top_k=7).top_k == 7
        if understanding == "clip":  # converted by Hub id with the default tower: the official answer
            assert pipe.ask(CLIP_REF / run0["image"], run0["question"], max_tokens=20) == run0["decoded_text"][0], repo


def test_a_local_folder_records_the_family_it_is_given(tmp_path):
    """An official folder under an unknown name is inferred from its config; `family=` (`--family`,
    e.g. turbo-256 for a local Turbo copy) is recorded, and the folder then gives that family's
    defaults wherever it is used."""
    from showo_mlx.convert import convert
    from showo_mlx.pipeline import Pipeline

    common = dict(vision_tower=CLIP_REF / "clip", tokenizer=CLIP_REF / "tokenizer", no_vq=True, log=lambda m: None)
    inferred = convert(CLIP_REF / "showo", tmp_path / "a", **common)
    chosen = convert(CLIP_REF / "showo", tmp_path / "b", family="show-o-clip-512", **common)
    assert json.loads((inferred / "config.json").read_text())["family"] == "show-o-clip"  # N = 64: the 256 px kind
    assert json.loads((chosen / "config.json").read_text())["family"] == "show-o-clip-512"
    d = Pipeline(chosen).defaults("generate")
    assert (d.steps, d.guidance, d.top_k) == (50, 5.0, None)
