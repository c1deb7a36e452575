"""Write torch.save-compatible checkpoints (zip format) from NumPy arrays, without torch.

Test helper: lets tests build tiny `.bin` checkpoints (single, sharded with an index, with
shared/strided/offset storages, big-endian) and hostile ones, to exercise
`showo_mlx.checkpoint_io`.

The format, as torch.save (>= 1.6) writes it: an uncompressed zip whose entries sit in one folder
`<archive>/`:

    <archive>/data.pkl      pickle (protocol 2) of the state_dict
    <archive>/byteorder     b"little" (or b"big")
    <archive>/data/<key>    raw bytes of one storage per key
    <archive>/version       b"3\\n"

In data.pkl every tensor is the call
    torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                    collections.OrderedDict())
where `storage` is a persistent id ('storage', torch.<Type>Storage, key, 'cpu', numel) that the
loader resolves to `data/<key>`. The pickle is emitted opcode by opcode because the globals it
names (torch._utils, torch.FloatStorage) cannot be pickled without torch installed.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

# NumPy dtype → the storage class torch.save names for it.
STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


@dataclass
class StridedTensor:
    """A tensor that views a (possibly shared) 1-D storage with an offset and element strides.

    Passing the *same* `storage` object for several tensors makes them share one `data/<key>`
    record, as torch does for views and tied weights. `bfloat16=True` means `storage` holds the
    raw bfloat16 bits as uint16."""

    storage: np.ndarray
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0
    bfloat16: bool = False


# --------------------------------------------------------------------------------------------
# A minimal protocol-2 pickle emitter
# --------------------------------------------------------------------------------------------


class PickleWriter:
    """Emits pickle opcodes; just enough for state_dicts (and for hostile payloads in tests)."""

    def __init__(self, protocol: int = 2):
        self.out = bytearray(b"\x80" + bytes([protocol]))  # PROTO

    def op(self, code: bytes) -> "PickleWriter":
        self.out += code
        return self

    def str(self, text: str) -> "PickleWriter":
        data = text.encode("utf-8")
        return self.op(b"X" + struct.pack("<I", len(data)) + data)  # BINUNICODE

    def int(self, value: int) -> "PickleWriter":
        if -(2**31) <= value < 2**31:
            return self.op(b"J" + struct.pack("<i", value))  # BININT
        n = (value.bit_length() + 8) // 8  # room for the sign bit
        return self.op(b"\x8a" + bytes([n]) + value.to_bytes(n, "little", signed=True))  # LONG1

    def bool(self, value: bool) -> "PickleWriter":
        return self.op(b"\x88" if value else b"\x89")  # NEWTRUE / NEWFALSE

    def glob(self, module: str, name: str) -> "PickleWriter":
        return self.op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")  # GLOBAL

    def int_tuple(self, values) -> "PickleWriter":
        self.op(b"(")  # MARK
        for v in values:
            self.int(int(v))
        return self.op(b"t")  # TUPLE

    def mark(self) -> "PickleWriter":
        return self.op(b"(")

    def tuple(self) -> "PickleWriter":
        return self.op(b"t")

    def reduce(self) -> "PickleWriter":
        return self.op(b"R")

    def empty_dict(self) -> "PickleWriter":
        return self.op(b"}")

    def empty_tuple(self) -> "PickleWriter":
        return self.op(b")")

    def setitems(self) -> "PickleWriter":
        return self.op(b"u")

    def persid(self) -> "PickleWriter":
        return self.op(b"Q")  # BINPERSID: the object below is a persistent id

    def stop(self) -> bytes:
        return bytes(self.out + b".")


def _emit_tensor(w: PickleWriter, storage_name: str, key: str, numel: int, t: StridedTensor) -> None:
    w.glob("torch._utils", "_rebuild_tensor_v2").mark()
    w.mark().str("storage").glob("torch", storage_name).str(key).str("cpu").int(numel).tuple().persid()
    w.int(t.offset).int_tuple(t.shape).int_tuple(t.stride).bool(False)
    w.glob("collections", "OrderedDict").empty_tuple().reduce()  # backward hooks
    w.tuple().reduce()


def _contiguous(arr: np.ndarray) -> StridedTensor:
    flat = np.ascontiguousarray(arr).reshape(-1)
    strides, step = [], 1
    for n in reversed(arr.shape):
        strides.append(step)
        step *= n
    return StridedTensor(flat, tuple(arr.shape), tuple(reversed(strides)))


def state_dict_pickle(
    tensors: Mapping[str, np.ndarray | StridedTensor], ordered_dict: bool = True, metadata: bool = False
) -> tuple[bytes, list[np.ndarray]]:
    """(data.pkl bytes, storages in key order) for a state_dict of arrays / StridedTensors.

    `metadata=True` adds what `nn.Module.state_dict()` carries: the OrderedDict's attribute
    `_metadata = OrderedDict({"": {"version": 1}})`, set through a BUILD opcode."""
    w = PickleWriter()
    if ordered_dict:  # model.state_dict() is an OrderedDict
        w.glob("collections", "OrderedDict").empty_tuple().reduce()
    else:
        w.empty_dict()
    storages: list[np.ndarray] = []
    keys: dict[int, str] = {}  # id(storage) → key, so one storage object is written once
    w.mark()
    for name, value in tensors.items():
        t = value if isinstance(value, StridedTensor) else _contiguous(np.asarray(value))
        if id(t.storage) not in keys:
            keys[id(t.storage)] = str(len(storages))
            storages.append(t.storage)
        storage_name = "BFloat16Storage" if t.bfloat16 else STORAGE_NAMES[t.storage.dtype]
        w.str(name)
        _emit_tensor(w, storage_name, keys[id(t.storage)], t.storage.size, t)
    w.setitems()
    if metadata:
        w.empty_dict().str("_metadata").glob("collections", "OrderedDict").empty_tuple().reduce()
        w.mark().str("").empty_dict().str("version").int(1).op(b"s").setitems()  # SETITEM
        w.op(b"s").op(b"b")  # state dict done; BUILD applies it to the state_dict
    return w.stop(), storages


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_torch_zip(
    path: str | Path,
    data_pkl: bytes,
    storages: list[np.ndarray],
    *,
    archive: str = "archive",
    byteorder: str | None = "little",
) -> Path:
    """Assemble the zip around an existing data.pkl (byteorder=None omits the record, like old torch)."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", data_pkl)
        if byteorder is not None:
            z.writestr(f"{archive}/byteorder", byteorder)
        for key, storage in enumerate(storages):
            raw = storage.astype(storage.dtype.newbyteorder("<" if byteorder != "big" else ">"))
            z.writestr(f"{archive}/data/{key}", raw.tobytes())
        z.writestr(f"{archive}/version", b"3\n")
    return path


