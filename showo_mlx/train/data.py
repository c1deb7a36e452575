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


class PreparedData:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / INDEX
        if not path.is_file():
            raise TrainingConfigError(f"{self.folder} is not prepared data (no {INDEX}); run `showo prepare` first")
        try:
            index = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TrainingConfigError(f"{path} is not valid JSON ({e.msg}); re-run `showo prepare`") from None
        if index.get("format") != FORMAT:
            raise TrainingConfigError(f"{path} was not written by `showo prepare`")
        self.index = index
        self.kind: str = index["kind"]
        self.num_tokens: int = index["num_tokens"]
        self.codebook_size: int = index["codebook_size"]
        self.shards: list[dict] = index["shards"]
        self.starts = np.cumsum([0] + [s["count"] for s in self.shards])
        self.clip: dict | None = index.get("clip")  # CLIP crops for w_clip_vit mmu rows
        self._codes: dict[int, np.ndarray] = {}
        self._clip: dict[int, np.ndarray] = {}
        self._meta: OrderedDict[int, list[dict]] = OrderedDict()

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
            self._clip[s] = np.load(self.folder / self.shards[s]["clip"], mmap_mode="r")
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
            self._codes[s] = np.load(self.folder / self.shards[s]["codes"], mmap_mode="r")
        return np.asarray(self._codes[s][j], dtype=np.int64)

    def meta(self, i: int) -> dict:
        s, j = self._locate(i)
        if s not in self._meta:
            with open(self.folder / self.shards[s]["meta"], encoding="utf-8") as f:
                self._meta[s] = [json.loads(line) for line in f]
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
