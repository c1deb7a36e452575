"""Crafted checkpoints, configs and model folders (issue 16 items 7, 8, 10, 11): pickle bombs, a zip
bomb, malformed safetensors headers, NaN and mislabelled weights, links and special files. Every
one is refused with a one-line typed error, quickly and without large allocations.

The pickle and zip bombs run in a child process: before the fix one segfaulted the interpreter and
another ran for days, and a regression must fail this test, not take the test run down."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import load_file, save_file

import torch_format as tf
from conftest import REF
from showo_mlx import checkpoint_io
from showo_mlx.checkpoint_io import read_checkpoint
from showo_mlx.convert import convert
from showo_mlx.errors import CheckpointError, ShowoConfigError, ShowoError
from showo_mlx.loading import load_transformer

QUIET = dict(vq=REF / "magvitv2", tokenizer=REF / "tokenizer", log=lambda m: None)
ROOT = Path(__file__).resolve().parents[1]


def one_line(call, error=CheckpointError) -> str:
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def run_child(code: str, timeout: float = 30) -> list[dict]:
    """Run `code` in a fresh interpreter; it prints one JSON object per line."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"child died (rc {out.returncode}): {out.stderr[-2000:]}"
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging (a FIFO open blocks in the kernel; SIGALRM interrupts it)."""

    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------------
# Item 7: pickle bombs
# ------------------------------------------------------------------------------------------------


def deep_tuple_pickle(depth: int = 10**6) -> bytes:
    """{((((...)))): None}: 10^6 nested tuples (1 MB) used as a dict key (hashing it recursed in C)."""
    return b"\x80\x02}" + b")" + b"\x85" * depth + b"Ns."  # EMPTY_DICT EMPTY_TUPLE TUPLE1×n NONE SETITEM


def memo_bomb_pickle(levels: int = 40) -> bytes:
    """{t40: None} with t0 = () and t(i+1) = (t(i), t(i)) through the memo: 2^40 nodes in ~330 bytes."""
    out = b"\x80\x02}" + b")q\x000"  # EMPTY_DICT, EMPTY_TUPLE, BINPUT 0, POP
    for i in range(levels):
        out += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"  # GET GET TUPLE2 PUT POP
    return out + b"h" + bytes([levels]) + b"Ns."


def test_pickle_bombs_fail_fast_with_one_line(tmp_path):
    deep = tf.write_torch_zip(tmp_path / "deep.bin", deep_tuple_pickle(), [])
    memo = tf.write_torch_zip(tmp_path / "memo.bin", memo_bomb_pickle(), [])
    assert len(memo_bomb_pickle()) < 340 and deep.stat().st_size < 1_100_000
    code = f"""
import json, time
from showo_mlx.checkpoint_io import read_checkpoint
from showo_mlx.errors import CheckpointError
for path in {[str(deep), str(memo)]!r}:
    start = time.perf_counter()
    try:
        read_checkpoint(path)
        result = "loaded"
    except CheckpointError as e:
        result = str(e)
    print(json.dumps({{"path": path, "seconds": time.perf_counter() - start, "result": result}}))
