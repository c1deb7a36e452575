"""Bad training input is refused with one line, before any work: configs (ranges, YAML bombs, binary
files), prepared data (corrupt, out-of-range codes, path traversal), prepare's own inputs."""

from __future__ import annotations

import json
import os
import pathlib
import re
import time
from pathlib import Path

import numpy as np
import pytest
from test_train_data import make_pairs
from typer.testing import CliRunner

from showo_mlx.cli import app
from showo_mlx.errors import TrainingConfigError

N_TOKENS, CODEBOOK = 64, 64  # the tiny fixture model: an 8×8 code grid, 64 codes


def write_prepared(folder: Path, codes=None, captions=None, *, index: dict | None = None) -> Path:
    """A `showo prepare` folder written directly (no MAGVIT encoding): one shard."""
    folder.mkdir(parents=True, exist_ok=True)
    if codes is None:
        codes = np.random.default_rng(0).integers(0, CODEBOOK, (4, N_TOKENS)).astype(np.uint16)
    codes = np.asarray(codes)
    n = len(codes)
    captions = captions if captions is not None else [f"a small picture number {i}" for i in range(n)]
    np.save(folder / "codes-00000.npy", codes)
    (folder / "meta-00000.jsonl").write_text("".join(json.dumps({"key": f"{i}.png", "caption": c}) + "\n"
                                                     for i, c in enumerate(captions)))
    base = {"format": "showo-prepared", "version": 1, "kind": "captions", "resolution": 128, "num_tokens": N_TOKENS,
            "codebook_size": CODEBOOK, "magvit": "test", "count": n,
            "shards": [{"codes": "codes-00000.npy", "meta": "meta-00000.jsonl", "count": n}]}
    base.update(index or {})
    (folder / "index.json").write_text(json.dumps(base))
    return folder


def _base_cfg(converted, data, out, **kw) -> dict:
    cfg = dict(model=str(converted), data=str(data), output=str(out), batch_t2i=1, batch_lm=0, batch_mmu=0,
               max_steps=2, warmup_steps=0, progress=False, log_every=1000)
    cfg.update(kw)
    return cfg


# -- config values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, words", [
    ("seed", -1, "seed must be in"),
    ("seed", 2**70, "seed must be in"),
    ("adam_beta1", 1.5, "adam_beta1 and adam_beta2 must be in [0, 1)"),
    ("adam_eps", -1, "adam_eps must be > 0"),
    ("lr", -1e-4, "lr and weight_decay must be >= 0"),
    ("weight_decay", -0.01, "lr and weight_decay must be >= 0"),
    ("lr", "nan", "lr must be a finite number"),
    ("lr", 10**400, "lr must be a finite number"),
    ("max_seq_length", 100_000, "max_seq_length must be in [2, 8192]"),
    ("max_nonfinite_steps", 0, "max_nonfinite_steps must be at least 1"),
    ("collective_timeout", -5, "collective_timeout must be >= 0"),
    ("preset", ["lora"], "preset must be a preset name"),
    ("output", 5, "output must be a non-empty string"),
    ("progress", "yes", "progress must be true or false"),
    ("lora_dropout", 1.0, "lora_dropout must be in [0, 1)"),
])
def test_out_of_range_config_values_are_refused_by_name(key, value, words):
    from showo_mlx.train.config import TrainConfig

    with pytest.raises(TrainingConfigError) as e:
        TrainConfig.from_dict({key: value})
    assert words in str(e.value) and "\n" not in str(e.value)


