"""Attention masks from Layouts and the attention call.

The model receives the mask already built (`attention_mask`), so one mask serves every layer and
every MaskGIT step. Where a query block may see every key (image queries over a prefix cache with
no pads, plain decoding), no mask is passed at all and the fused kernel runs unmasked.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from .layout import Layout, batch_allowed


def attention_mask(
    layouts: Sequence[Layout], q_start: int = 0, q_end: int | None = None, k_end: int | None = None
) -> mx.array | None:
    """(B, 1, Lq, Lk) boolean mask for query rows [q_start, q_end) over keys [0, k_end), or None
    when nothing is masked."""
    allowed = batch_allowed(layouts, q_start, q_end)[:, :, :k_end]
    if allowed.all():
        return None
    return mx.array(allowed[:, None])


def causal_mask(length: int, offset: int = 0) -> mx.array | str | None:
    """Mask for `length` new causal queries after `offset` cached keys (None for one query)."""
    if length == 1:
        return None
    if offset == 0:
        return "causal"
    q = np.arange(offset, offset + length)[:, None]
    k = np.arange(offset + length)[None, :]
    return mx.array(k <= q)


def scaled_dot_product_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None
) -> mx.array:
    """softmax(q·kᵀ·scale masked)·v over (B, H, L, D) arrays (spec §1.3).

    Boolean masks never produce NaN rows: the Layout rules guarantee a non-empty row (pads attend
    to earlier pads), and MLX returns the mean of V for an empty boolean row rather than NaN."""
    if isinstance(mask, mx.array) and mask.dtype != mx.bool_:
        mask = mask.astype(q.dtype)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
