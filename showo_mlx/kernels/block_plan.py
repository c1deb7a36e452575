"""Block plan: which (query block, key block) tiles of omni-attention need work, read off a Layout.

A fused attention kernel walks the score matrix in tiles of `block_q` queries × `block_k` keys. For
Show-o's masks most tiles are trivially decided (the t2i text prefix never sees image keys, image
queries see every non-pad key), so each tile is classified once per batch:

    SKIP     no (query, key) pair in the tile is allowed: never load its keys
    FULL     every pair is allowed: no per-element rule needed
    PARTIAL  mixed: apply the element rule of `Layout.allowed`

The classification is computed from per-position segment flags (pads, image spans, prefix /
global keys: O(L) per row) and prefix sums over them, with O(1) work per tile. The L×L mask is never
built here; the tests compare against it.

Positions are absolute: queries are rows [q_start, q_end) of the Layout (a prefix of the sequence
may already be cached), keys are positions [0, key_len). Key positions past q_end may exist (t2i
text queries over the full row) as long as key_len <= layout.length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..layout import Layout

SKIP, PARTIAL, FULL = 0, 1, 2

# Bits of the per-position flag byte. The Metal kernel reads the same bits (metal_attention.py).
PAD = 1  # hidden pad: only pad queries may see it
IMAGE = 2  # query sees the whole row (image segment soi..eoi)
VISIBLE = 4  # key seen by every query (prefix-LM prefix or a global key range)


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so plans can key caches
class BlockPlan:
    """Tile classification of a batch of rows for queries [q_start, q_end) over keys [0, key_len).

    Plans are cached and shared (see make_block_plan): their arrays are read-only."""

    q_start: int
    q_end: int
    key_len: int
    block_q: int
    block_k: int
    tiles: np.ndarray  # (B, nqb, nkb) int8: SKIP / PARTIAL / FULL
    key_blocks: np.ndarray  # (B, nqb, max_visits) int32: non-skipped key blocks, ascending, -1 padded
    key_counts: np.ndarray  # (B, nqb) int32: how many entries of key_blocks are real
    key_range: np.ndarray  # (B, nqb, 2) int32: [first, last + 1) non-skipped key block
    flags: np.ndarray  # (B, L) uint8: PAD | IMAGE | VISIBLE per position, for the element rule

    @property
    def batch(self) -> int:
        return self.tiles.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.tiles.shape[1]

    @property
    def num_k_blocks(self) -> int:
        return self.tiles.shape[2]

    def query_block(self, i: int) -> tuple[int, int]:
        """Absolute query positions [start, end) of query block i."""
        start = self.q_start + i * self.block_q
        return start, min(start + self.block_q, self.q_end)

    def key_block(self, j: int) -> tuple[int, int]:
        """Key positions [start, end) of key block j."""
        start = j * self.block_k
        return start, min(start + self.block_k, self.key_len)

    def visits(self, row: int, i: int) -> list[tuple[int, bool]]:
        """(key block, needs the element rule) for every non-skipped tile of query block i."""
        blocks = self.key_blocks[row, i, : self.key_counts[row, i]]
        return [(int(j), bool(self.tiles[row, i, j] == PARTIAL)) for j in blocks]

    @property
    def all_full(self) -> bool:
        """True when no tile needs a mask (plain unmasked attention is exact)."""
        return bool((self.tiles == FULL).all())

    def density(self) -> float:
        """Fraction of tiles that must be computed (1.0 = dense attention)."""
        return float((self.tiles != SKIP).mean())


def position_flags(layouts: Sequence[Layout]) -> np.ndarray:
    """(B, L) uint8 flag bytes of equal-length rows: the per-position facts the rule reads."""
    lengths = {lay.length for lay in layouts}
    if len(lengths) != 1:
        raise ValueError(f"rows of a batch must have one length, got {sorted(lengths)}")
    flags = np.zeros((len(layouts), lengths.pop()), dtype=np.uint8)
    for row, lay in zip(flags, layouts):
        for a, b in lay.pads:
            row[a:b] |= PAD
        for a, b in lay.image_spans:
            row[a:b] |= IMAGE
        row[: lay.prefix_len] |= VISIBLE
        for a, b in lay.global_keys:
            row[a:b] |= VISIBLE
    return flags


def _range_count(cumsum: np.ndarray, lo: np.ndarray, hi: np.ndarray, shape: tuple) -> np.ndarray:
    """Number of set flags of row b in [lo, hi) (0 when hi <= lo), from cumsum (B, n + 1).

    lo and hi broadcast to `shape` = (B, nqb, nkb)."""
    hi = np.broadcast_to(np.maximum(hi, lo), shape).reshape(shape[0], -1)
    lo = np.broadcast_to(lo, shape).reshape(shape[0], -1)
    count = np.take_along_axis(cumsum, hi, axis=1) - np.take_along_axis(cumsum, lo, axis=1)
    return count.reshape(shape)


def _cumsum(bits: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((bits.shape[0], 1), np.int64), np.cumsum(bits, axis=1)], axis=1)


def _block_stat(values: np.ndarray, starts: np.ndarray, reduce) -> np.ndarray:
    """reduce (np.maximum / np.minimum) of values (B, n) over blocks starting at `starts`."""
    return reduce.reduceat(values, starts, axis=1)


def classify_tiles(
    flags: np.ndarray, q_start: int, q_end: int, key_len: int, block_q: int, block_k: int
) -> np.ndarray:
    """(B, nqb, nkb) SKIP / PARTIAL / FULL for flag rows (B, L), following `Layout.allowed`:

        allowed(q, k) = (k <= q or IMAGE[q] or VISIBLE[k]) and (not PAD[k] or PAD[q])
    """
    pad, img, vis = ((flags & bit) != 0 for bit in (PAD, IMAGE, VISIBLE))
    none, big = -1, np.iinfo(np.int64).max // 4

    # Query-block facts. Queries split into four classes by (IMAGE, PAD); within a class the
    # largest position sees the most keys, so one max per class decides "any pair allowed".
    qpos = np.arange(q_start, q_end)
    q_starts = np.arange(0, q_end - q_start, block_q)
    qpad, qimg = pad[:, q_start:q_end], img[:, q_start:q_end]

    def last(mask):  # (B, nqb, 1) largest position of the class in each query block, or -1
        return _block_stat(np.where(mask, qpos, none), q_starts, np.maximum)[:, :, None]

    last_text_real, last_text_pad = last(~qimg & ~qpad), last(~qimg & qpad)
    has_img_real, has_img_pad = last(qimg & ~qpad) >= 0, last(qimg & qpad) >= 0
    has_real = last(~qpad) >= 0
    # The smallest text query sees the fewest keys: it decides "every pair allowed".
    first_text = _block_stat(np.where(~qimg, qpos, big), q_starts, np.minimum)[:, :, None]

    # Key-block bounds (1, 1, nkb) and prefix sums over key flags for O(1) range counts.
    k_lo = np.arange(0, key_len, block_k)[None, None, :]
    k_hi = np.minimum(k_lo + block_k, key_len)
    pad_k, vis_k = pad[:, :key_len], vis[:, :key_len]
    c_all = _cumsum(np.ones_like(pad_k))
    c_real = _cumsum(~pad_k)
    c_vis = _cumsum(vis_k)
    c_real_vis = _cumsum(vis_k & ~pad_k)
    c_hidden = _cumsum(~vis_k)  # keys a text query sees only causally

    shape = (flags.shape[0], len(q_starts), k_lo.shape[2])

    def count(c, lo, hi):
        return _range_count(c, lo, hi, shape)

    n_real = count(c_real, k_lo, k_hi)
    n_pad = (k_hi - k_lo) - n_real

    # any: some class of query in the block sees some key of the block. Image queries see every
    # key (real ones: every non-pad key); text queries see keys k <= q plus VISIBLE keys, and
    # real text queries never see a pad key.
    def text_sees_some(q_last, c_causal, c_visible):
        causal = count(c_causal, k_lo, np.minimum(k_hi, q_last + 1)) > 0
        return (q_last >= 0) & (causal | (count(c_visible, k_lo, k_hi) > 0))

    any_pair = (
        has_img_pad
        | (has_img_real & (n_real > 0))
        | text_sees_some(last_text_pad, c_all, c_vis)
        | text_sees_some(last_text_real, c_real, c_real_vis)
    )

    # all: no real query meets a pad key, and every key past the first text query is VISIBLE.
    pads_ok = (n_pad == 0) | ~has_real
    beyond = np.maximum(k_lo, np.minimum(first_text + 1, k_hi))
    see_ok = count(c_hidden, beyond, k_hi) == 0
    all_pairs = pads_ok & see_ok

    return np.where(all_pairs, FULL, np.where(any_pair, PARTIAL, SKIP)).astype(np.int8)


def make_block_plan(
    layouts: Sequence[Layout],
    q_start: int = 0,
    q_end: int | None = None,
    key_len: int | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> BlockPlan:
    """Plan for equal-length rows `layouts`, queries [q_start, q_end) over keys [0, key_len).

    Defaults: all queries, all keys of the row. key_len >= q_end so every query has its own key,
    which keeps every query row non-empty (the diagonal is always allowed). Plans are memoised:
    a model calls this once per layer with the same Layouts, and MaskGIT steps repeat them."""
    length = layouts[0].length if layouts else 0
    q_end = length if q_end is None else q_end
    key_len = length if key_len is None else key_len
    return _cached_plan(tuple(layouts), q_start, q_end, key_len, block_q, block_k)


@functools.lru_cache(maxsize=64)
def _cached_plan(
    layouts: tuple[Layout, ...], q_start: int, q_end: int, key_len: int, block_q: int, block_k: int
) -> BlockPlan:
    flags = position_flags(layouts)
    length = flags.shape[1]
    if not 0 <= q_start < q_end <= key_len <= length:
        raise ValueError(
            f"need 0 <= q_start < q_end <= key_len <= length, got {q_start}, {q_end}, {key_len}, {length}"
        )
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got {block_q}, {block_k}")

    tiles = classify_tiles(flags, q_start, q_end, key_len, block_q, block_k)
    visit = tiles != SKIP
    counts = visit.sum(axis=2).astype(np.int32)
    # Stable sort puts visited blocks first, in ascending order; the rest is padding.
    order = np.argsort(~visit, axis=2, kind="stable").astype(np.int32)
    width = max(int(counts.max()), 1)
    key_blocks = np.where(np.arange(width) < counts[..., None], order[..., :width], -1).astype(np.int32)
    nkb = tiles.shape[2]
    first = np.where(counts > 0, visit.argmax(axis=2), 0)
    stop = np.where(counts > 0, nkb - visit[..., ::-1].argmax(axis=2), 0)
    key_range = np.stack([first, stop], axis=-1).astype(np.int32)
    arrays = (tiles, key_blocks, counts, key_range, flags)
    for array in arrays:
        array.setflags(write=False)
    return BlockPlan(q_start, q_end, key_len, block_q, block_k, *arrays)