def save_torch(
    path: str | Path,
    tensors: Mapping[str, np.ndarray | StridedTensor],
    *,
    archive: str = "archive",
    byteorder: str | None = "little",
    ordered_dict: bool = True,
    metadata: bool = False,
) -> Path:
    """torch.save(state_dict, path) for NumPy arrays / StridedTensors."""
    data_pkl, storages = state_dict_pickle(tensors, ordered_dict, metadata)
    return write_torch_zip(path, data_pkl, storages, archive=archive, byteorder=byteorder)


def save_sharded(
    folder: str | Path, shards: list[Mapping[str, np.ndarray]], fmt: str = "bin"
) -> Path:
    """Write HF-style shards (`pytorch_model-0000i-of-0000n.<ext>`) and their index; returns the index."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ext = "bin" if fmt == "bin" else "safetensors"
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.{ext}"
        if fmt == "bin":
            save_torch(folder / name, shard)
        else:
            from safetensors.numpy import save_file

            save_file(dict(shard), str(folder / name))
        weight_map.update({key: name for key in shard})
    index = folder / f"pytorch_model.{ext}.index.json"
    total = sum(np.asarray(a).nbytes for shard in shards for a in shard.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


# --------------------------------------------------------------------------------------------
# Hostile and broken files
# --------------------------------------------------------------------------------------------


def exploit_pickle(marker: str | Path, how: str = "system") -> bytes:
    """A state_dict pickle whose loading *executes code* that creates `marker`.

    how: "system" (os.system('touch …')), "exec" (builtins.exec), "stack_global" (builtins.eval
    named through protocol 4's STACK_GLOBAL), "call_storage" (REDUCE on an allowed but
    non-callable global). The exploit entry comes before a legitimate tensor so a loader that
    trusts the file runs it first."""
    marker = str(marker)
    code = f"open({marker!r}, 'w').write('pwned')"
    w = PickleWriter(protocol=4 if how == "stack_global" else 2)
    w.empty_dict().mark().str("evil")
    if how == "system":
        w.glob(os.system.__module__, "system").mark().str(f"touch '{marker}'").tuple().reduce()
    elif how == "exec":
        w.glob("builtins", "exec").mark().str(code).tuple().reduce()
    elif how == "stack_global":
        w.str("builtins").str("eval").op(b"\x93").mark().str(code).tuple().reduce()
    elif how == "call_storage":
        w.glob("torch", "FloatStorage").mark().str(code).tuple().reduce()
    else:
        raise ValueError(how)
    w.str("ok")
    _emit_tensor(w, "FloatStorage", "0", 1, StridedTensor(np.zeros(1, np.float32), (1,), (1,)))
    w.setitems()
    return w.stop()


def save_malicious_torch(path: str | Path, marker: str | Path, how: str = "system") -> Path:
    """A well-formed torch zip whose data.pkl is `exploit_pickle(marker, how)`."""
    return write_torch_zip(path, exploit_pickle(marker, how), [np.zeros(1, np.float32)])


# What the legacy (pre-1.6, non-zip) torch.save format starts with: the pickled magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