"""
    results = run_child(code)
    assert len(results) == 2
    for r in results:
        # Measured < 0.5 s alone; the bound leaves room for a loaded CI machine and still tells a
        # bounded failure from the unbounded one (a segfault / a hang of days before the fix).
        assert r["seconds"] < 5, r
        assert r["result"].startswith(f"{r['path']}: data.pkl ") and "\n" not in r["result"], r
    assert "nests containers more than 64 deep" in results[0]["result"]
    assert "more than 50,000,000 objects" in results[1]["result"]


def test_unpickler_refuses_what_no_state_dict_needs(tmp_path, monkeypatch):
    def error(data: bytes) -> str:
        path = tf.write_torch_zip(tmp_path / "x.bin", data, [])
        return one_line(lambda: read_checkpoint(path))

    assert "dict key that is not a string" in error(b"\x80\x02}))\x86Ns.")  # {((), ()): None}
    assert "set" in error(b"\x80\x02\x8f.")  # EMPTY_SET
    assert "set" in error(b"\x80\x02(K\x01\x91.")  # FROZENSET
    assert "set" in error(b"\x80\x02\x8b\x04\x00\x00\x00\x01\x02\x03\x04.")  # LONG4
    assert "wider than 128 bits" in error(b"\x80\x02\x8a\x20" + b"\x01" * 32 + b".")  # a 256-bit LONG1
    assert "inside itself" in error(b"\x80\x02]q\x00h\x00a.")  # l = []; l.append(l)
    # a container modified after it was nested (how depth could otherwise grow unseen)
    assert "after nesting" in error(b"\x80\x02]q\x00h\x00\x850h\x00Na.")
    ordered_dict_of_pairs = tf.PickleWriter().glob("collections", "OrderedDict").mark().op(b"]")
    ordered_dict_of_pairs.mark().str("k").int(1).tuple().op(b"a").tuple().reduce()  # OrderedDict([("k", 1)])
    assert "with these arguments" in error(ordered_dict_of_pairs.stop())  # its keys could be anything to hash

    monkeypatch.setattr(checkpoint_io, "MAX_OPCODES", 1000)
    assert "more than 1,000 opcodes" in error(b"\x80\x02]" + b"(" + b"K\x01" * 1200 + b"e.")
    monkeypatch.setattr(checkpoint_io, "MAX_MEMO", 100)
    assert "more than 100 objects" in error(b"\x80\x02]" + b"".join(b"K\x01r" + struct.pack("<I", i) + b"0" for i in range(150)) + b".")


def test_bounded_unpickler_still_reads_real_state_dicts(tmp_path):
    # 2000 tensors with module metadata: far more structure than Show-o's 41-tensor fixture
    arrays = {f"layers.{i}.weight": np.full((2, 3), i, np.float32) for i in range(2000)}
    got = read_checkpoint(tf.save_torch(tmp_path / "many.bin", arrays, metadata=True))
    assert len(got) == 2000 and got["layers.1999.weight"][0, 0] == 1999


# ------------------------------------------------------------------------------------------------
# Item 8: a zip bomb .bin
# ------------------------------------------------------------------------------------------------


def raw_zip(path: Path, entries: list[tuple[str, bytes, int, int, int]]) -> Path:
    """A zip written by hand: (name, payload, method, declared uncompressed size, crc) per entry."""
    local, central = b"", b""
    for name, payload, method, size, crc in entries:
        n = name.encode()
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(payload), size, len(n), 0, 0, 0, 0, 0, len(local)
        ) + n
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(payload), size, len(n), 0) + n + payload
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return path


def central_entry(blob: bytes, name: bytes) -> int:
    """Offset of `name`'s record in a zip's central directory."""
    pos = blob.index(b"PK\x01\x02")
    while True:
        n, extra, comment = struct.unpack("<HHH", blob[pos + 28 : pos + 34])
        if blob[pos + 46 : pos + 46 + n] == name:
            return pos
        pos = blob.index(b"PK\x01\x02", pos + 46 + n + extra + comment)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS (the allocation cap) is enforced on Linux only")
def test_zip_bomb_declaring_3_gib_fails_fast_without_allocating(tmp_path):
    numel = 3 * 2**30 // 4  # a float32 tensor of 3 GiB
    storage = np.broadcast_to(np.zeros(1, np.float32), (numel,))  # declares numel, holds 4 bytes
    pkl, _ = tf.state_dict_pickle({"w": tf.StridedTensor(storage, (numel,), (1,))})
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(bytes(1 << 20)) + co.flush(zlib.Z_FULL_FLUSH)  # 1 MiB of zeros in ~1 kB
    stream = block * 3072 + co.flush(zlib.Z_FINISH)  # 3 GiB of zeros in 3.2 MB
    bomb = raw_zip(tmp_path / "bomb.bin", [
        ("archive/data.pkl", pkl, 0, len(pkl), zlib.crc32(pkl)),
        ("archive/data/0", stream, 8, 3 * 2**30, 0),
    ])  # fmt: skip
    assert bomb.stat().st_size < 4_000_000
    with zipfile.ZipFile(bomb) as z:
        assert z.getinfo("archive/data/0").file_size == 3 * 2**30
    code = f"""
import json, resource, time
from showo_mlx.checkpoint_io import read_checkpoint
from showo_mlx.errors import CheckpointError
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after the imports
start = time.perf_counter()
try:
    read_checkpoint({str(bomb)!r})
    result = "loaded"
except CheckpointError as e:
    result = str(e)
except MemoryError:
    result = "MemoryError"
