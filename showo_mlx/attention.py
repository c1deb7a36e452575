"""Attention masks from Layouts and the attention call.

`attention_mask` returns an `OmniMask`: the Layouts of the rows plus the query/key ranges of the call.
The model hands it unchanged to every layer, and `scaled_dot_product_attention` picks the backend
(kernels/): on Apple silicon the fused Metal kernel reads the Layouts directly and skips fully
masked blocks; elsewhere MLX's fused SDPA runs with the boolean mask, built once per OmniMask and
shared by all layers and MaskGIT steps. Where every query may see every key (image queries over a
prefix cache with no pads, plain decoding), no mask exists at all: `attention_mask` returns None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np

from .layout import Layout, batch_allowed


@dataclass(eq=False)
class OmniMask:
    """The attention rule of a batch of rows for query rows [q_start, q_end) over keys [0, k_end)."""

    layouts: tuple[Layout, ...]
    q_start: int
    q_end: int
    k_end: int
    _array: mx.array | None = field(default=None, repr=False)

    @property
    def array(self) -> mx.array:
        """(B, 1, Lq, Lk) boolean, True = may attend."""
        if self._array is None:
            allowed = batch_allowed(self.layouts, self.q_start, self.q_end)[:, :, : self.k_end]
            self._array = mx.array(allowed[:, None])
        return self._array

    def __getitem__(self, index):  # lets tests and callers treat it like the boolean array
        return self.array[index]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.layouts), 1, self.q_end - self.q_start, self.k_end)


def attention_mask(
    layouts: Sequence[Layout], q_start: int = 0, q_end: int | None = None, k_end: int | None = None
) -> OmniMask | None:
    """The rule for query rows [q_start, q_end) over keys [0, k_end), or None when nothing is masked."""
    length = layouts[0].length
    q_end = length if q_end is None else q_end
    k_end = length if k_end is None else k_end
    if batch_allowed(layouts, q_start, q_end)[:, :, :k_end].all():
        return None
    return OmniMask(tuple(layouts), q_start, q_end, k_end)


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
    """softmax(q·kᵀ·scale, masked)·v over (B, H, L, D) arrays (spec §1.3).

    Boolean masks never produce NaN rows: the Layout rules guarantee a non-empty row (pads attend
    to earlier pads)."""
    if isinstance(mask, OmniMask):
        from .kernels import metal_supports, omni_attention, select_attention_backend

        backend = select_attention_backend()
        if backend == "metal" and metal_supports(q, k, v):
            return omni_attention(q, k, v, mask.layouts, mask.q_start, scale, backend="metal")
        if backend == "blockwise":
            return omni_attention(q, k, v, mask.layouts, mask.q_start, scale, backend="blockwise")
        mask = mask.array
    elif isinstance(mask, mx.array) and mask.dtype != mx.bool_:
        mask = mask.astype(q.dtype)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
