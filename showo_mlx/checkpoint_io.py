"""Read official PyTorch checkpoints as NumPy arrays, safely and without torch.

Supported inputs (a folder, or one file):

* ``*.safetensors`` — parsed here (header JSON + raw little-endian data), every offset checked
  against the file size before any data is read.
* ``*.bin`` written by ``torch.save`` (zip format, torch >= 1.6) — ``data.pkl`` is unpickled by a
  restricted unpickler that only knows the handful of globals a state_dict needs and maps them to
  our own functions; nothing from the file is ever imported or called. Any other global
  (``os.system``, ``builtins.eval``, ...) raises `CheckpointError` before it could run.
  The legacy pre-1.6 (non-zip) torch format is refused with a one-line error.
* Sharded checkpoints with a Hugging Face index (``*.safetensors.index.json`` /
  ``*.bin.index.json``: ``{"weight_map": {key: shard_file}}``).

dtypes: float64/32/16, int64/32/16/8, uint8 (and wider uints in safetensors), bool are returned
as-is (native byte order). **bfloat16 is converted to float32** (exactly, since every bf16 value
is a float32 with the low 16 bits zero), because NumPy has no bfloat16. float8 is refused.

Memory: tensors are read one at a time straight into their final NumPy buffers, so
`iter_checkpoint` holds one tensor (plus the storage it comes from, for .bin views) and
`read_checkpoint` holds one copy of the checkpoint, never two.

Every failure on a bad input is a `CheckpointError` whose message is one line naming the file
and the fix.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from .errors import CheckpointError

__all__ = [
    "TensorInfo",
    "check_safetensors",
    "find_weight_files",
    "describe_checkpoint",
    "iter_checkpoint",
    "read_checkpoint",
]

# Preference order inside a folder: safetensors before .bin (no pickle at all), the official
# name (`pytorch_model.*`, what Show-o's loader looks for) before the generic one, single files
# before sharded ones.
_SINGLE_SAFETENSORS = ("pytorch_model.safetensors", "model.safetensors")
_INDEX_SAFETENSORS = ("pytorch_model.safetensors.index.json", "model.safetensors.index.json")
_SINGLE_BIN = ("pytorch_model.bin",)
_INDEX_BIN = ("pytorch_model.bin.index.json",)
_CANDIDATES = _SINGLE_SAFETENSORS + _INDEX_SAFETENSORS + _SINGLE_BIN + _INDEX_BIN

_CHUNK = 64 << 20  # bytes per read call: big enough to be fast, small enough not to double memory
_MAX_HEADER = 100_000_000  # the safetensors library's own bound on the JSON header
MAX_NDIM = 64  # torch's limit on tensor dimensions
MAX_DIM = 2**31 - 1  # MLX shapes are 32-bit; no weight of a real model comes close

_REDOWNLOAD = "re-download it or convert it again from a trusted source"


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint holds under one key, known without reading the tensor data."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype  # dtype of the array `iter_checkpoint` returns (bfloat16 → float32)
    file: Path


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _fail(path: Path | str, problem: str, fix: str = _REDOWNLOAD) -> CheckpointError:
    return CheckpointError(_one_line(f"{path}: {problem}; {fix}"))


# --------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------


def find_weight_files(path: str | Path) -> list[Path]:
    """The weight files `read_checkpoint(path)` will read, in reading order.

    `path` is a folder (searched for the names above, safetensors preferred), a weight file, or an
    index JSON (→ its shards, in first-mention order)."""
    files, _ = _resolve(Path(path))
    return files


def _resolve(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """(files to read, weight_map or None). Fails early on anything missing."""
    if path.is_dir():
        for name in _CANDIDATES:
            if (path / name).is_file():
                return _resolve(path / name)
        try:
            present = sorted(p.name for p in path.iterdir())[:8]
        except OSError as exc:
            raise _fail(path, f"cannot be listed ({exc.strerror})", "check the folder permissions") from None
        what = "it is empty" if not present else f"it holds {', '.join(present)}"
        raise _fail(
            path,
            f"no weight file found ({what}); expected one of {', '.join(_CANDIDATES)}",
            "point to the folder that holds the downloaded checkpoint",
        )
    if not path.is_file():
        raise _fail(path, "no such file or folder", "check the path")
    if path.name.endswith(".json"):
        return _resolve_index(path)
    return [path], None


def _resolve_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise _fail(index, f"not a valid shard index ({type(exc).__name__}: {exc})") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise _fail(index, "'weight_map' must map tensor names to shard file names")
    shards: list[Path] = []
    for shard_name in dict.fromkeys(weight_map.values()):  # first-mention order, no repeats
        shard = index.parent / shard_name
        if Path(shard_name).name != shard_name:  # a shard must stay inside the checkpoint folder
            raise _fail(
                index, f"names shard '{shard_name}' outside its folder", "use an index with plain file names"
            )
        if not shard.is_file():
            raise _fail(
                index,
                f"lists shard '{shard_name}', which is missing",
                "download the complete checkpoint (every shard named in the index)",
            )
        shards.append(shard)
    return shards, weight_map


# --------------------------------------------------------------------------------------------
# Public reading API
# --------------------------------------------------------------------------------------------


def describe_checkpoint(path: str | Path) -> dict[str, TensorInfo]:
    """Name → shape/dtype/file of every tensor, from the headers only (no tensor data is read)."""
    files, weight_map = _resolve(Path(path))
    out: dict[str, TensorInfo] = {}
    for file in files:
        with _open_weight_file(file) as reader:
            for info in reader.infos():
                _check_new_key(out, info, file)
                out[info.name] = info
    _check_index(weight_map, out, files)
    return out


def iter_checkpoint(
    path: str | Path, select: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) one tensor at a time, file by file (use this for 5.8 GB checkpoints).

    `select(name) -> bool` skips unwanted tensors without reading their data. Every file header
    (and the index, if any) is validated here, before the first tensor is read, so a broken
    shard fails fast instead of after minutes of reading."""
    describe_checkpoint(path)
    return _stream_tensors(find_weight_files(path), select)


