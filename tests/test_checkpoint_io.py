"""Checkpoint reading (safetensors, torch zip .bin without torch, sharded) and atomic outputs."""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from showo_mlx import fsutil
from showo_mlx.checkpoint_io import describe_checkpoint, find_weight_files, iter_checkpoint, read_checkpoint
from showo_mlx.errors import CheckpointError, OutputExistsError, OutputWriteError, ShowoError
from showo_mlx.fsutil import atomic_output_dir, atomic_write_bytes, atomic_write_file

sys.path.insert(0, str(Path(__file__).parent))  # the helper sits next to this file
import torch_format as tf  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "showo"


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        assert got[key].tobytes() == want[key].tobytes(), key


def checkpoint_error(call) -> str:
    """Run `call`, require a one-line CheckpointError, return its message."""
    with pytest.raises(CheckpointError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


def write_safetensors_raw(path: Path, entries: list[tuple[str, str, list[int], bytes]]) -> Path:
    """A safetensors file written by hand (safetensors.numpy cannot write bfloat16)."""
    header, blobs, pos = {}, b"", 0
    for name, code, shape, blob in entries:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [pos, pos + len(blob)]}
        blobs += blob
        pos += len(blob)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + blobs)
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------
# The official fixture checkpoint
# ------------------------------------------------------------------------------------------------


def test_fixture_bin_equals_fixture_safetensors_bit_for_bit():
    reference = load_file(str(FIXTURE / "pytorch_model.safetensors"))  # the safetensors library
    from_bin = read_checkpoint(FIXTURE / "pytorch_model.bin")
    from_st = read_checkpoint(FIXTURE / "pytorch_model.safetensors")
    assert len(reference) == 41
    assert_same(from_bin, reference)
    assert_same(from_st, reference)
    assert all(a.flags.writeable and a.flags.c_contiguous for a in from_bin.values())


def test_fixture_folder_prefers_safetensors_and_describes_without_reading():
    assert find_weight_files(FIXTURE) == [FIXTURE / "pytorch_model.safetensors"]
    infos = describe_checkpoint(FIXTURE / "pytorch_model.bin")
    reference = load_file(str(FIXTURE / "pytorch_model.safetensors"))
    assert {k: (i.shape, i.dtype) for k, i in infos.items()} == {
        k: (v.shape, v.dtype) for k, v in reference.items()
    }


def test_folder_preference_order(tmp_path):
    arrays = {"a": np.ones(3, np.float32)}
    tf.save_torch(tmp_path / "pytorch_model.bin", arrays)
    assert find_weight_files(tmp_path) == [tmp_path / "pytorch_model.bin"]
    save_file(arrays, str(tmp_path / "model.safetensors"))
    assert find_weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    save_file(arrays, str(tmp_path / "pytorch_model.safetensors"))
    assert find_weight_files(tmp_path) == [tmp_path / "pytorch_model.safetensors"]


# ------------------------------------------------------------------------------------------------
# Round trips through our torch.save writer
# ------------------------------------------------------------------------------------------------


def sample_arrays(rng) -> dict[str, np.ndarray]:
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "f64": rng.standard_normal((2, 2, 2)),
        "i64": np.array([0, -1, 2**40, -(2**62)], np.int64),
        "i32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
        "i16": np.array([-300, 7], np.int16),
        "i8": np.array([-128, 127], np.int8),
        "u8": np.array([0, 255], np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"metadata": True},
        {"ordered_dict": False},
        {"archive": "pytorch_model"},
        {"byteorder": None},
        {"byteorder": "big"},
    ],
    ids=["ordereddict", "module-metadata", "plain-dict", "archive-name", "no-byteorder-record", "big-endian"],
)
def test_round_trip_all_dtypes(tmp_path, options):
    arrays = sample_arrays(np.random.default_rng(0))
    path = tf.save_torch(tmp_path / "x.bin", arrays, **options)
    got = read_checkpoint(path)
    assert_same(got, arrays)
    assert list(got) == list(arrays)  # state_dict order is kept


def test_strided_offset_and_shared_storages(tmp_path):
    storage = np.arange(24, dtype=np.float32)
    tensors = {
        "block": tf.StridedTensor(storage, (3, 4), (4, 1), offset=2),
        "transposed": tf.StridedTensor(storage, (4, 3), (1, 4), offset=2),
        "every_other": tf.StridedTensor(storage, (5,), (2,), offset=1),
        "broadcast": tf.StridedTensor(storage, (2, 3), (0, 1), offset=20),
        "whole": tf.StridedTensor(storage, (24,), (1,)),
    }
    got = read_checkpoint(tf.save_torch(tmp_path / "v.bin", tensors))
    with zipfile.ZipFile(tmp_path / "v.bin") as z:  # really one shared storage record
        assert [n for n in z.namelist() if "/data/" in n] == ["archive/data/0"]
    np.testing.assert_array_equal(got["block"], storage[2:14].reshape(3, 4))
    np.testing.assert_array_equal(got["transposed"], storage[2:14].reshape(3, 4).T)
    np.testing.assert_array_equal(got["every_other"], storage[1:11:2])
    np.testing.assert_array_equal(got["broadcast"], np.broadcast_to(storage[20:23], (2, 3)))
    np.testing.assert_array_equal(got["whole"], storage)
    got["whole"][:] = -1  # keys never alias each other
    assert got["block"][0, 0] == 2 and got["every_other"][0] == 1


