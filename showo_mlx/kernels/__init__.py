"""Omni-attention backends: which kernel computes attention for a batch of Layouts.

    sdpa       mx.fast.scaled_dot_product_attention with the boolean mask of the Layouts
               (every platform; the default without Metal)
    metal      the fused block-sparse Metal kernel (metal_attention.py; Apple silicon only)
    blockwise  the same block plan in plain MLX ops (blockwise.py): slow, for testing and debugging

`SHOWO_ATTENTION=sdpa|metal|blockwise` forces one; it is read at every call, not at import.
See docs/ATTENTION.md.
"""

from __future__ import annotations

import os
from typing import Sequence

import mlx.core as mx

from ..errors import AttentionBackendError
from ..layout import Layout, batch_allowed
from .block_plan import FULL, PARTIAL, SKIP, BlockPlan, make_block_plan, position_flags
from .blockwise import blockwise_attention, blockwise_attention_with_plan
from .metal_attention import metal_available, metal_supports, omni_attention_metal, omni_attention_metal_with_plan

BACKENDS = ("sdpa", "metal", "blockwise")
ENV_VAR = "SHOWO_ATTENTION"

__all__ = [
    "BACKENDS",
    "FULL",
    "PARTIAL",
    "SKIP",
    "BlockPlan",
    "blockwise_attention",
    "blockwise_attention_with_plan",
    "make_block_plan",
    "masked_sdpa",
    "metal_available",
    "metal_supports",
    "omni_attention",
    "omni_attention_metal",
    "omni_attention_metal_with_plan",
    "position_flags",
    "select_attention_backend",
]


def select_attention_backend() -> str:
    """"metal" where MLX has Metal, else "sdpa"; SHOWO_ATTENTION overrides (raises
    AttentionBackendError for an unknown name or for metal where Metal is missing)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if not forced:
        return "metal" if metal_available() else "sdpa"
    if forced not in BACKENDS:
        raise AttentionBackendError(f"{ENV_VAR}={forced!r} is not a backend; use one of {', '.join(BACKENDS)}")
    if forced == "metal" and not metal_available():
        raise AttentionBackendError(
            f"{ENV_VAR}=metal needs Apple silicon with MLX's Metal backend; use {ENV_VAR}=sdpa or blockwise here"
        )
    return forced


def masked_sdpa(
    q: mx.array, k: mx.array, v: mx.array, layouts: Sequence[Layout], q_start: int, scale: float
) -> mx.array:
    """Reference path: fused SDPA with the (B, 1, Lq, Lk) boolean mask of the Layouts."""
    mask = batch_allowed(layouts, q_start, q_start + q.shape[2])[:, None, :, : k.shape[2]]
    if mask.all():  # e.g. image-only query ranges: no mask needed at all
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mx.array(mask))


def omni_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    layouts: Sequence[Layout],
    q_start: int,
    scale: float,
    backend: str | None = None,
) -> mx.array:
    """Attention of queries q (B, H, Lq, D) at absolute positions [q_start, q_start + Lq) over keys
    k, v (B, H, Lk, D) at positions [0, Lk), under the rule of `layouts` (one per row).

    backend None picks one with `select_attention_backend`; an automatic "metal" falls back to
    "sdpa" for shapes the kernel does not handle (head dim other than 64, e.g. tiny test models)."""
    if backend is None:
        backend = select_attention_backend()
        if backend == "metal" and not metal_supports(q, k, v):
            backend = "sdpa"
    if backend == "metal":
        return omni_attention_metal(q, k, v, layouts, q_start, scale)
    if backend == "blockwise":
        return blockwise_attention(q, k, v, layouts, q_start, scale)
    if backend == "sdpa":
        return masked_sdpa(q, k, v, layouts, q_start, scale)
    raise AttentionBackendError(f"unknown attention backend {backend!r}; use one of {', '.join(BACKENDS)}")
