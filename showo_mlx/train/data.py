"""Training-time datasets and the deterministic sampler.

* `PreparedData`: the output of `showo prepare` (codes memory-mapped shard by shard, captions or
  conversations read per shard).
* `TextData`: documents for the lm rows from a ``.txt`` (one document per non-empty line) or a
  ``.jsonl`` (``{"text": ...}`` or RefinedWeb's ``{"content": ...}``); only line offsets are kept.
* `StreamSampler`: position p of an endless stream → dataset index. Each epoch is a permutation
  seeded by (seed, stream, epoch), so the sample at any position is a pure function of the
  position. That is what makes resume exact (the data position is just the step) and lets every
  rank of a data-parallel run take its own slice of the same global batch without talking.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import TrainingConfigError
from .prepare import FORMAT, INDEX

META_CACHE = 4  # shards whose metadata stay in memory
CODES_CACHE = 64  # shards whose codes stay memory-mapped (each mapping holds a file descriptor)
MAX_INDEX_BYTES = 64 << 20  # index.json holds ~100 bytes per shard
KINDS = ("captions", "conversations")


class PreparedData:
    """A `showo prepare` folder, checked when opened: index.json's fields and types, every shard's
    file name (a plain name inside the folder), codes dtype (integer, never object: allow_pickle
    stays False), shape ``(count, num_tokens)``, value range ``[0, codebook_size)``, and the number
    of metadata lines. Codes out of range would index past the embedding table (garbage or a
    segfault), so nothing is trained on before every code has been range-checked. Metadata lines
    are parsed (and checked) when their shard is first read."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self._read_index()
        self.index = index
        self.kind: str = index["kind"]
        self.num_tokens: int = index["num_tokens"]
        self.codebook_size: int = index["codebook_size"]
        self.shards: list[dict] = index["shards"]
        self.starts = np.cumsum([0] + [s["count"] for s in self.shards])
        self.clip: dict | None = index.get("clip")  # CLIP crops for w_clip_vit mmu rows
        self._codes: OrderedDict[int, np.ndarray] = OrderedDict()
        self._clip: dict[int, np.ndarray] = {}
        self._meta: OrderedDict[int, list[dict]] = OrderedDict()
        for s in range(len(self.shards)):
            self._check_codes(s)
            self._check_meta_lines(s)
            if self.clip is not None:
                self._check_clip(s)

    # -- checks on open ---------------------------------------------------------------------------
    def _bad(self, problem: str) -> TrainingConfigError:
        return TrainingConfigError(f"prepared data {self.folder}: {problem}; re-run `showo prepare`")

    def _read_index(self) -> dict:
        path = self.folder / INDEX
        if not path.is_file():
            raise TrainingConfigError(f"{self.folder} is not prepared data (no {INDEX}); run `showo prepare` first")
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_INDEX_BYTES + 1)
            if len(raw) > MAX_INDEX_BYTES:
                raise self._bad(f"{INDEX} is larger than {MAX_INDEX_BYTES >> 20} MiB")
            index = json.loads(raw.decode("utf-8"))
        except OSError as e:
            raise self._bad(f"{INDEX} cannot be read ({e.strerror or e})") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise self._bad(f"{INDEX} is not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise TrainingConfigError(f"{path} was not written by `showo prepare`")
        if index.get("kind") not in KINDS:
            raise self._bad(f"{INDEX} kind must be one of {list(KINDS)}, got {_short(index.get('kind'))}")
        # Understanding-only data (a w_clip_vit model converted without MAGVIT) has CLIP crops and no codes.
        has_codes = index.get("clip") is None or index.get("num_tokens") != 0
        for key in ("num_tokens", "codebook_size"):
            if not _is_int(index.get(key)) or index[key] < (1 if has_codes else 0):
                raise self._bad(f"{INDEX} {key} must be a positive integer, got {_short(index.get(key))}")
        shards = index.get("shards")
        if not isinstance(shards, list) or not shards:
            raise self._bad(f"{INDEX} shards must be a non-empty list")
        files = ("codes",) * has_codes + ("meta",) + ("clip",) * (index.get("clip") is not None)
        for i, shard in enumerate(shards):
            if not isinstance(shard, dict) or not _is_int(shard.get("count")) or shard["count"] < 0:
                raise self._bad(f"{INDEX} shard {i} needs a non-negative integer count")
            for key in files:
                name = shard.get(key)
                # A plain file name: "../x", "/etc/x" or "a/b" would read outside the folder.
                if not isinstance(name, str) or not name or Path(name).name != name or name in (".", "..") or "\\" in name:
                    raise self._bad(f"{INDEX} shard {i} {key} file {_short(name)} is not a plain file name inside the folder")
        total = sum(s["count"] for s in shards)
        if "count" in index and index["count"] != total:
            raise self._bad(f"{INDEX} count {_short(index['count'])} differs from the shards' total {total}")
        return index

    def _load_codes(self, s: int, key: str = "codes") -> np.ndarray:
        path = self.folder / self.shards[s][key]
        if not path.is_file():  # missing, a folder, or a FIFO (opening one would block)
            raise self._bad(f"{path.name} is missing" if not path.exists() else f"{path.name} is not a regular file")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise self._bad(f"{path.name} is missing") from None
        except (OSError, ValueError, EOFError) as e:  # truncated, not .npy, object dtype, ...
            raise self._bad(f"{path.name} is not a readable {key} array ({' '.join(str(e).split())[:120]})") from None

    def _check_clip(self, s: int) -> None:
        crops = self._load_codes(s, "clip")
        name, count = self.shards[s]["clip"], self.shards[s]["count"]
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[0] != count or crops.shape[3] != 3:
            raise self._bad(f"{name} has {crops.dtype} values of shape {crops.shape}, expected uint8 ({count}, H, W, 3) CLIP crops")

    def _check_codes(self, s: int) -> None:
        if not self.num_tokens:  # understanding-only data: CLIP crops instead of codes
            return
        codes = self._load_codes(s)
        name, count = self.shards[s]["codes"], self.shards[s]["count"]
        if codes.dtype.kind not in "iu":
            raise self._bad(f"{name} holds {codes.dtype} values, not integer codes")
        if codes.shape != (count, self.num_tokens):
            raise self._bad(f"{name} has shape {codes.shape}, expected ({count}, {self.num_tokens})")
        rows = max(1, (1 << 24) // max(1, self.num_tokens))  # bounded chunks of the memory map
        for start in range(0, count, rows):
            chunk = np.asarray(codes[start : start + rows])
            lo, hi = int(chunk.min()), int(chunk.max())
            if lo < 0 or hi >= self.codebook_size:
                bad_value = lo if lo < 0 else hi
                raise self._bad(f"{name} holds code {bad_value}, outside the codebook [0, {self.codebook_size})")

    def _check_meta_lines(self, s: int) -> None:
        name, count = self.shards[s]["meta"], self.shards[s]["count"]
        if (self.folder / name).exists() and not (self.folder / name).is_file():
            raise self._bad(f"{name} is not a regular file")
        try:
            with open(self.folder / name, "rb") as f:
                lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        except FileNotFoundError:
            raise self._bad(f"{name} is missing") from None
        except OSError as e:
            raise self._bad(f"{name} cannot be read ({e.strerror or e})") from None
        if lines != count:
            raise self._bad(f"{name} has {lines} lines for {count} rows")

    def _parse_meta(self, s: int) -> list[dict]:
        name = self.shards[s]["meta"]
        rows = []
        with open(self.folder / name, encoding="utf-8", errors="strict") as f:
            try:
                for n, line in enumerate(f, 1):
                    rows.append(self._meta_row(name, n, line))
            except UnicodeDecodeError:
                raise self._bad(f"{name} is not UTF-8 text") from None
        return rows

    def _meta_row(self, name: str, n: int, line: str) -> dict:
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise self._bad(f"{name} line {n} is not JSON") from None
        ok = isinstance(row, dict)
        if ok and self.kind == "captions":
            ok = isinstance(row.get("caption", ""), str)
        elif ok:
            conv = row.get("conversations")
            ok = isinstance(conv, list) and all(isinstance(t, dict) for t in conv)
        if not ok:
            what = "a string caption" if self.kind == "captions" else "a conversations list of objects"
            raise self._bad(f"{name} line {n} is not an object with {what}")
        return row

    # -- access -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        return s, i - int(self.starts[s])

    def clip_pixels(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 CLIP crop of row i (CLIPImageProcessor before rescaling)."""
        s, j = self._locate(i)
        if s not in self._clip:
            self._clip[s] = self._load_codes(s, "clip")  # checked on open; memory-mapped, no pickle
        return np.asarray(self._clip[s][j])

    def check_clip(self, what: str) -> None:
        if not self.clip:
            raise TrainingConfigError(
                f"{what} {self.folder} holds no CLIP crops, which the mmu rows of a w_clip_vit model need; "
                "re-run `showo prepare` with this model"
            )

    def codes(self, i: int) -> np.ndarray:
        s, j = self._locate(i)
        if s not in self._codes:  # memory-mapped: only the rows read are paged in
            self._codes[s] = self._load_codes(s)
            if len(self._codes) > CODES_CACHE:
                self._codes.popitem(last=False)
        self._codes.move_to_end(s)
        return np.asarray(self._codes[s][j], dtype=np.int64)

    def meta(self, i: int) -> dict:
        s, j = self._locate(i)
        if s not in self._meta:
            self._meta[s] = self._parse_meta(s)
            if len(self._meta) > META_CACHE:
                self._meta.popitem(last=False)
        self._meta.move_to_end(s)
        return self._meta[s][j]

    def check_model(self, num_tokens: int, codebook_size: int, what: str) -> None:
        if not self.num_tokens:
            raise TrainingConfigError(
                f"{what} {self.folder} holds no MAGVIT codes (prepared with an understanding-only model); "
                "re-run `showo prepare` with a model that has MAGVIT-v2"
            )
        if self.num_tokens != num_tokens or self.codebook_size != codebook_size:
            raise TrainingConfigError(
                f"{what} {self.folder} holds {self.num_tokens} codes of {self.codebook_size} per image but the "
                f"model uses {num_tokens} of {codebook_size}; re-run `showo prepare` with this model"
            )

    def identity(self) -> dict:
        return {"folder": str(self.folder), "count": len(self), "kind": self.kind, "magvit": self.index.get("magvit")}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v) -> str:
    text = repr(v) if not isinstance(v, (dict, list)) else type(v).__name__
    return text if len(text) <= 60 else text[:57] + "..."


class TextData:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TrainingConfigError(f"lm data {self.path} not found; pass a .txt or .jsonl file")
        self.jsonl = self.path.suffix == ".jsonl"
        offsets = []
        with open(self.path, "rb") as f:
            pos = 0
            for line in f:  # one streaming pass; only the offsets are kept
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        if not offsets:
            raise TrainingConfigError(f"lm data {self.path} is empty")
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def text(self, i: int) -> str:
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            line = f.readline().decode("utf-8", "replace").rstrip("\r\n")
        if not self.jsonl:
            return line
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingConfigError(f"{self.path}: a line is not JSON ({e.msg})") from None
        for key in ("text", "content"):
            if key in row:
                return str(row[key])
        raise TrainingConfigError(f"{self.path}: JSONL rows need a 'text' (or 'content') field")

    def identity(self) -> dict:
        return {"path": str(self.path), "count": len(self)}


class StreamSampler:
    """Endless shuffled stream over `n` items; `index(positions)` is a pure function."""

    def __init__(self, n: int, seed: int, stream: int, shuffle: bool = True):
        if n < 1:
            raise TrainingConfigError("a training dataset is empty")
        self.n, self.seed, self.stream, self.shuffle = n, seed, stream, shuffle
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)
            else:
                self._perm = np.arange(self.n)
            self._epoch = epoch
        return self._perm

    def index(self, positions) -> np.ndarray:
        out = []
        for p in np.asarray(positions, dtype=np.int64).ravel():
            out.append(int(self._permutation(int(p // self.n))[p % self.n]))
        return np.asarray(out, dtype=np.int64)