def test_bfloat16_becomes_float32_exactly(tmp_path):
    values = np.array([1.5, -2.0, 0.15625, 2.0**127, -0.0, np.inf], np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bf16
    bin_path = tf.save_torch(tmp_path / "b.bin", {"w": tf.StridedTensor(bits, (2, 3), (3, 1), bfloat16=True)})
    st_path = write_safetensors_raw(tmp_path / "b.safetensors", [("w", "BF16", [2, 3], bits.tobytes())])
    for path in (bin_path, st_path):
        got = read_checkpoint(path)["w"]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, values.reshape(2, 3))
        assert describe_checkpoint(path)["w"].dtype == np.float32


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_sharded_with_index(tmp_path, fmt):
    rng = np.random.default_rng(1)
    shards = [
        {"a.weight": rng.standard_normal((4, 3)).astype(np.float32), "a.bias": np.zeros(4, np.float32)},
        {"b.weight": rng.standard_normal((2, 4)).astype(np.float32)},
    ]
    index = tf.save_sharded(tmp_path, shards, fmt)
    expected = {k: v for shard in shards for k, v in shard.items()}
    ext = "bin" if fmt == "bin" else "safetensors"
    assert find_weight_files(tmp_path) == [tmp_path / f"pytorch_model-0000{i}-of-00002.{ext}" for i in (1, 2)]
    assert_same(read_checkpoint(tmp_path), expected)
    assert_same(read_checkpoint(index), expected)
    streamed = iter_checkpoint(tmp_path, select=lambda k: k.startswith("b."))
    assert [k for k, _ in streamed] == ["b.weight"]


def test_safetensors_is_preferred_over_bin_shards(tmp_path):
    tf.save_sharded(tmp_path, [{"x": np.zeros(2, np.float32)}], "bin")
    tf.save_sharded(tmp_path, [{"x": np.ones(2, np.float32)}], "safetensors")
    assert read_checkpoint(tmp_path)["x"].tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------------------
# Hostile files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["system", "exec", "stack_global"])
def test_exploit_payload_is_live_under_plain_pickle(tmp_path, how):
    """Proves the refusal test below uses payloads that really run code when trusted."""
    marker = tmp_path / "pwned"
    with pytest.raises(ModuleNotFoundError):  # the exploit runs, then the torch import fails
        pickle.loads(tf.exploit_pickle(marker, how))
    assert marker.exists()


@pytest.mark.parametrize("how", ["system", "exec", "stack_global", "call_storage"])
def test_malicious_bin_is_refused_without_side_effects(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tf.save_malicious_torch(tmp_path / "pytorch_model.bin", marker, how)
    message = checkpoint_error(lambda: read_checkpoint(tmp_path))
    assert not marker.exists()
    assert message.startswith(f"{path}: refusing")
    assert "trusted source" in message
    if how == "system":
        assert f"'{os.system.__module__}.system'" in message
    checkpoint_error(lambda: describe_checkpoint(path))
    assert not marker.exists()


def test_other_globals_and_opcodes_are_refused(tmp_path):
    # A dotted name that would reach a function's globals through an allowed module.
    w = tf.PickleWriter(protocol=4).empty_dict().mark().str("k")
    w.glob("torch._utils", "_rebuild_tensor_v2.__globals__").setitems()
    tf.write_torch_zip(tmp_path / "dotted.bin", w.stop(), [])
    assert "refusing to unpickle 'torch._utils._rebuild_tensor_v2.__globals__'" in checkpoint_error(
        lambda: read_checkpoint(tmp_path / "dotted.bin")
    )
    # NEWOBJ (cls.__new__) is never needed by a state_dict.
    w = tf.PickleWriter().glob("collections", "OrderedDict").empty_tuple().op(b"\x81")
    tf.write_torch_zip(tmp_path / "newobj.bin", w.stop(), [])
    assert "refusing" in checkpoint_error(lambda: read_checkpoint(tmp_path / "newobj.bin"))


def test_legacy_torch_format_is_refused(tmp_path):
    path = tmp_path / "old.bin"
    path.write_bytes(tf.LEGACY_MAGIC + b"\x80\x02M\xe9\x03.")
    assert "legacy" in checkpoint_error(lambda: read_checkpoint(path))


# ------------------------------------------------------------------------------------------------
# Broken inputs: always a one-line CheckpointError naming the file
# ------------------------------------------------------------------------------------------------


def test_truncated_bin(tmp_path):
    good = tf.save_torch(tmp_path / "good.bin", {"w": np.ones((64, 64), np.float32)})
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 30):
        bad = tmp_path / "cut.bin"
        bad.write_bytes(data[:cut])
        assert str(bad) in checkpoint_error(lambda: read_checkpoint(bad))
    # Same length, zip directory intact, but the tensor bytes are damaged: the CRC catches it.
    start = data.index(np.ones(4, np.float32).tobytes())
    bad.write_bytes(data[:start] + b"\xff" * 8 + data[start + 8 :])
    assert "corrupt" in checkpoint_error(lambda: read_checkpoint(bad))