def _stream_tensors(files: list[Path], select) -> Iterator[tuple[str, np.ndarray]]:
    for file in files:
        with _open_weight_file(file) as reader:
            yield from reader.tensors(select)


def read_checkpoint(
    folder_or_file: str | Path, select: Callable[[str], bool] | None = None
) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as a dict of NumPy arrays (see the module doc for formats)."""
    return dict(iter_checkpoint(folder_or_file, select))


def _check_new_key(seen: dict[str, TensorInfo], info: TensorInfo, file: Path) -> None:
    if info.name in seen:
        raise _fail(
            file,
            f"tensor '{info.name}' is also in {seen[info.name].file.name}",
            "the shards overlap; " + _REDOWNLOAD,
        )


def _check_index(weight_map: dict[str, str] | None, infos: dict[str, TensorInfo], files) -> None:
    if weight_map is None:
        return
    for name, shard in weight_map.items():
        info = infos.get(name)
        if info is None or info.file.name != shard:
            where = "in no shard" if info is None else f"in {info.file.name}"
            raise _fail(
                files[0].parent,
                f"the index puts '{name}' in {shard} but it is {where}",
                "the shards do not match their index; " + _REDOWNLOAD,
            )


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def check_safetensors(path: str | Path) -> dict[str, TensorInfo]:
    """Validate a safetensors file's header by the format's rules (see `_SafetensorsReader`)
    without reading tensor data: call it before handing a file to a reader that does not check
    (mx.load accepts overlapping offsets, fractional shapes and wrapped dimensions)."""
    with _open_weight_file(Path(path), safetensors_only=True) as reader:
        return {info.name: info for info in reader.infos()}


def _open_weight_file(path: Path, safetensors_only: bool = False) -> "_SafetensorsReader | _TorchZipReader":
    """Pick the reader by content, not by name (a renamed file still reads correctly)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a FIFO or a device
            raise _fail(path, "is not a regular file (a FIFO, device or folder)", "point to the weight file itself")
        if safetensors_only:
            return _SafetensorsReader(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror})", "check the file permissions")
    if head.startswith(b"PK"):
        return _TorchZipReader(path)
    if head.startswith(_LEGACY_TORCH_MAGIC):
        raise _fail(
            path,
            "is in the legacy (pre-1.6, non-zip) torch.save format, which is not supported",
            "re-save it with a recent torch.save or convert it to safetensors",
        )
    if path.suffix in (".bin", ".pt", ".pth"):
        raise _fail(path, "is not a torch.save zip archive (corrupt or not a checkpoint)")
    try:
        return _SafetensorsReader(path)
    except CheckpointError:
        if path.suffix == ".safetensors":
            raise
        raise _fail(path, "is neither a safetensors file nor a torch.save zip archive") from None


# pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2): the magic number the legacy format starts with.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


def _read_into(stream: BinaryIO, out: np.ndarray, path: Path) -> None:
    """Fill `out` (contiguous) from `stream` in bounded chunks, so no second full-size copy exists."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    pos = 0
    while pos < len(view):
        got = stream.readinto(view[pos : pos + _CHUNK])
        if not got:
            raise _fail(path, "tensor data ends early (the file is truncated)")
        pos += got


def _to_native(arr: np.ndarray) -> np.ndarray:
    # Files are little-endian; only a big-endian host needs a swap.
    if arr.dtype.byteorder not in ("=", "|") and not arr.dtype.isnative:
        return arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    # bfloat16 is the upper half of a float32: widening the bits is exact.
    return (bits.astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------


def _no_duplicate_names(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate name in a safetensors header")
    return out

_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}  # fmt: skip


@dataclass(frozen=True)
class _StEntry:
    name: str
    raw_dtype: np.dtype  # dtype of the bytes on disk
    bf16: bool
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int


class _SafetensorsReader:
    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")
        try:
            self.entries = self._parse_header()
        except BaseException:
            self.file.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def _parse_header(self) -> list[_StEntry]:
        """The header, validated by the safetensors format's own rules: bounded size, a flat JSON
        object (no duplicate names), integer shapes within MAX_DIM, sizes that match dtype × shape,
        and data offsets that tile the data section exactly (from 0, no gaps, no overlaps, up to
        the end of the file)."""
        size = os.fstat(self.file.fileno()).st_size
        raw = self.file.read(8)
        if len(raw) < 8:
            raise _fail(self.path, "is too short to be a safetensors file (truncated or not weights)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise _fail(self.path, "safetensors header is truncated or corrupt (bad header length)")
        text = self.file.read(n)
        if not text.startswith(b"{") or not text.rstrip(b" ").endswith(b"}"):  # padded with spaces
            # (checked before decoding: a corrupt length can make the "header" megabytes of data)
            raise _fail(self.path, "safetensors header is not a JSON object (corrupt or not weights)")
        try:
            header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicate_names)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise _fail(self.path, "safetensors header is not valid JSON (corrupt or not weights)") from None
        if not isinstance(header, dict):
            raise _fail(self.path, "safetensors header is not a JSON object")
        metadata = header.get("__metadata__") or {}  # MLX writes null when there is none
        if not isinstance(metadata, dict) or not all(type(v) is str for v in metadata.values()):
            raise _fail(self.path, "safetensors __metadata__ must map names to strings")
        data_start, data_len = 8 + n, size - 8 - n
        entries = [
            self._parse_entry(name, spec, data_start) for name, spec in header.items() if name != "__metadata__"
        ]
        end = 0
        for e in sorted(entries, key=lambda e: (e.start, e.nbytes)):
            if e.start - data_start != end:
                problem = "overlaps another tensor" if e.start - data_start < end else "leaves a gap before it"
                raise _fail(self.path, f"tensor '{e.name:.80}' {problem} (data offsets must tile the data)")
            end += e.nbytes
        if end != data_len:
            where = "lie past the end of the file (truncated download)" if end > data_len else "leave unused bytes at the end"
            raise _fail(self.path, f"the tensors' data offsets {where}")
        return entries

    def _parse_entry(self, name: str, spec, data_start: int) -> _StEntry:
        try:
            code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        except (TypeError, KeyError):
            raise _fail(self.path, f"header entry '{name:.80}' is malformed") from None
        if type(shape) is not list or len(shape) > MAX_NDIM or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
            raise _fail(self.path, f"tensor '{name:.80}' has a malformed shape (not a list of up to {MAX_NDIM} integers from 0 to {MAX_DIM})")
        if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int and 0 <= o < 2**63 for o in offsets):
            raise _fail(self.path, f"tensor '{name:.80}' has malformed data offsets")
        if type(code) is not str or code not in _ST_DTYPES:
            raise _fail(
                self.path,
                f"tensor '{name:.80}' has unsupported dtype {str(code)[:20]}",
                "convert the checkpoint to float32/float16/bfloat16 first",
            )
        raw = np.dtype(_ST_DTYPES[code])
        begin, end = offsets
        need = math.prod(shape) * raw.itemsize
        if end - begin != need:
            raise _fail(self.path, f"tensor '{name:.80}' has {end - begin} bytes but shape {shape} needs {need}")
        return _StEntry(name, raw, code == "BF16", tuple(shape), data_start + begin, end - begin)

    def infos(self) -> list[TensorInfo]:
        def out_dtype(e: _StEntry) -> np.dtype:
            return np.dtype(np.float32) if e.bf16 else e.raw_dtype.newbyteorder("=")

        return [TensorInfo(e.name, e.shape, out_dtype(e), self.path) for e in self.entries]

    def tensors(self, select) -> Iterator[tuple[str, np.ndarray]]:
        for entry in self.entries:
            if select is None or select(entry.name):
                yield entry.name, self._read(entry)

    def _read(self, entry: _StEntry) -> np.ndarray:
        arr = np.empty(entry.shape, dtype=entry.raw_dtype)
        self.file.seek(entry.start)
        _read_into(self.file, arr, self.path)
        return _bf16_bits_to_f32(arr) if entry.bf16 else _to_native(arr)


# --------------------------------------------------------------------------------------------
# torch.save zip archives
# --------------------------------------------------------------------------------------------
#
# Layout written by torch.save (torch >= 1.6): a zip whose entries live under one folder
# `<archive>/`: `data.pkl` (the pickled state_dict), `data/<key>` (one raw storage per key),
# `byteorder` ("little"/"big", absent in old files = little), `version`, and a few bookkeeping
# records. In data.pkl each tensor is
#     torch._utils._rebuild_tensor_v2(<persistent id>, storage_offset, size, stride,
#                                     requires_grad, backward_hooks[, metadata])
# and the persistent id is ('storage', torch.<Type>Storage, key, location, numel).

# torch storage class name → NumPy dtype of its elements (None = bfloat16, read as uint16 bits).
_TORCH_STORAGES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": None,
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}  # fmt: skip


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for torch.<X>Storage: only remembers the element dtype."""

    name: str
    dtype: str | None  # None = bfloat16

    def __repr__(self) -> str:
        return f"torch.{self.name}"


