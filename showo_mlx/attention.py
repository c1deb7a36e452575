"""Attention masks from Layouts and the attention call.

`attention_mask` returns an `OmniMask`: the Layouts of the rows plus the query/key ranges of the call.
The model hands it unchanged to every layer, and `scaled_dot_product_attention` picks the backend
(kernels/; MLX's fused SDPA unless `showo doctor` verified the Metal kernel on this machine).

For SDPA the mask takes the smallest exact form:

- nothing masked (image queries over a pad-free prefix cache, plain decoding): no mask at all,
  `attention_mask` returns None;
- every query row of a batch row sees the same keys (the MaskGIT hot loop: image queries see every
  non-pad key; one decoded query): a (B, 1, 1, Lk) boolean key mask that SDPA broadcasts;
- rows differ (prefill, training, the reference's full recompute): the (B, 1, Lq, Lk) boolean mask.

All three are read off per-position flag bytes (O(L) per row); only the last builds an Lq × Lk
array, once per OmniMask (`OmniMask.materialised` counts them), shared by every layer and step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np

from .kernels.block_plan import FULL, IMAGE, PAD, VISIBLE, classify_tiles, position_flags
from .layout import Layout, batch_allowed


@dataclass(eq=False)
class OmniMask:
    """The attention rule of a batch of rows for query rows [q_start, q_end) over keys [0, k_end)."""

    layouts: tuple[Layout, ...]
    q_start: int
    q_end: int
    k_end: int
    _array: mx.array | None = field(default=None, repr=False)
    _key_mask: mx.array | None = field(default=None, repr=False)
    _flags: np.ndarray | None = field(default=None, repr=False)
    _uniform: bool | None = field(default=None, repr=False)

    materialised = 0  # class-wide count of (B, 1, Lq, Lk) masks built (tests check the hot loop builds none)

    @property
    def flags(self) -> np.ndarray:
        """(B, L) PAD | IMAGE | VISIBLE bytes of the rows (kernels/block_plan.py)."""
        if self._flags is None:
            self._flags = position_flags(self.layouts)
        return self._flags

    @property
    def uniform_rows(self) -> bool:
        """True when, within each batch row, every query sees the same keys, so a (B, 1, 1, Lk) key
        mask is exact: a single query, or only image-segment queries that are all pads or all real
        (an image query sees every key, except pads when it is not one; `Layout.allowed`)."""
        if self._uniform is None:
            q = self.flags[:, self.q_start : self.q_end]
            image, pad = (q & IMAGE) != 0, (q & PAD) != 0
            self._uniform = self.q_end - self.q_start == 1 or bool(image.all() and (pad == pad[:, :1]).all())
        return self._uniform

    @property
    def key_mask(self) -> mx.array:
        """(B, 1, 1, Lk) boolean: the keys every query of the row may see (needs `uniform_rows`)."""
        if not self.uniform_rows:
            raise ValueError("the query rows of this mask differ; use OmniMask.array")
        if self._key_mask is None:
            self._key_mask = mx.array(_row_of_first_query(self.flags, self.q_start, self.k_end)[:, None, None, :])
        return self._key_mask

    @property
    def array(self) -> mx.array:
        """(B, 1, Lq, Lk) boolean, True = may attend."""
        if self._array is None:
            OmniMask.materialised += 1
            allowed = batch_allowed(self.layouts, self.q_start, self.q_end)[:, :, : self.k_end]
            self._array = mx.array(allowed[:, None])
        return self._array

    def sdpa_mask(self) -> mx.array:
        """The smallest exact boolean mask for `mx.fast.scaled_dot_product_attention`."""
        return self.key_mask if self.uniform_rows else self.array

    def __getitem__(self, index):  # lets tests and callers treat it like the boolean array
        return self.array[index]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.layouts), 1, self.q_end - self.q_start, self.k_end)


def _row_of_first_query(flags: np.ndarray, q: int, k_end: int) -> np.ndarray:
    """(B, k_end) `Layout.allowed` of query position q over keys [0, k_end), from the flag bytes:
    (k <= q or IMAGE[q] or VISIBLE[k]) and (not PAD[k] or PAD[q])."""
    fk = flags[:, :k_end]
    fq = flags[:, q : q + 1]
    see = (np.arange(k_end)[None, :] <= q) | ((fq & IMAGE) != 0) | ((fk & VISIBLE) != 0)
    return see & (((fk & PAD) == 0) | ((fq & PAD) != 0))


def attention_mask(
    layouts: Sequence[Layout], q_start: int = 0, q_end: int | None = None, k_end: int | None = None
) -> OmniMask | None:
    """The rule for query rows [q_start, q_end) over keys [0, k_end), or None when nothing is masked."""
    layouts = tuple(layouts)
    length = layouts[0].length
    q_end = length if q_end is None else q_end
    k_end = length if k_end is None else k_end
    flags = position_flags(layouts)
    # One tile spanning every query and key: FULL means every pair is allowed (O(L), no Lq x Lk array).
    if (classify_tiles(flags, q_start, q_end, k_end, q_end - q_start, k_end) == FULL).all():
        return None
    return OmniMask(layouts, q_start, q_end, k_end, _flags=flags)


def causal_mask(length: int, offset: int = 0) -> mx.array | str | None:
    """Mask for `length` new causal queries after `offset` cached keys (None for one query)."""
    if length == 1:
        return None
    if offset == 0:
        return "causal"
    q = np.arange(offset, offset + length)[:, None]
    k = np.arange(offset + length)[None, :]
    return mx.array(k <= q)


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    """softmax(q·kᵀ·scale, masked)·v over (B, H, L, D) arrays (`models/phi.py`, `PhiSdpaAttention.forward`).

    Boolean masks never produce NaN rows: the Layout rules guarantee a non-empty row (pads attend
    to earlier pads)."""
    if isinstance(mask, OmniMask):
        from .kernels import omni_attention, select_attention_backend

        kind = "hot" if mask.uniform_rows else "prefill"
        backend = select_attention_backend(q, k, v, kind=kind)
        if backend != "sdpa":
            return omni_attention(q, k, v, mask.layouts, mask.q_start, scale, backend=backend)
        mask = mask.sdpa_mask()
    elif isinstance(mask, mx.array) and mask.dtype != mx.bool_:
        mask = mask.astype(q.dtype)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