def test_storage_shorter_than_shape_needs(tmp_path):
    pkl, storages = tf.state_dict_pickle({"w": np.ones((4, 4), np.float32)})
    tf.write_torch_zip(tmp_path / "short.bin", pkl, [storages[0][:10]])
    assert "truncated" in checkpoint_error(lambda: read_checkpoint(tmp_path / "short.bin"))
    # A view that reaches past the end of an intact storage.
    over = tf.StridedTensor(np.zeros(6, np.float32), (3, 3), (3, 1))
    tf.save_torch(tmp_path / "over.bin", {"w": over})
    assert "reaches element 8" in checkpoint_error(lambda: read_checkpoint(tmp_path / "over.bin"))


def test_missing_storage_record_and_bad_archives(tmp_path):
    pkl, _ = tf.state_dict_pickle({"w": np.ones(3, np.float32)})
    tf.write_torch_zip(tmp_path / "nostorage.bin", pkl, [])
    assert "data/0" in checkpoint_error(lambda: read_checkpoint(tmp_path / "nostorage.bin"))

    with zipfile.ZipFile(tmp_path / "nopkl.bin", "w") as z:
        z.writestr("archive/version", "3\n")
    assert "no data.pkl" in checkpoint_error(lambda: read_checkpoint(tmp_path / "nopkl.bin"))

    tf.write_torch_zip(tmp_path / "garbagepkl.bin", b"\x80\x02garbage", [])
    assert "corrupt" in checkpoint_error(lambda: read_checkpoint(tmp_path / "garbagepkl.bin"))

    not_dict = tf.PickleWriter().str("just a string").stop()
    tf.write_torch_zip(tmp_path / "notdict.bin", not_dict, [])
    assert "state_dict" in checkpoint_error(lambda: read_checkpoint(tmp_path / "notdict.bin"))

    int_entry = tf.PickleWriter().empty_dict().mark().str("step").int(5).setitems().stop()
    tf.write_torch_zip(tmp_path / "intentry.bin", int_entry, [])
    message = checkpoint_error(lambda: read_checkpoint(tmp_path / "intentry.bin"))
    assert "'step' is of type int, not a tensor" in message