@dataclass(frozen=True)
class _StorageRef:
    key: str
    stype: _StorageType
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A tensor as data.pkl describes it; the data stays in the zip until it is wanted."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _TypeMarker:
    """Stand-in for torch.Tensor / torch.nn.Parameter (only used as `_rebuild_from_type_v2` args)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _make_tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):  # the pre-v2 spelling
    return _make_tensor_ref(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("a Parameter must wrap a tensor")
    return data  # a Parameter is just its data for a state_dict


def _rebuild_from_type_v2(func, new_type, args, state):
    known = (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter)
    if not any(func is k for k in known) or not isinstance(new_type, _TypeMarker) or type(args) is not tuple:
        raise pickle.UnpicklingError("unexpected tensor subclass rebuild")
    return func(*args)


def _make_tensor_ref(storage, offset, size, stride) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor without a storage")
    if type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride) or len(size) > MAX_NDIM:
        raise pickle.UnpicklingError("tensor with a malformed size/stride")
    if not all(type(v) is int and 0 <= v <= MAX_DIM for v in size) or not all(
        type(v) is int and 0 <= v < 2**63 for v in (offset, *stride)
    ):
        raise pickle.UnpicklingError("tensor with a malformed or out-of-range offset/size/stride")
    return _TensorRef(storage, offset, size, stride)


_TENSOR_TYPES = {("torch", "Tensor"), ("torch.nn.parameter", "Parameter")}

# The complete list of globals a state_dict pickle may name, mapped to our own objects.
_SAFE_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    **{key: _TypeMarker(".".join(key)) for key in _TENSOR_TYPES},
    **{("torch", name): _StorageType(name, dt) for name, dt in _TORCH_STORAGES.items()},
}
# What REDUCE may call (storage types and tensor-type markers are names, never called).
_CALLABLE = (
    collections.OrderedDict, _rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter, _rebuild_from_type_v2,
)  # fmt: skip

# Bounds on the work a data.pkl may ask for. A state_dict needs about 25 opcodes and 30 bytes of
# pickle per tensor and nests containers 4 deep; these limits are far above any real checkpoint
# (100k tensors) and stop hostile pickles (10^6 nested tuples, exponential memo sharing) at once.
MAX_PICKLE_BYTES = 256 << 20
MAX_OPCODES = 10_000_000
MAX_MEMO = 2_000_000
MAX_DEPTH = 64  # container nesting
MAX_WEIGHT = 50_000_000  # objects reachable from one container, shared ones counted every time
MAX_INT_BITS = 128


class _RefusedGlobal(Exception):
    """Raised inside unpickling; turned into a CheckpointError that names the file."""


class _TooComplex(Exception):
    """A bound of the restricted unpickler was hit (a hostile or corrupt data.pkl)."""


def _describe(obj) -> str:
    """A short, bounded description (never the repr of file content, which can be unbounded)."""
    if isinstance(obj, (_StorageType, _TypeMarker)):
        return repr(obj)
    for allowed in _CALLABLE:
        if obj is allowed:
            return allowed.__name__
    return f"a {type(obj).__name__}"


def _key_ok(key) -> bool:
    return type(key) in (str, int)  # hashing them is O(1); a tuple key can take exponential time


class _StateDictUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Unpickles a torch state_dict without importing or calling anything from the file.

    The pure-Python unpickler is used (data.pkl is small: ~100 bytes per tensor) because its
    opcode table can be tightened: besides `find_class` (the only way a pickle can name a
    global), every opcode that calls or mutates an object checks its target against our own
    allow-list, and extension codes (which bypass `find_class` through a process-wide cache) are
    refused.

    Work is bounded too: opcodes, memo entries and big ints are counted; every container records
    its nesting depth and its weight (objects reachable, shared ones counted each time, which is
    what a recursive walk would visit), dict keys must be strings or ints (no hashing of nested
    objects), sets are refused, and a container that was put inside another can no longer be
    modified (so depths stay exact and no cycle can form). Nothing from the file is ever repr'd."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file):
        super().__init__(file)
        self._ops = 0
        self._shape: dict[int, tuple[object, int, int]] = {}  # id → (container, depth, weight)
        self._nested: set[int] = set()

    # -- bookkeeping --------------------------------------------------------------------------

    def _measure(self, obj) -> tuple[int, int]:
        entry = self._shape.get(id(obj))
        return (entry[1], entry[2]) if entry is not None else (0, 1)

    def _record_container(self, obj, children, base: tuple[int, int] = (0, 1)) -> None:
        depth, weight = base
        for child in children:
            if child is obj:
                raise _TooComplex("puts a container inside itself")
            d, w = self._measure(child)
            depth, weight = max(depth, d + 1), weight + w
            if id(child) in self._shape:
                self._nested.add(id(child))
        if depth > MAX_DEPTH:
            raise _TooComplex(f"nests containers more than {MAX_DEPTH} deep")
        if weight > MAX_WEIGHT:
            raise _TooComplex(f"builds a structure of more than {MAX_WEIGHT:,} objects (shared parts counted each time)")
        self._shape[id(obj)] = (obj, max(depth, 1), weight)

    def _fill(self, target, kinds: tuple[type, ...], children, keys=()) -> None:
        """Checks before APPEND(S)/SETITEM(S)/BUILD add `children` to `target`."""
        if type(target) not in kinds:
            raise _RefusedGlobal(f"refusing to add items to {_describe(target)}")
        if id(target) in self._nested:
            raise _TooComplex("modifies a container after nesting it in another")
        if not all(_key_ok(k) for k in keys):
            raise _TooComplex("uses a dict key that is not a string or an integer")
        self._record_container(target, children, self._measure(target))

    # -- opcodes ------------------------------------------------------------------------------

    def find_class(self, module: str, name: str):
        obj = _SAFE_GLOBALS.get((module, name))
        if obj is None:
            raise _RefusedGlobal(f"refusing to unpickle '{module:.80}.{name:.80}'")
        return obj

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id ({_describe(pid)})")
        _, stype, key, _location, numel = pid
        well_formed = isinstance(stype, _StorageType) and type(key) is str and len(key) < 256 and type(numel) is int
        if not well_formed or not 0 <= numel < 2**63:
            raise pickle.UnpicklingError("malformed storage reference")
        return _StorageRef(key, stype, numel)

    def _load_reduce(self):
        func, args = self.stack[-2], self.stack[-1]
        if not any(func is allowed for allowed in _CALLABLE):
            raise _RefusedGlobal(f"refusing to call {_describe(func)}")
        if type(args) is not tuple or (func is collections.OrderedDict and args):
            raise _RefusedGlobal(f"refusing to call {_describe(func)} with these arguments")
        pickle._Unpickler.load_reduce(self)  # type: ignore[attr-defined]
        if type(self.stack[-1]) is collections.OrderedDict:
            self._record_container(self.stack[-1], ())

    def _load_build(self):
        # BUILD sets attributes; only state_dict's `{"_metadata": ...}` on a dict instance is
        # expected (no slot state, which would go through setattr).
        inst, state = self.stack[-2], self.stack[-1]
        if not isinstance(inst, dict) or type(state) is not dict:
            raise _RefusedGlobal(f"refusing to set state on {_describe(inst)}")
        self._fill(inst, (dict, collections.OrderedDict), (state,))
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    def _load_setitem(self):
        target, key, value = self.stack[-3], self.stack[-2], self.stack[-1]
        self._fill(target, (dict, collections.OrderedDict), (key, value), keys=(key,))
        pickle._Unpickler.load_setitem(self)  # type: ignore[attr-defined]

    def _load_setitems(self):
        target, items = self.metastack[-1][-1], self.stack
        self._fill(target, (dict, collections.OrderedDict), items, keys=items[0::2])
        pickle._Unpickler.load_setitems(self)  # type: ignore[attr-defined]

    def _load_append(self):
        self._fill(self.stack[-2], (list,), (self.stack[-1],))
        pickle._Unpickler.load_append(self)  # type: ignore[attr-defined]

    def _load_appends(self):
        self._fill(self.metastack[-1][-1], (list,), self.stack)
        pickle._Unpickler.load_appends(self)  # type: ignore[attr-defined]

    def _load_dict(self):
        if not all(_key_ok(k) for k in self.stack[0::2]):
            raise _TooComplex("uses a dict key that is not a string or an integer")
        pickle._Unpickler.load_dict(self)  # type: ignore[attr-defined]
        self._record_container(self.stack[-1], self.stack[-1].values())

    def _refuse_opcode(self):
        raise _RefusedGlobal("refusing an object-construction, set or extension opcode")

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.APPEND[0]] = _load_append
    dispatch[pickle.APPENDS[0]] = _load_appends
    dispatch[pickle.DICT[0]] = _load_dict
    for _op in (
        pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2, pickle.EXT4,
        pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET, pickle.LONG4,
    ):  # fmt: skip
        dispatch[_op[0]] = _refuse_opcode


def _new_container(fn):
    """After an opcode that builds a tuple/list/dict from the stack: record its depth and weight."""

    def step(self):
        fn(self)
        top = self.stack[-1]
        self._record_container(top, top.values() if isinstance(top, dict) else top)

    return step


def _big_int_check(fn):
    def step(self):
        fn(self)
        if self.stack[-1].bit_length() > MAX_INT_BITS:
            raise _TooComplex(f"holds an integer wider than {MAX_INT_BITS} bits")

    return step


def _memo_check(fn):
    def step(self):
        fn(self)
        if len(self.memo) > MAX_MEMO:
            raise _TooComplex(f"memoises more than {MAX_MEMO:,} objects")

    return step


def _counted(fn):
    def step(self):
        self._ops += 1
        if self._ops > MAX_OPCODES:
            raise _TooComplex(f"has more than {MAX_OPCODES:,} opcodes")
        fn(self)

    return step


def _tighten(dispatch: dict) -> None:
    for op in (pickle.EMPTY_TUPLE, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3,
               pickle.EMPTY_LIST, pickle.LIST, pickle.EMPTY_DICT):  # fmt: skip
        dispatch[op[0]] = _new_container(dispatch[op[0]])
    for op in (pickle.LONG, pickle.LONG1):
        dispatch[op[0]] = _big_int_check(dispatch[op[0]])
    for op in (pickle.PUT, pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE):
        dispatch[op[0]] = _memo_check(dispatch[op[0]])
    for code, fn in list(dispatch.items()):
        dispatch[code] = _counted(fn)


_tighten(_StateDictUnpickler.dispatch)


def _unpickle_state_dict(data: bytes, path: Path) -> dict[str, _TensorRef]:
    try:
        obj = _StateDictUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as exc:
        raise _fail(
            path,
            f"{exc} (only tensor data is allowed)",
            "convert the file from a trusted source",
        ) from None
    except _TooComplex as exc:
        raise _fail(
            path,
            f"data.pkl {exc}, which no state_dict needs (the file is corrupt or hostile)",
            "convert the file from a trusted source",
        ) from None
    except (Exception, RecursionError) as exc:  # any parse failure of a corrupt data.pkl
        raise _fail(path, f"data.pkl is corrupt ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(obj, dict):
        raise _fail(
            path, f"holds a {type(obj).__name__}, not a state_dict", "save model.state_dict() instead"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, _TensorRef):
            raise _fail(
                path,
                f"entry {str(key)[:80]!r} is of type {type(value).__name__}, not a tensor",
                "only plain state_dicts are supported; save model.state_dict() instead",
            )
    return obj


class _TorchZipReader:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.size = path.stat().st_size
            self.zip = zipfile.ZipFile(path)
        except Exception as exc:  # BadZipFile, OSError, EOFError, NotImplementedError (version), ...
            problem = f"is not a readable zip archive ({_one_line(exc)}; truncated or corrupt)"
            raise _fail(path, problem) from None
        try:
            self._parse()
        except BaseException:
            self.zip.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.zip.close()

    def _entry(self, name: str, what: str) -> zipfile.ZipInfo:
        """The zip entry of record `name`, checked before a byte of it is read: torch.save stores
        records uncompressed and unencrypted, so the bytes an entry declares must physically be in
        the file (a compressed entry could inflate 1000-fold: a zip bomb)."""
        try:
            entry = self.zip.getinfo(self.prefix + name)
        except KeyError:
            raise _fail(self.path, f"{what} '{name}' is missing from the archive") from None
        if entry.compress_type != zipfile.ZIP_STORED or entry.flag_bits & 0x1:
            raise _fail(self.path, f"{what} '{name}' is compressed or encrypted, which torch.save never does (altered file)")
        if entry.file_size != entry.compress_size or entry.header_offset + entry.compress_size > self.size:
            raise _fail(self.path, f"{what} '{name}' declares more bytes than the file holds (truncated or corrupt)")
        return entry

    def _record(self, name: str, limit: int) -> bytes:
        entry = self._entry(name, "record")
        if entry.file_size > limit:
            raise _fail(self.path, f"record '{name}' has {entry.file_size:,} bytes, more than the {limit:,} it may have")
        try:
            return self.zip.read(entry)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as exc:
            raise _fail(self.path, f"record '{name}' is corrupt ({_one_line(exc)[:120]})") from None  # bad CRC, cut-off data

    def _parse(self) -> None:
        # data.pkl sits at the top or in exactly one folder (the archive name is arbitrary).
        pkls = [n for n in self.zip.namelist() if n.split("/")[-1] == "data.pkl" and n.count("/") <= 1]
        if len(pkls) != 1:
            raise _fail(self.path, "is a zip but not a torch.save checkpoint (no data.pkl)")
        self.prefix = pkls[0][: -len("data.pkl")]
        names = set(self.zip.namelist())
        order = "little"  # files from torch < 1.10 have no record and were written little-endian
        if self.prefix + "byteorder" in names:
            order = self._record("byteorder", 16).decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise _fail(self.path, f"unknown byteorder record {order!r}")
        self.endian = "<" if order == "little" else ">"
        self.tensors_ref = _unpickle_state_dict(self._record("data.pkl", MAX_PICKLE_BYTES), self.path)
        for name, ref in self.tensors_ref.items():
            self._check_fits(name, ref)

    def _storage_entry(self, key: str) -> zipfile.ZipInfo:
        return self._entry(f"data/{key}", "storage")

    def _itemsize(self, stype: _StorageType) -> int:
        return 2 if stype.dtype is None else np.dtype(stype.dtype).itemsize

    def _check_fits(self, name: str, ref: _TensorRef) -> None:
        """Reject a tensor whose view reaches past its storage, or a storage whose record does not
        hold exactly the bytes its declared element count needs (checked before any allocation)."""
        st = ref.storage
        entry = self._storage_entry(st.key)
        need = st.numel * self._itemsize(st.stype)
        if entry.file_size < need:
            problem = f"storage of '{name}' has {entry.file_size} bytes but needs {need} (truncated)"
            raise _fail(self.path, problem)
        if entry.file_size > need:
            problem = f"storage of '{name}' has {entry.file_size} bytes but declares {st.numel} elements ({need} bytes)"
            raise _fail(self.path, problem)
        if math.prod(ref.shape) > 0:
            last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
            if last >= st.numel:
                problem = f"tensor '{name}' reaches element {last} of a {st.numel}-element storage"
                raise _fail(self.path, problem)

    def _out_dtype(self, stype: _StorageType) -> np.dtype:
        return np.dtype(np.float32) if stype.dtype is None else np.dtype(stype.dtype)

    def infos(self) -> list[TensorInfo]:
        return [
            TensorInfo(name, ref.shape, self._out_dtype(ref.storage.stype), self.path)
            for name, ref in self.tensors_ref.items()
        ]

    def tensors(self, select) -> Iterator[tuple[str, np.ndarray]]:
        wanted = [(n, r) for n, r in self.tensors_ref.items() if select is None or select(n)]
        # Several tensors may view one storage: keep a storage only while a pending tensor needs it.
        pending = collections.Counter(r.storage.key for _, r in wanted)
        cache: dict[str, np.ndarray] = {}
        for name, ref in wanted:
            key = ref.storage.key
            storage = cache.get(key)
            if storage is None:
                storage = self._read_storage(ref.storage)
            pending[key] -= 1
            if pending[key]:
                cache[key] = storage
            else:
                cache.pop(key, None)
            yield name, self._view(ref, storage, shared=pending[key] > 0)

    def _read_storage(self, st: _StorageRef) -> np.ndarray:
        raw = np.dtype(st.stype.dtype or "u2").newbyteorder(self.endian)
        arr = np.empty(st.numel, dtype=raw)
        try:
            with self.zip.open(f"{self.prefix}data/{st.key}") as stream:
                _read_into(stream, arr, self.path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as exc:
            raise _fail(self.path, f"storage 'data/{st.key}' is corrupt ({_one_line(exc)[:120]})") from None
        return arr

    def _view(self, ref: _TensorRef, storage: np.ndarray, shared: bool) -> np.ndarray:
        n = math.prod(ref.shape)
        whole = ref.offset == 0 and n == storage.size and ref.stride == _contiguous_strides(ref.shape)
        if whole and not shared:
            arr = storage.reshape(ref.shape)  # the common case: the tensor is its whole storage
        elif n == 0:
            arr = np.empty(ref.shape, dtype=storage.dtype)
        else:
            item = storage.dtype.itemsize
            arr = np.lib.stride_tricks.as_strided(
                storage[ref.offset :], shape=ref.shape, strides=[s * item for s in ref.stride]
            ).copy()  # own the data: no aliasing between keys, and the storage can be freed
        return _bf16_bits_to_f32(arr) if ref.storage.stype.dtype is None else _to_native(arr)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))