def _laughs(levels: int = 9) -> str:
    """The "billion laughs" YAML: 9 levels of 9 aliases = 9**9 strings from ~330 bytes."""
    parts, prev = ['&a [' + ",".join(['"lol"'] * 9) + "]"], "a"
    for name in "bcdefghijkl"[: levels - 1]:
        parts.append(f"&{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    return "freeze: [" + ", ".join(parts) + "]\n"


def test_yaml_bombs_binary_and_special_files_are_refused_quickly(tmp_path):
    from showo_mlx.train.config import TrainConfig, parse_set

    cases = {
        "laughs.yaml": (_laughs(), "aliases expand to more than"),
        "recursive.yaml": ("freeze: &a [*a]\n", "recursive alias"),
        "deep.yaml": ("freeze: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested too deeply"),
        # indentation nesting: as deep as 64 KiB allows; libyaml parses it, pure-Python PyYAML may recurse too deep
        "deep_block.yaml": ("freeze:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(340)),
                            "nested too deeply|freeze must be a list of strings"),
        "binary.yaml": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00garbage", "is not UTF-8 text"),
        "nul.yaml": ("lr: 1e-4\x00\n", "is not valid YAML"),
        "huge.yaml": ("# " + "x" * (64 << 10) + "\n", "larger than 64 KiB"),
        "many.yaml": ("val_prompts: [" + ",".join(["a"] * 40_000) + "]\n", "larger than 64 KiB"),
        "date.yaml": ("seed: 2020-99-99\n", "holds a value YAML cannot read"),
    }
    for name, (content, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        start = time.perf_counter()
        with pytest.raises(TrainingConfigError) as e:
            TrainConfig.load(path)
        assert re.search(words, str(e.value)) and "\n" not in str(e.value), (name, str(e.value))
        assert time.perf_counter() - start < 2.0, name
    os.mkfifo(tmp_path / "fifo.yaml")  # reading a FIFO would block forever
    with pytest.raises(TrainingConfigError, match="not a regular file"):
        TrainConfig.load(tmp_path / "fifo.yaml")
    with pytest.raises(TrainingConfigError, match="aliases expand"):
        parse_set("freeze=" + _laughs().split(": ", 1)[1])
    # plain aliases within the bounds still work
    ok = tmp_path / "ok.yaml"
    ok.write_text("freeze: &f [embed_tokens.*]\ntrain_only: *f\nlr: &lr 2e-4\n")
    cfg = TrainConfig.load(ok)
    assert cfg.freeze == cfg.train_only == ["embed_tokens.*"] and cfg.lr == 2e-4


def test_cli_gives_one_line_and_exit_2_for_bad_training_input(converted, tmp_path):
    runner = CliRunner()
    data = write_prepared(tmp_path / "prep")
    cases = []
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\x01\xff\xfe" * 64)
    cases.append(([str(binary)], "is not UTF-8 text"))
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text(_laughs())
    cases.append(([str(laughs)], "aliases expand"))
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps(_base_cfg(converted, data, tmp_path / "run")))  # JSON is YAML
    cases.append(([str(good), "--set", "seed=-1"], "seed must be in"))
    cases.append(([str(good), "--set", "adam_beta1=1.5"], "adam_beta1 and adam_beta2 must be in [0, 1)"))
    cases.append(([str(good), "--set", "adam_eps=-1"], "adam_eps must be > 0"))
    cases.append(([str(good), "--set", "lr=-0.001"], "lr and weight_decay must be >= 0"))
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    cases.append(([str(good), "--output", str(a_file)], "exists and is not a folder"))
    cases.append(([str(good), "--output", str(a_file / "run")], "a_file.txt is not a folder"))
    cases.append(([str(good), "--set", "max_seq_length=2000"], "model has 2048 positions"))
    bad_codes = write_prepared(tmp_path / "codes70", codes=np.full((2, N_TOKENS), 70, np.uint16))
    cases.append(([str(good), "--data", str(bad_codes)], "holds code 70, outside the codebook [0, 64)"))
    for args, words in cases:
        r = runner.invoke(app, ["train", *args])
        assert r.exit_code == 2, (args, r.output, r.exception)
        errors = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in r.output, (args, r.output)
    assert a_file.read_text() == "not a folder" and not (tmp_path / "run").exists()


# -- prepared data -----------------------------------------------------------------------------------
def _object_npy(path: Path, marker: Path) -> None:
    class Payload:  # unpickling it would create `marker`: proof that nothing was unpickled
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    arr = np.empty((2, N_TOKENS), dtype=object)
    arr[:] = Payload()
    np.save(path, arr, allow_pickle=True)


def _corrupt(case: str, folder: Path, marker: Path) -> None:
    codes = folder / "codes-00000.npy"
    meta = folder / "meta-00000.jsonl"
    index = json.loads((folder / "index.json").read_text())

    def set_index(**kw):
        index.update(kw)
        (folder / "index.json").write_text(json.dumps(index))

    def set_shard(**kw):
        index["shards"][0].update(kw)
        (folder / "index.json").write_text(json.dumps(index))

    if case.startswith("code_"):
        np.save(codes, np.full((4, N_TOKENS), int(case[5:]), np.int32 if "-" in case else np.uint16))
    elif case == "truncated_npy":
        codes.write_bytes(codes.read_bytes()[:200])
    elif case == "missing_npy":
        codes.unlink()
    elif case == "fifo_npy":  # opening a FIFO for reading would wait for a writer forever
        codes.unlink()
        os.mkfifo(codes)
    elif case == "object_npy":
        _object_npy(codes, marker)
        set_shard(count=2)
        set_index(count=2)
        meta.write_text("".join(line + "\n" for line in meta.read_text().splitlines()[:2]))
    elif case == "float_npy":
        np.save(codes, np.zeros((4, N_TOKENS), np.float32))
    elif case == "flat_shape":
        np.save(codes, np.zeros(4 * N_TOKENS, np.uint16))
    elif case == "wrong_tokens":
        np.save(codes, np.zeros((4, 32), np.uint16))
    elif case == "fewer_rows":
        np.save(codes, np.zeros((3, N_TOKENS), np.uint16))
    elif case == "not_npy":
        codes.write_bytes(b"this is not a numpy file at all" * 10)
    elif case == "index_not_json":
        (folder / "index.json").write_text('{"format": "showo-prepared", "shards": [')
    elif case == "index_string_tokens":
        set_index(num_tokens="64")
    elif case == "index_count_mismatch":
        set_index(count=7)
    elif case == "index_bad_kind":
        set_index(kind="pictures")
    elif case == "index_no_shards":
        set_index(shards=[])
    elif case == "traversal_codes":
        set_shard(codes="../codes-00000.npy")
    elif case == "traversal_meta":
        set_shard(meta="/etc/passwd")
    elif case == "subfolder_path":
        set_shard(codes="sub/codes-00000.npy")
    elif case == "missing_meta":
        meta.unlink()
    elif case == "short_meta":
        meta.write_text(meta.read_text().splitlines()[0] + "\n")
    elif case == "meta_not_json":
        lines = meta.read_text().splitlines()
        lines[1] = '{"key": "1.png", "capt'
        meta.write_text("\n".join(lines) + "\n")
    elif case == "meta_caption_type":
        lines = meta.read_text().splitlines()
        lines[2] = json.dumps({"key": "2.png", "caption": {"nested": 1}})
        meta.write_text("\n".join(lines) + "\n")
    elif case == "meta_not_utf8":
        lines = meta.read_bytes().splitlines()
        lines[0] = b'{"key": "0.png", "caption": "\xff\xfe"}'
        meta.write_bytes(b"\n".join(lines) + b"\n")
    else:
        raise AssertionError(case)


@pytest.mark.parametrize("case, words", [
    ("code_70", "holds code 70, outside the codebook [0, 64)"),
    ("code_600", "holds code 600"),
    ("code_60000", "holds code 60000"),
    ("code_-1", "holds code -1"),
    ("truncated_npy", "is not a readable codes array"),
    ("missing_npy", "codes-00000.npy is missing"),
    ("fifo_npy", "codes-00000.npy is not a regular file"),
    ("object_npy", "is not a readable codes array"),
    ("float_npy", "holds float32 values, not integer codes"),
    ("flat_shape", "has shape (256,), expected (4, 64)"),
    ("wrong_tokens", "has shape (4, 32), expected (4, 64)"),
    ("fewer_rows", "has shape (3, 64), expected (4, 64)"),
    ("not_npy", "is not a readable codes array"),
    ("index_not_json", "index.json is not valid JSON"),
    ("index_string_tokens", "num_tokens must be a positive integer"),
    ("index_count_mismatch", "count 7 differs from the shards' total 4"),
    ("index_bad_kind", "kind must be one of"),
    ("index_no_shards", "shards must be a non-empty list"),
    ("traversal_codes", "'../codes-00000.npy' is not a plain file name inside the folder"),
    ("traversal_meta", "'/etc/passwd' is not a plain file name"),
    ("subfolder_path", "is not a plain file name"),
    ("missing_meta", "meta-00000.jsonl is missing"),
    ("short_meta", "meta-00000.jsonl has 1 lines for 4 rows"),
    ("meta_not_json", "meta-00000.jsonl line 2 is not JSON"),
    ("meta_caption_type", "line 3 is not an object with a string caption"),
    ("meta_not_utf8", "meta-00000.jsonl is not UTF-8 text"),
])
def test_corrupt_prepared_data_is_refused_with_one_line(case, words, tmp_path):
    from showo_mlx.train.data import PreparedData

    folder = write_prepared(tmp_path / "prep")
    marker = tmp_path / "unpickled"
    _corrupt(case, folder, marker)
    with pytest.raises(TrainingConfigError) as e:
        data = PreparedData(folder)
        for i in range(len(data)):  # metadata lines are checked when their shard is first read
            data.codes(i), data.meta(i)
    message = str(e.value)
    assert words in message and "\n" not in message, message
    assert not marker.exists()  # allow_pickle stays False: the object array was never unpickled


def test_valid_prepared_data_reads_back(tmp_path):
    from showo_mlx.train.data import PreparedData

    codes = np.random.default_rng(1).integers(0, CODEBOOK, (4, N_TOKENS)).astype(np.uint16)
    codes[0, 0], codes[1, 1] = 0, CODEBOOK - 1  # both ends of the range are valid
    data = PreparedData(write_prepared(tmp_path / "prep", codes=codes))
    assert len(data) == 4 and data.meta(3)["caption"] == "a small picture number 3"
    np.testing.assert_array_equal(np.stack([data.codes(i) for i in range(4)]), codes)


# -- prepare ---------------------------------------------------------------------------------------
def test_prepare_counts_images_without_captions_and_bounds_the_resolution(converted, tmp_path):
    from showo_mlx.train.prepare import prepare
    from showo_mlx.train.sources import iter_source

    pairs = make_pairs(tmp_path / "all")
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name, caption in (("magvit_in_0", True), ("magvit_in_1", False), ("preprocess_in_0", False)):
        (folder / f"{name}.png").write_bytes((pairs / f"{name}.png").read_bytes())
        if caption:
            (folder / f"{name}.txt").write_text("a red cat")
    lines: list[str] = []
    result = prepare(str(folder), tmp_path / "prep", model=str(converted), log=lines.append, progress=False)
    assert (result.count, result.skipped, result.uncaptioned) == (1, 0, 2)
    assert json.loads((tmp_path / "prep" / "index.json").read_text())["uncaptioned"] == 2
    assert "warning: skipped 2 image(s) without a caption of 3" in lines
    assert "skipping magvit_in_1.png: no caption" in lines

    # a webdataset member without a caption is counted too (it used to vanish)
    import io
    import tarfile

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name in ("a.png", "a.txt", "b.png"):
            blob = b"a caption" if name.endswith(".txt") else (pairs / "magvit_in_0.png").read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    _, samples = iter_source(str(tmp_path / "s.tar"))
    assert [(s.key, s.caption) for s in samples] == [("s.tar:a", "a caption"), ("s.tar:b", None)]

    for resolution in (0, -16, 100_000):
        with pytest.raises(TrainingConfigError, match="--resolution must be between 1 and 1024"):
            prepare(str(folder), tmp_path / "never", model=str(converted), resolution=resolution, log=lines.append,
                    progress=False)
    assert not (tmp_path / "never").exists()


def test_tar_member_images_get_the_file_decoding_limits(monkeypatch):
    """Images read from tar shards (bytes) are decoded like files: a decompression bomb is refused
    from its header in one line, and a large-but-allowed one is a note, not a Pillow warning."""
    import io
    import warnings

    from PIL import Image

    from showo_mlx.errors import ImageInputError
    from showo_mlx.images import NOTES_KEY
    from showo_mlx.train.sources import _from_bytes

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buf, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 400 pixels: over twice the limit
    with pytest.raises(ImageInputError, match=r"^shard-0/cat\.png is too large to decode safely") as e:
        _from_bytes(buf.getvalue(), "shard-0/cat.png")()
    assert "\n" not in str(e.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # between the limit and twice it: decoded, noted
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would raise here
        im = _from_bytes(buf.getvalue(), "shard-0/cat.png")()
    assert im.size == (20, 20) and im.getpixel((0, 0)) == (200, 10, 10)
    assert any("decompression-bomb warning limit" in n for n in im.info[NOTES_KEY])