def test_truncated_and_corrupt_safetensors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": np.ones((32, 32), np.float32), "b": np.zeros(4, np.int64)}, str(good))
    data = good.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    cases = {
        "data": data[: len(data) - 100],  # download stopped inside the tensor data
        "header": data[: 8 + header_len // 2],  # stopped inside the JSON header
        "length": data[:5],
        "json": data[:8] + b"{" * header_len + data[8 + header_len :],
        "sizes": data.replace(b"[32,32]", b"[32,33]"),
        "dtype": data.replace(b'"I64"', b'"X64"'),
    }
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        assert str(bad) in checkpoint_error(lambda: read_checkpoint(bad)), name


def test_garbage_files(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("pytorch_model.bin", "pytorch_model.safetensors", "weights.dat"):
        bad = tmp_path / name
        bad.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        assert str(bad) in checkpoint_error(lambda: read_checkpoint(bad))
    empty = tmp_path / "zero.safetensors"
    empty.write_bytes(b"")
    checkpoint_error(lambda: read_checkpoint(empty))


def test_folders_without_weights(tmp_path):
    assert "empty" in checkpoint_error(lambda: read_checkpoint(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    message = checkpoint_error(lambda: find_weight_files(tmp_path))
    assert "config.json" in message and "pytorch_model.safetensors" in message
    checkpoint_error(lambda: read_checkpoint(tmp_path / "does-not-exist"))


def test_index_problems(tmp_path):
    index = tf.save_sharded(tmp_path, [{"a": np.ones(2, np.float32)}, {"b": np.ones(2, np.float32)}], "bin")
    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    message = checkpoint_error(lambda: iter_checkpoint(tmp_path))  # fails before any next()
    assert "pytorch_model-00002-of-00002.bin" in message and "missing" in message

    mapping = json.loads(index.read_text())
    first = "pytorch_model-00001-of-00002.bin"
    mapping["weight_map"] = {"a": first, "ghost": first}
    index.write_text(json.dumps(mapping))
    assert "'ghost'" in checkpoint_error(lambda: read_checkpoint(tmp_path))

    mapping["weight_map"] = {"a": "../pytorch_model-00001-of-00002.bin"}
    index.write_text(json.dumps(mapping))
    assert "outside its folder" in checkpoint_error(lambda: read_checkpoint(tmp_path))

    index.write_text("{not json")
    assert "index" in checkpoint_error(lambda: read_checkpoint(tmp_path))


def test_duplicate_keys_across_shards(tmp_path):
    one = np.ones(2, np.float32)
    index = tf.save_sharded(tmp_path, [{"a": one}, {"b": one}], "safetensors")
    save_file({"a": one, "b": one}, str(tmp_path / "pytorch_model-00002-of-00002.safetensors"))
    message = checkpoint_error(lambda: read_checkpoint(index))
    assert "'a' is also in pytorch_model-00001-of-00002.safetensors" in message


# ------------------------------------------------------------------------------------------------
# Atomic outputs
# ------------------------------------------------------------------------------------------------


def test_atomic_output_dir_success(tmp_path):
    dst = tmp_path / "nested" / "model"
    with atomic_output_dir(dst, force=False) as tmp:
        assert tmp.parent == dst.parent and tmp.name.startswith(".model.") and str(os.getpid()) in tmp.name
        assert not dst.exists()
        (tmp / "config.json").write_text("{}")
    assert (dst / "config.json").read_text() == "{}"
    assert leftovers(dst.parent) == []


def test_atomic_output_dir_failure_leaves_nothing(tmp_path):
    dst = tmp_path / "model"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_output_dir(dst, force=False) as tmp:
                (tmp / "half.safetensors").write_bytes(b"x")
                raise exc
        assert not dst.exists() and leftovers(tmp_path) == []


def test_atomic_output_dir_existing_dst(tmp_path):
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError) as info:
        with atomic_output_dir(dst, force=False):
            pytest.fail("the block must not run")
    assert "--force" in str(info.value) and "\n" not in str(info.value)
    assert (dst / "old.txt").read_text() == "old"

    with pytest.raises(ValueError):  # a failed rebuild under --force keeps the old output
        with atomic_output_dir(dst, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError("conversion failed")
    assert sorted(p.name for p in dst.iterdir()) == ["old.txt"]

    with atomic_output_dir(dst, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dst.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("failing", [".model.tmp-", ".model.new-"], ids=["marking-complete", "final-move"])
def test_failed_final_rename_restores_old_output(tmp_path, monkeypatch, failing):
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    real_rename = os.rename

    def rename(src, target):
        if Path(src).name.startswith(failing):
            raise OSError(28, "No space left on device")
        real_rename(src, target)

    monkeypatch.setattr(fsutil.os, "rename", rename)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        with atomic_output_dir(dst, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dst.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_unwritable_parent_is_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for call in (
        lambda: atomic_output_dir(blocker / "model").__enter__(),
        lambda: atomic_write_bytes(blocker / "x.png", b"png"),
    ):
        with pytest.raises(OutputWriteError) as info:
            call()
        assert isinstance(info.value, ShowoError) and "\n" not in str(info.value)
        assert str(blocker) in str(info.value)


def test_atomic_write_bytes_and_file(tmp_path):
    old_umask = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "out" / "a.png", b"first")
        assert path.read_bytes() == b"first" and path.stat().st_mode & 0o777 == 0o644
        atomic_write_bytes(path, b"second")
        assert path.read_bytes() == b"second"
        with pytest.raises(OutputExistsError):
            atomic_write_bytes(path, b"third", overwrite=False)
        with atomic_output_dir(tmp_path / "dir"):
            pass
        assert (tmp_path / "dir").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(old_umask)

    seen = []

    def writer(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"partial")
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError):
        atomic_write_file(path, writer)
    assert seen[0].parent == path.parent and seen[0].suffix == ".png"
    assert path.read_bytes() == b"second" and leftovers(path.parent) == []

    atomic_write_file(tmp_path / "w.safetensors", lambda tmp: save_file({"x": np.ones(2, np.float32)}, f"{tmp}"))
    assert read_checkpoint(tmp_path / "w.safetensors")["x"].tolist() == [1.0, 1.0]
    assert leftovers(tmp_path) == []
