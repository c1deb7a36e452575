"""Training data: raw layouts, `prepare` (streaming, sharded, atomic, skips), sampling, batches."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REF, load_npz

from showo_mlx.errors import OutputExistsError, TrainingConfigError

CAPTIONS = {
    "magvit_in_0": "a red cat sitting on a wooden table",
    "magvit_in_1": "a blue bird over the lake",
    "preprocess_in_0": "two dogs running in the park",
    "preprocess_in_1": "a glass bicycle at the orange bridge",
    "inpaint_mask": "a grey shape on black",
}


def make_pairs(folder: Path, broken: bool = False) -> Path:
    """The fixture images with captions as name.png + name.txt (plus an unreadable image)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, caption in CAPTIONS.items():
        shutil.copy(REF / "images" / f"{name}.png", folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption + "\n")
    if broken:
        (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        (folder / "zz_broken.txt").write_text("a picture that cannot be read")
    return folder


def make_text(path: Path) -> Path:
    lines = list(CAPTIONS.values()) + ["the park is green and the lake is blue", "a cat and a dog"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def prepared(converted, tmp_path_factory):
    from showo_mlx.train.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    pairs = make_pairs(root / "pairs", broken=True)
    result = prepare(str(pairs), root / "prep", model=str(converted), shard_size=2, batch_size=3, log=lambda m: None, progress=False)
    return root, result


def test_prepare_encodes_streams_and_skips(prepared, converted):
    from showo_mlx.train.data import PreparedData
    from showo_mlx.train.prepare import prepare

    root, result = prepared
    assert (result.count, result.skipped, result.num_tokens, result.resolution) == (5, 1, 64, 128)
    index = json.loads((root / "prep" / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [2, 2, 1]  # shard_size 2: never one big array
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left
    data = PreparedData(root / "prep")
    keys = [data.meta(i)["key"] for i in range(len(data))]
    assert keys == sorted(f"{k}.png" for k in CAPTIONS)
    codes = load_npz("magvit")["codes"]  # the official get_code of magvit_in_0/1.png
    np.testing.assert_array_equal(data.codes(keys.index("magvit_in_0.png")), codes[0])
    np.testing.assert_array_equal(data.codes(keys.index("magvit_in_1.png")), codes[1])
    assert data.meta(keys.index("magvit_in_1.png"))["caption"] == CAPTIONS["magvit_in_1"]
    with pytest.raises(OutputExistsError):
        prepare(str(root / "pairs"), root / "prep", model=str(converted), log=lambda m: None, progress=False)
    with pytest.raises(TrainingConfigError, match="needs 'image' and 'caption'"):
        bad = root / "bad.jsonl"
        bad.write_text('{"image": "x.png"}\n')
        prepare(str(bad), root / "prep_bad", model=str(converted), log=lambda m: None, progress=False)
    assert not (root / "prep_bad").exists()


def test_raw_layouts_jsonl_classes_tar_llava(tmp_path):
    from showo_mlx.train.sources import detect_kind, iter_source

    pairs = make_pairs(tmp_path / "pairs")
    # JSONL with relative paths
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("".join(json.dumps({"image": f"pairs/{k}.png", "caption": c}) + "\n" for k, c in CAPTIONS.items()))
    # ImageNet-style class folders
    classes = tmp_path / "classes"
    for cls, name in (("golden_retriever", "magvit_in_0"), ("tabby_cat", "magvit_in_1")):
        (classes / cls).mkdir(parents=True)
        shutil.copy(pairs / f"{name}.png", classes / cls / "0001.png")
    # webdataset shards
    shards = tmp_path / "shards"
    shards.mkdir()
    names = list(CAPTIONS)
    for s in range(2):
        with tarfile.open(shards / f"data-{s:03d}.tar", "w") as tar:
            for name in names[s * 3 : s * 3 + 3]:
                for ext, blob in ((".png", (pairs / f"{name}.png").read_bytes()), (".txt", CAPTIONS[name].encode())):
                    info = tarfile.TarInfo(f"{name}{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    # LLaVA
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([
        {"id": "a", "image": "pairs/magvit_in_0.png", "conversations": [{"from": "human", "value": "<image>\\nWhat?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]))

    assert detect_kind(str(pairs)) == "pairs"
    assert detect_kind(str(jsonl)) == "jsonl"
    assert detect_kind(str(classes)) == "classes"
    assert detect_kind(str(shards)) == "tar"
    assert detect_kind(str(shards / "data-{000..001}.tar")) == "tar"
    assert detect_kind(str(llava)) == "llava"

    _, it = iter_source(str(jsonl))
    assert [s.caption for s in it] == list(CAPTIONS.values())
    _, it = iter_source(str(classes))
    samples = list(it)
    assert [s.caption for s in samples] == ["golden retriever", "tabby cat"]
    assert samples[0].load().size == (128, 128)
    _, it = iter_source(str(shards / "data-{000..001}.tar"))
    samples = list(it)
    assert [s.caption for s in samples] == list(CAPTIONS.values())
    assert samples[4].load().mode == "RGB"
    _, it = iter_source(str(llava))
    rows = list(it)
    assert rows[0].conversations[1]["value"] == "A cat." and rows[0].load().size == (128, 128)
    from showo_mlx.errors import ImageInputError

    with pytest.raises(ImageInputError):  # text-only LLaVA rows are skipped by prepare
        rows[1].load()


def test_prepare_tar_and_llava(converted, tmp_path):
    from showo_mlx.train.data import PreparedData
    from showo_mlx.train.prepare import prepare

    pairs = make_pairs(tmp_path / "pairs")
    with tarfile.open(tmp_path / "one.tar", "w") as tar:
        for name in ("magvit_in_0", "magvit_in_1"):
            tar.add(pairs / f"{name}.png", arcname=f"{name}.png")
            tar.add(pairs / f"{name}.txt", arcname=f"{name}.txt")
    r = prepare(str(tmp_path / "one.tar"), tmp_path / "p_tar", model=str(converted), log=lambda m: None, progress=False)
    d = PreparedData(tmp_path / "p_tar")
    np.testing.assert_array_equal(d.codes(0), load_npz("magvit")["codes"][0])
    assert r.kind == "captions" and d.meta(1)["caption"] == CAPTIONS["magvit_in_1"]
    llava = tmp_path / "l.jsonl"
    conv = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A bird."}]
    llava.write_text(json.dumps({"image": "pairs/magvit_in_1.png", "conversations": conv}) + "\n"
                     + json.dumps({"image": "pairs/missing.png", "conversations": conv}) + "\n")
    r = prepare(str(llava), tmp_path / "p_llava", model=str(converted), log=lambda m: None, progress=False)
    assert (r.kind, r.count, r.skipped) == ("conversations", 1, 1)
    assert PreparedData(tmp_path / "p_llava").meta(0)["conversations"] == conv


def test_text_data(tmp_path):
    from showo_mlx.train.data import TextData

    txt = make_text(tmp_path / "t.txt")
    d = TextData(txt)
    assert len(d) == 7 and d.text(1) == CAPTIONS["magvit_in_1"]
    jl = tmp_path / "t.jsonl"
    jl.write_text(json.dumps({"text": "héllo"}) + "\n\n" + json.dumps({"content": "world"}) + "\n")
    d = TextData(jl)
    assert [d.text(i) for i in range(len(d))] == ["héllo", "world"]


def test_sampler_is_a_pure_function_of_position():
    from showo_mlx.train.data import StreamSampler

    a, b = StreamSampler(7, seed=3, stream=0), StreamSampler(7, seed=3, stream=0)
    first = a.index(np.arange(0, 21))
    assert sorted(first[:7]) == list(range(7)) and sorted(first[7:14]) == list(range(7))
    np.testing.assert_array_equal(b.index([15, 3, 9]), first[[15, 3, 9]])
    assert not np.array_equal(StreamSampler(7, seed=3, stream=1).index(np.arange(7)), first[:7])


def test_batches_split_over_ranks_equal_one_big_batch(prepared, converted, tmp_path):
    from showo_mlx.config import ShowoConfig
    from showo_mlx.loading import read_model_config
    from showo_mlx.prompting import Prompting
    from showo_mlx.train.batches import BatchBuilder
    from showo_mlx.train.data import PreparedData, TextData
    from showo_mlx.train.losses import TaskRows

    root, _ = prepared
    cfg = ShowoConfig.from_dict(read_model_config(converted)["showo"])
    prompting = Prompting(converted, cfg)
    data, text = PreparedData(root / "prep"), TextData(make_text(tmp_path / "t.txt"))

    def builder(rows, world, accum=1):
        return BatchBuilder(prompting, rows=rows, t2i_data=data, mmu_data=data, lm_data=text, seed=5,
                            cond_dropout_prob=0.5, grad_accum=accum, world=world)

    big = builder(TaskRows(4, 2, 2), world=1).build(step=3)
    parts = [builder(TaskRows(2, 1, 1), world=2).build(step=3, rank=r) for r in range(2)]
    accum = [builder(TaskRows(2, 1, 1), world=1, accum=2).build(step=3, micro=a) for a in range(2)]
    order = [0, 1, 4, 6, 2, 3, 5, 7]  # big rows regrouped as [rank0: t2i t2i lm mmu | rank1: ...]
    for split in (parts, accum):
        ids = np.concatenate([p.ids for p in split])
        labels = np.concatenate([p.labels for p in split])
        np.testing.assert_array_equal(ids, big.ids[order])
        np.testing.assert_array_equal(labels, big.labels[order])
    # every row has the t2i length; the masked image tokens are [MASK] with the true id as label
    sp = prompting.ids
    assert big.ids.shape == (8, 129 + 64 + 2)
    t2i_img = big.ids[:4, 130:194]
    assert ((t2i_img == sp.mask) == (big.labels[:4, 130:194] != -100)).all()
    assert big.labels[0, 129] == sp.soi and big.labels[0, 194] == sp.eoi
    # condition dropout is decided per row by its own generator (seed, task, stream position)
    empty = prompting.t2i_text_block("")[0]
    dropped = [list(r[:129]) == empty for r in big.ids[:4]]
    assert dropped == [np.random.default_rng([5, 0, pos, 1]).random() < 0.5 for pos in range(12, 16)]
    # the same step twice gives the same batch (resume needs nothing but the step)
    again = builder(TaskRows(4, 2, 2), world=1).build(step=3)
    np.testing.assert_array_equal(again.ids, big.ids)
