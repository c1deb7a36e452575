"""Training the CLIP path (`training/train_w_clip_vit.py`): mmu rows whose image positions hold the
projected features of the frozen CLIP tower; the projector and the LLM train (full), or their
LoRA adapters do. Tiny overfits on the CLIP fixture model (understanding-only, so mmu rows only)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import CLIP_REF
from showo_mlx.errors import TrainingConfigError
from showo_mlx.layout import mmu_vit_layout
from showo_mlx.train.config import TrainConfig
from showo_mlx.train.trainer import Trainer

QUIET = dict(progress=False, log_every=1000, save_every=1000)
CAPTIONS = ["a red disc on a striped gradient", "a blue rectangle on a noisy background"]
SMALL = 56  # px: a 4×4 patch grid for the training runs (the real 24×24 grid makes every row ≥ 607 long)


def _data_folders(root):
    pairs, llava = root / "pairs", root / "llava"
    pairs.mkdir()
    llava.mkdir()
    rows = []
    for i, caption in enumerate(CAPTIONS):
        for folder in (pairs, llava):
            shutil.copy(CLIP_REF / "images" / f"clip_in_{i}.png", folder / f"img{i}.png")
        (pairs / f"img{i}.txt").write_text(caption)
        rows.append({"id": str(i), "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": caption}]})
    (llava / "chat.json").write_text(json.dumps(rows))
    return pairs, llava / "chat.json"


def _small_tower(folder):
    """The fixture's CLIP tower at 56 px: same weights, the first 17 position embeddings (class + 16
    patches), processor resizing and cropping to 56. A valid CLIPVisionModel checkpoint."""
    folder.mkdir()
    cfg = json.loads((CLIP_REF / "clip" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "image_size": SMALL}))
    pre = json.loads((CLIP_REF / "clip" / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**pre, "size": SMALL, "crop_size": SMALL}))
    w = mx.load(str(CLIP_REF / "clip" / "model.safetensors"))
    key = "vision_model.embeddings.position_embedding.weight"
    w[key] = w[key][: (SMALL // 14) ** 2 + 1]
    mx.save_safetensors(str(folder / "model.safetensors"), w)
    return folder


@pytest.fixture(scope="module")
def clip_data(clip_converted, tmp_path_factory):
    from showo_mlx.convert import convert
    from showo_mlx.train.prepare import prepare

    root = tmp_path_factory.mktemp("clip-train")
    pairs, chat = _data_folders(root)
    small = convert(CLIP_REF / "showo", root / "small-clip", vision_tower=_small_tower(root / "tower"),
                    tokenizer=CLIP_REF / "tokenizer", no_vq=True, log=lambda m: None)
    quiet = dict(log=lambda m: None, progress=False)
    prepare(str(pairs), root / "real_captions", model=str(clip_converted), **quiet)
    prepare(str(chat), root / "real_chat", model=str(clip_converted), **quiet)
    prepare(str(pairs), root / "captions", model=str(small), **quiet)
    prepare(str(chat), root / "chat", model=str(small), **quiet)
    return {"real": clip_converted, "model": str(small), "root": root,
            **{k: str(root / k) for k in ("real_captions", "real_chat", "captions", "chat")}}


def _cfg(d, out, mmu_data, **kw) -> TrainConfig:
    base = dict(model=d["model"], mmu_data=mmu_data, output=str(d["root"] / out), batch_t2i=0, batch_lm=0,
                batch_mmu=2, max_seq_length=64, warmup_steps=0, max_steps=4, **QUIET)
    base.update(kw)
    return TrainConfig.from_dict(base)


def _drop(history) -> tuple[float, float]:
    return history[0].losses["mmu"], history[-1].losses["mmu"]


def test_prepared_clip_crops_are_the_processor_crops(clip_data):
    from showo_mlx.train.data import PreparedData

    with np.load(CLIP_REF / "clip.npz") as clip_npz:
        crops = [clip_npz[f"image_{i}.cropped_uint8"] for i in range(2)]
    d = PreparedData(clip_data["real_captions"])
    assert d.num_tokens == 0 and d.clip  # no MAGVIT in this model: crops only
    for i in range(2):
        np.testing.assert_array_equal(d.clip_pixels(i), crops[i])
    with pytest.raises(TrainingConfigError, match="no MAGVIT codes"):
        d.check_model(64, 64, "data")


def test_clip_rows_of_the_real_geometry(clip_data):
    """LLaVA-tuning rows with the 576 features of the fixture's 336 px tower: layout, length (the t2i
    row length), labels on the conversation only; too short a max_seq_length is named."""
    from showo_mlx.config import ShowoConfig
    from showo_mlx.prompting import Prompting
    from showo_mlx.train.batches import BatchBuilder
    from showo_mlx.train.data import PreparedData
    from showo_mlx.train.losses import TaskRows

    folder = clip_data["real"]
    showo = json.loads((folder / "config.json").read_text())["showo"]

    p = Prompting(folder, ShowoConfig.from_dict({**showo, "max_seq_length": 560}))
    b = BatchBuilder(p, rows=TaskRows(mmu=2), mmu_data=PreparedData(clip_data["real_chat"]), clip_image_tokens=576)
    mb = b.build(0)
    assert mb.image_start == 30 and mb.clip_pixels.shape == (2, 336, 336, 3)
    row = mb.ids[0]
    assert row[0] == p.ids.mmu and list(row[1:29]) == p.system_prompt_ids() and row[29] == p.ids.soi
    assert row[606] == p.ids.eoi and mb.ids.shape[1] == 560 + 64 + 3
    assert mb.layouts[0] == mmu_vit_layout(mb.ids.shape[1], 28, 576)
    assert (mb.labels[:, :607] == -100).all() and (mb.labels[:, 607:] != -100).any()
    text = p.encode("USER: What is shown? ASSISTANT: ")
    assert list(row[607 : 607 + len(text) - 1]) == text[:-1]  # the phi1.5 template, as the MAGVIT path
    # L = max_seq_length + N + 3 must hold 30 + 576 + 1 positions and one text token: 541 here.
    b.length = 540 + 64 + 3  # the row length of max_seq_length 540
    with pytest.raises(TrainingConfigError, match="max_seq_length must be at least 541"):
        b.build(0)
    b.length = 541 + 64 + 3
    assert b.build(0).ids.shape[1] == 608


def test_full_fine_tuning_of_clip_rows_trains_projector_and_llm(clip_data):
    trainer = Trainer(_cfg(clip_data, "full", clip_data["chat"], lr=3e-3), log=lambda m: None)
    assert trainer.batches.build(0).image_start == 30
    names = {k for k, _ in tree_flatten(trainer.params)}
    assert {"mm_projector.fc1.weight", "mm_projector.fc2.weight", "layers.0.mlp.fc1.weight"} <= names
    before = {k: np.array(v) for k, v in tree_flatten(trainer.params) if k.startswith("mm_projector.")}
    tower = {k: np.array(v) for k, v in tree_flatten(trainer.vision.tower.parameters())}
    result = trainer.run()
    first, last = _drop(result.history)
    assert last < first / 2, (first, last)
    after = dict(tree_flatten(trainer.params))
    assert all(not np.array_equal(before[k], np.array(after[k])) for k in before)  # the projector trained
    for k, v in tree_flatten(trainer.vision.tower.parameters()):  # the tower did not
        np.testing.assert_array_equal(np.array(v), tower[k])
    saved = mx.load(str(clip_data["root"] / "full" / "model" / "model.safetensors"))
    assert "mm_projector.fc1.weight" in saved


def test_lora_on_clip_rows_trains_adapters_including_the_projector(clip_data):
    trainer = Trainer(_cfg(clip_data, "lora", clip_data["captions"], lr=1e-2, fine_tune="lora"), log=lambda m: None)
    assert trainer.batches.build(0).image_start == 2  # captions: LLaVA pre-training rows, no system prompt
    names = [k for k, _ in tree_flatten(trainer.params)]
    assert all(k.endswith(("lora_a", "lora_b")) for k in names)
    assert any(k.startswith("mm_projector.") for k in names)
    result = trainer.run()
    first, last = _drop(result.history)
    assert last < first / 1.5, (first, last)
    acfg = json.loads((clip_data["root"] / "lora" / "adapters" / "adapter_config.json").read_text())
    assert "mm_projector.*" in acfg["lora_parameters"]["keys"]