print(json.dumps({{"seconds": time.perf_counter() - start, "result": result,
                  "grew_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline_mb}}))
"""
    (r,) = run_child(code)
    assert r["result"].startswith(str(bomb)) and "compressed" in r["result"], r
    # Measured < 0.5 s alone (39 s and 3.3 GB before the fix); the time bound allows for a loaded machine.
    assert r["seconds"] < 5 and r["grew_mb"] < 100, r  # the peak beyond what importing showo_mlx takes


def test_storage_record_sizes_must_match_what_they_declare(tmp_path):
    pkl, storages = tf.state_dict_pickle({"w": np.ones(4, np.float32)})
    tf.write_torch_zip(tmp_path / "long.bin", pkl, [np.ones(1000, np.float32)])  # 4000 bytes for 16
    assert "has 4000 bytes but declares 4 elements" in one_line(lambda: read_checkpoint(tmp_path / "long.bin"))
    good = tf.write_torch_zip(tmp_path / "good.bin", pkl, storages).read_bytes()
    # a central directory that claims a stored record is larger than the file
    entry = central_entry(good, b"archive/data/0")
    bad = bytearray(good)
    bad[entry + 20 : entry + 28] = struct.pack("<II", 10**8, 10**8)  # compressed and uncompressed sizes
    (tmp_path / "claims.bin").write_bytes(bytes(bad))
    assert "declares more bytes than the file holds" in one_line(lambda: read_checkpoint(tmp_path / "claims.bin"))


# ------------------------------------------------------------------------------------------------
# Item 10: safetensors headers, NaN and mislabelled weights
# ------------------------------------------------------------------------------------------------


def st_blob(header, data: bytes = b"", raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def f32(n: int) -> bytes:
    return np.arange(n, dtype=np.float32).tobytes()


def entry(dtype="F32", shape=(4,), offsets=(0, 16)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


CRAFTED_HEADERS = {
    "100k-deep-json": (st_blob(None, raw=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "not valid JSON"),
    "dimension-2^63": (st_blob({"w": entry(shape=(2**63, 0), offsets=(0, 0))}), "malformed shape"),
    "overlapping": (st_blob({"a": entry(), "b": entry(offsets=(8, 24))}, f32(6)), "overlaps another tensor"),
    "gap": (st_blob({"a": entry(), "b": entry(offsets=(24, 40))}, f32(10)), "leaves a gap"),
    "unused-tail": (st_blob({"a": entry()}, f32(5)), "unused bytes at the end"),
    "past-the-end": (st_blob({"a": entry(shape=(8,), offsets=(0, 32))}, f32(4)), "past the end of the file"),
    "fractional-shape": (st_blob({"a": entry(shape=(2.5,), offsets=(0, 8))}, f32(2)), "malformed shape"),
    "boolean-dimension": (st_blob({"a": entry(shape=(True, 2), offsets=(0, 8))}, f32(2)), "malformed shape"),
    "negative-dimension": (st_blob({"a": entry(shape=(-2,), offsets=(0, 8))}, f32(2)), "malformed shape"),
    "string-offsets": (st_blob({"a": entry(offsets=("0", "16"))}, f32(4)), "malformed data offsets"),
    "non-string-metadata": (st_blob({"__metadata__": {"x": 1}, "a": entry()}, f32(4)), "__metadata__"),
    "duplicate-names": (st_blob(None, f32(4), raw=b'{"a":' + json.dumps(entry()).encode() + b',"a":' + json.dumps(entry()).encode() + b"}"), "not valid JSON"),
}


@pytest.mark.parametrize("name", list(CRAFTED_HEADERS))
def test_crafted_safetensors_headers_are_refused(tmp_path, name):
    blob, needle = CRAFTED_HEADERS[name]
    path = tmp_path / "w.safetensors"
    path.write_bytes(blob)
    message = one_line(lambda: read_checkpoint(path))
    assert message.startswith(str(path)) and needle in message, message
    if name != "duplicate-names":  # the library keeps the last duplicate; we refuse the ambiguity
        with pytest.raises((SafetensorError, ValueError)):  # the safetensors library's own verdict
            st_load(blob)


def test_converted_weights_are_validated_before_mx_load(tmp_path, converted):
    folder = tmp_path / "model"
    shutil.copytree(converted, folder)
    blob = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    name = next(k for k in header if k.endswith("fc1.weight"))
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin - 16, end - 16]  # overlaps its neighbour; mx.load accepts that
    text = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n :])
    message = one_line(lambda: load_transformer(folder))
    assert "model.safetensors" in message and f"'{name}'" in message


def official_copy(tmp_path: Path, weights: dict[str, np.ndarray] | None = None) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REF / "showo" / "config.json", src / "config.json")
    if weights is None:
        shutil.copy(REF / "showo" / "pytorch_model.safetensors", src / "pytorch_model.safetensors")
    else:
        save_file(weights, str(src / "pytorch_model.safetensors"))
    return src


def test_nan_weights_are_refused_at_conversion_with_a_count(tmp_path):
    weights = load_file(str(REF / "showo" / "pytorch_model.safetensors"))
    key = "showo.model.layers.1.mlp.fc2.weight"
    bad = weights[key].copy()
    bad.reshape(-1)[[3, 7, 11]] = np.nan
    bad.reshape(-1)[20] = -np.inf
    weights[key] = bad
    message = one_line(lambda: convert(official_copy(tmp_path, weights), tmp_path / "out", **QUIET))
    assert f"tensor '{key}' holds 3 NaN and 1 infinite values of {weights[key].size}" in message
    assert not (tmp_path / "out").exists()


def test_float_weights_declared_as_integers_are_refused_at_conversion(tmp_path):
    src = official_copy(tmp_path)
    path = src / "pytorch_model.safetensors"
    blob = path.read_bytes()
    key = "showo.model.final_layernorm.weight"
    at = blob.index(b'"F32"', blob.index(f'"{key}"'.encode()))
    assert at < blob.index(b"}", blob.index(f'"{key}"'.encode()))  # inside this tensor's entry
    path.write_bytes(blob[:at] + b'"I32"' + blob[at + 5 :])  # same byte size: still well-formed
    message = one_line(lambda: convert(src, tmp_path / "out", **QUIET))
    assert f"tensor '{key[len('showo.model.'):]}' is stored as int32" in message


# ------------------------------------------------------------------------------------------------
# Item 11: links and special files in a model folder
# ------------------------------------------------------------------------------------------------


def model_folder(tmp_path: Path) -> Path:
    src = official_copy(tmp_path)
    for p in (REF / "tokenizer").iterdir():
        shutil.copy(p, src / p.name)
    return src


def test_tokenizer_linked_outside_the_folder_is_not_copied(tmp_path):
    src = model_folder(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("ssh-rsa AAAA private")
    (src / "tokenizer_config.json").unlink()
    (src / "tokenizer_config.json").symlink_to(secret)
    message = one_line(lambda: convert(src, tmp_path / "out", vq=REF / "magvitv2", log=lambda m: None), ShowoError)
    assert "tokenizer_config.json links to" in message and "outside" in message
    assert not (tmp_path / "out").exists()


def test_special_files_are_never_opened(tmp_path):
    src = model_folder(tmp_path)
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to("/dev/zero")  # an endless file
    with deadline(10):
        message = one_line(lambda: convert(src, tmp_path / "out", vq=REF / "magvitv2", log=lambda m: None), ShowoError)
    assert "tokenizer.json" in message and "not a regular file" in message
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")  # opening a FIFO for reading blocks until a writer comes
    with deadline(10):
        message = one_line(lambda: convert(src, tmp_path / "out2", **QUIET), ShowoConfigError)
    assert "config.json is not a regular file" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_oversized_tokenizer_file_is_refused(tmp_path, monkeypatch):
    from showo_mlx import convert as conv

    monkeypatch.setitem(conv.TOKENIZER_LIMITS, "merges.txt", 1000)
    src = model_folder(tmp_path)
    message = one_line(lambda: convert(src, tmp_path / "out", vq=REF / "magvitv2", log=lambda m: None), ShowoError)
    assert "merges.txt is" in message and "more than the 1,000" in message


def test_hub_cache_snapshot_links_into_its_blob_store_still_convert(tmp_path):
    """huggingface_hub stores snapshots as symlinks into ../../blobs: those files are inside."""
    repo = tmp_path / "hub" / "models--showlab--show-o"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    files = [REF / "showo" / "config.json", REF / "showo" / "pytorch_model.safetensors", *(REF / "tokenizer").iterdir()]
    for i, f in enumerate(files):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    out = convert(snap, tmp_path / "out", vq=REF / "magvitv2", log=lambda m: None)
    for p in (REF / "tokenizer").iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes() and not (out / p.name).is_symlink()


def test_training_checkpoint_with_an_overlapping_header_is_refused(tmp_path):
    from showo_mlx.errors import TrainingConfigError
    from showo_mlx.train.checkpoint import load_checkpoint

    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "trainable.safetensors").write_bytes(CRAFTED_HEADERS["overlapping"][0])  # mx.load takes it
    save_file({"step": np.zeros(1, np.float32)}, str(tmp_path / "optimizer.safetensors"))
    message = one_line(lambda: load_checkpoint(tmp_path), TrainingConfigError)
    assert "trainable.safetensors" in message and "overlaps another tensor" in message
