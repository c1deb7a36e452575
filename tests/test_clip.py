"""The CLIP-ViT understanding path (w_clip_vit checkpoints) against the official outputs in
tests/fixtures/reference-clip/: preprocessing, CLIP hidden states and features, projector, prompt
ids / embedding splice / mask, prompt logits, KV-cached greedy answers, and the same through the CLI
and through conversion from the torch .bin."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache
from PIL import Image
from typer.testing import CliRunner

from conftest import CLIP_REF
from showo_mlx.attention import attention_mask
from showo_mlx.cli import app
from showo_mlx.decoding import SamplingOptions
from showo_mlx.vision import ClipVisionTower, read_hub_vision, sanitize_clip_weights


def npz(name: str) -> dict[str, np.ndarray]:
    with np.load(CLIP_REF / f"{name}.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="session")
def clip_cases() -> dict:
    return json.loads((CLIP_REF / "cases.json").read_text())


@pytest.fixture(scope="session")
def clip_npz() -> dict:
    return npz("clip")


@pytest.fixture(scope="session")
def vit_npz() -> dict:
    return npz("mmu_vit")


@pytest.fixture(scope="session")
def clip_pipe(clip_converted):
    from showo_mlx.pipeline import Pipeline

    return Pipeline(clip_converted)


def image(i: int) -> Image.Image:
    return Image.open(CLIP_REF / "images" / f"clip_in_{i}.png")


# ------------------------------------------------------------------------------------------------
# CLIP
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", [0, 1])
def test_preprocessing_equals_clip_image_processor(i, clip_pipe, clip_npz):
    proc = clip_pipe.vision.processor
    np.testing.assert_array_equal(proc.crop(image(i)), clip_npz[f"image_{i}.cropped_uint8"])
    pixels = proc(image(i))[0].transpose(2, 0, 1)  # ours are channels-last
    assert np.abs(pixels - clip_npz[f"image_{i}.pixel_values"]).max() <= 1e-6


@pytest.mark.parametrize("i", [0, 1])
def test_tower_hidden_states_features_and_projector(i, clip_pipe, clip_npz):
    vision = clip_pipe.vision
    pixels = vision.pixels(image(i))
    hs = vision.tower.hidden_states(pixels)
    ref = clip_npz[f"image_{i}.hidden_states"]
    assert len(vision.tower.layers) == ref.shape[0] - 2  # the last layer is never built
    for j, h in enumerate(hs):
        assert np.abs(np.array(h) - ref[j]).max() <= 1e-4, f"hidden state {j}"
    emb = vision.tower.embeddings(pixels)
    assert np.abs(np.array(emb) - clip_npz[f"image_{i}.embeddings"]).max() <= 1e-4
    features = vision(image(i))
    assert np.abs(np.array(features) - clip_npz[f"image_{i}.features"]).max() <= 1e-4
    projector = clip_pipe.model.mm_projector
    # On the official features (isolates the projector) and on ours (the whole chain).
    assert np.abs(np.array(projector(mx.array(clip_npz[f"image_{i}.features"]))) - clip_npz[f"image_{i}.projected"]).max() <= 1e-4
    assert np.abs(np.array(projector(features)) - clip_npz[f"image_{i}.projected"]).max() <= 1e-4


def test_key_mapping_drops_unused_layers_and_transposes_the_patch_conv():
    from showo_mlx.checkpoint_io import read_checkpoint

    cfg, _ = read_hub_vision(CLIP_REF / "clip")
    raw = read_checkpoint(CLIP_REF / "clip")
    w = sanitize_clip_weights({**raw, "text_model.x": np.zeros(1), "logit_scale": np.zeros(())}, cfg)
    assert not any(k.startswith(("post_layernorm", "text", "logit")) for k in w)
    assert {int(k.split(".")[1]) for k in w if k.startswith("layers.")} == {0, 1}  # layer 2 unused
    conv = raw["vision_model.embeddings.patch_embedding.weight"]
    np.testing.assert_array_equal(w["embeddings.patch_embedding.weight"], conv.transpose(0, 2, 3, 1))
    tower = ClipVisionTower(cfg)
    tower.load_weights([(k, mx.array(v)) for k, v in w.items()], strict=True)


# ------------------------------------------------------------------------------------------------
# Prompt, mask, logits, answers
# ------------------------------------------------------------------------------------------------


def test_prompt_ids_embeddings_and_mask(clip_pipe, clip_cases, vit_npz):
    np.testing.assert_array_equal(clip_pipe.prompting.system_prompt_ids(), vit_npz["system_prompt_ids"][0])
    for run in clip_cases["mmu_generate"]:
        i = run["run"]
        prompt, emb = clip_pipe.vit_prompt(CLIP_REF / run["image"], run["question"])
        np.testing.assert_array_equal(prompt.ids, vit_npz[f"r{i}.input_ids_llava"])
        eoi = clip_cases["ids"]["special_token_ids"]["<|eoi|>"]
        np.testing.assert_array_equal(prompt.ids[0, prompt.image_start:], [eoi] + run["question_token_ids"])
        assert prompt.image_start == 30 and prompt.length == run["prompt_length"]
        assert np.abs(np.array(emb) - vit_npz[f"r{i}.input_embeddings"]).max() <= 1e-4
        np.testing.assert_array_equal(prompt.layout.allowed()[None], vit_npz[f"r{i}.allowed"])


def test_prompt_logits_and_layers(clip_pipe, clip_cases, vit_npz):
    run = clip_cases["mmu_generate"][0]
    prompt, emb = clip_pipe.vit_prompt(CLIP_REF / run["image"], run["question"])
    collect = []
    h = clip_pipe.model.hidden_states(input_embeddings=emb, mask=attention_mask([prompt.layout]), collect=collect)
    logits = np.array(clip_pipe.model.lm_head(h))
    assert np.abs(logits - vit_npz["r0.prompt_logits"]).max() <= 1e-4
    for j, (a, b) in enumerate(zip(collect, vit_npz["r0.layer_outputs"])):
        assert np.abs(np.array(a) - b).max() <= 1e-4, f"layer output {j}"


def test_kv_cached_steps_match_every_reference_forward(clip_pipe, clip_cases, vit_npz):
    """The reference re-runs the grown sequence per token; the KV cache must give the same last
    logits at every step (checked for all runs), hence the same greedy tokens."""
    model = clip_pipe.model
    for run in clip_cases["mmu_generate"]:
        i = run["run"]
        prompt, emb = clip_pipe.vit_prompt(CLIP_REF / run["image"], run["question"])
        cache = [KVCache() for _ in model.layers]
        last = model.lm_head(model.hidden_states(input_embeddings=emb, mask=attention_mask([prompt.layout]), cache=cache)[:, -1])
        ref = vit_npz[f"r{i}.step_last_logits"]
        for step, token in enumerate(run["generated"]):
            assert np.abs(np.array(last[0]) - ref[step]).max() <= 1e-4, f"run {i} step {step}"
            assert int(mx.argmax(last[0])) == token
            last = model.lm_head(model.hidden_states(mx.array([[token]]), cache=cache)[:, -1])


def test_greedy_answers_token_for_token(clip_pipe, clip_cases):
    for run in clip_cases["mmu_generate"]:
        prompt, emb = clip_pipe.vit_prompt(CLIP_REF / run["image"], run["question"])
        tokens = list(clip_pipe.answer_tokens(None, [prompt.layout], 20, SamplingOptions(), prompt_embeddings=emb))
        assert tokens == run["generated"], run["run"]
    run = clip_cases["mmu_generate"][2]  # the text path (streaming decode) once; the CLI test covers runs 0-1
    assert clip_pipe.ask(CLIP_REF / run["image"], run["question"], max_tokens=20) == run["decoded_text"][0]


def test_system_prompt_rows_see_the_image(clip_pipe, clip_cases):
    """The quirk of create_attention_mask_for_mmu_vit: the system prompt's keys depend on the image,
    so the system prompt cannot be prefix-cached on its own (the whole prefill is cached instead)."""
    run = clip_cases["mmu_generate"][0]
    states = []
    for i in (0, 1):
        prompt, emb = clip_pipe.vit_prompt(image(i), run["question"])
        collect = []
        clip_pipe.model.hidden_states(input_embeddings=emb, mask=attention_mask([prompt.layout]), collect=collect)
        states.append(np.array(collect[1])[0, 1:29])  # system rows after the first layer
    assert np.abs(states[0] - states[1]).max() > 1e-3


def test_eos_stops_the_answer(clip_pipe, clip_cases):
    """Generation stops after eos like the reference loop (the eos is yielded, nothing after it)."""
    run = clip_cases["mmu_generate"][0]
    prompt, emb = clip_pipe.vit_prompt(CLIP_REF / run["image"], run["question"])
    model = clip_pipe.model
    eos = clip_pipe.prompting.ids.eos
    first = run["generated"][0]
    saved = model.lm_head.bias
    try:  # make eos the greedy choice from the second token on
        bias = np.array(saved)
        bias[eos] = 1e4
        model.lm_head.bias = mx.array(bias)
        tokens = list(clip_pipe.answer_tokens(None, [prompt.layout], 20, SamplingOptions(), prompt_embeddings=emb))
    finally:
        model.lm_head.bias = saved
    assert tokens == [eos] and first != eos


# ------------------------------------------------------------------------------------------------
# CLI, conversion, understanding-only folders
# ------------------------------------------------------------------------------------------------


def test_cli_ask_on_the_converted_clip_folder(clip_converted, clip_cases):
    runner = CliRunner()
    for run in clip_cases["mmu_generate"][:2]:
        r = runner.invoke(app, ["ask", str(CLIP_REF / run["image"]), run["question"], "--model", str(clip_converted),
                                "--max-tokens", "20"])
        assert r.exit_code == 0, (r.stdout, r.stderr)
        assert r.stdout.splitlines()[0] == run["decoded_text"][0]


def test_image_commands_on_an_understanding_only_folder_fail_in_one_line(clip_converted, tmp_path):
    runner = CliRunner()
    img = CLIP_REF / "images" / "clip_in_0.png"
    for argv in (["generate", "a cat", "-o", str(tmp_path / "x.png")], ["reconstruct", str(img), str(tmp_path / "y.png")],
                 ["inpaint", str(img), str(img), "a cat", "-o", str(tmp_path / "z.png")]):
        r = runner.invoke(app, [*argv, "--model", str(clip_converted)])
        assert r.exit_code == 2, (argv, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "without MAGVIT-v2 (--no-vq)" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_conversion_from_the_torch_bin_equals_safetensors(clip_converted, tmp_path):
    from showo_mlx.convert import convert

    src = tmp_path / "official"
    src.mkdir()
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(CLIP_REF / "showo" / name, src / name)
    dst = convert(src, tmp_path / "from-bin", vision_tower=CLIP_REF / "clip", tokenizer=CLIP_REF / "tokenizer",
                  no_vq=True, log=lambda m: None)
    for name in ("model.safetensors", "vision.safetensors"):
        a, b = mx.load(str(dst / name)), mx.load(str(clip_converted / name))
        assert set(a) == set(b) and any(k.startswith("mm_projector.") for k in mx.load(str(dst / "model.safetensors")))
        for k in a:
            assert mx.array_equal(a[k], b[k]), k


def test_conversion_errors_name_the_fix(tmp_path):
    from showo_mlx.convert import convert
    from showo_mlx.errors import ShowoError

    with pytest.raises(ShowoError, match="--vision-tower PATH") as info:
        convert(CLIP_REF / "showo", tmp_path / "a", vision_tower=tmp_path / "missing-tower",
                tokenizer=CLIP_REF / "tokenizer", no_vq=True, log=lambda m: None)
    assert "\n" not in str(info.value)
    with pytest.raises(ShowoError, match="drop --no-vq"):
        convert(CLIP_REF.parent / "reference" / "showo", tmp_path / "b", no_vq=True, log=lambda m: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
