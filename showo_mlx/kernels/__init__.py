"""Omni-attention backends: which kernel computes attention for a batch of Layouts.

    sdpa       mx.fast.scaled_dot_product_attention with the smallest exact boolean mask of the
               Layouts (every platform; the default)
    metal      the fused block-sparse Metal kernel (metal_attention.py; Apple GPU only), chosen
               automatically only where `showo doctor` verified it exact and faster (auto.py)
    blockwise  the same block plan in plain MLX ops (blockwise.py): slow, for testing and debugging

`SHOWO_ATTENTION=auto|sdpa|metal|blockwise` (default auto) is read at every call, not at import.
See docs/ATTENTION.md.
"""

from __future__ import annotations

import os
from typing import Sequence

import mlx.core as mx

from ..errors import AttentionBackendError
from ..layout import Layout
from .auto import auto_backend
from .block_plan import FULL, PARTIAL, SKIP, BlockPlan, make_block_plan, position_flags
from .blockwise import blockwise_attention, blockwise_attention_with_plan
from .metal_attention import (
    metal_available,
    metal_supports,
    metal_unavailable_reason,
    omni_attention_metal,
    omni_attention_metal_with_plan,
    unsupported_reason,
)

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
    "requested_backend",
    "select_attention_backend",
]


def requested_backend() -> str:
    """SHOWO_ATTENTION (lower case; "auto" when unset); AttentionBackendError for an unknown name."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise AttentionBackendError(f"{ENV_VAR}={value!r} is not a backend; use auto, {', '.join(BACKENDS)}")
    return value


def _check_metal(q: mx.array | None, k: mx.array | None, v: mx.array | None, how: str) -> None:
    """One error for every way of asking for the kernel where it cannot run (no Metal, CPU stream,
    unsupported head dim or dtype)."""
    reason = metal_unavailable_reason()
    if reason is None and q is not None:
        reason = unsupported_reason(q, k, v)
    if reason:
        raise AttentionBackendError(f"{how} cannot run here: {reason}; use {ENV_VAR}=sdpa")


def select_attention_backend(
    q: mx.array | None = None, k: mx.array | None = None, v: mx.array | None = None, *, kind: str = "prefill"
) -> str:
    """The backend for one attention call: SHOWO_ATTENTION when set (AttentionBackendError for an
    unknown name, or for metal where the kernel cannot run these arrays); otherwise "metal" only
    where the GPU is the default device, the kernel supports the arrays and the cached doctor report
    verifies it for their dtype and this `kind` of call ("hot" or "prefill"); else "sdpa"."""
    requested = requested_backend()
    if requested == "metal":
        _check_metal(q, k, v, f"{ENV_VAR}=metal")
        return "metal"
    if requested != "auto":
        return requested
    if q is None or metal_unavailable_reason() is not None or unsupported_reason(q, k, v) is not None:
        return "sdpa"
    return auto_backend(q.dtype, kind)


def masked_sdpa(
    q: mx.array, k: mx.array, v: mx.array, layouts: Sequence[Layout], q_start: int, scale: float
) -> mx.array:
    """Reference path: fused SDPA with the smallest exact boolean mask of the Layouts (none, a
    (B, 1, 1, Lk) key mask, or the (B, 1, Lq, Lk) mask; see attention.OmniMask)."""
    from ..attention import attention_mask

    mask = attention_mask(layouts, q_start, q_start + q.shape[2], k.shape[2])
    if mask is None:  # e.g. image-only query ranges without pads: no mask needed at all
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask.sdpa_mask())


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

    backend None picks one with `select_attention_backend`. "metal" where the kernel cannot run
    (no Metal, CPU default device, head dim other than 64) raises the same AttentionBackendError as
    SHOWO_ATTENTION=metal."""
    if backend is None:
        backend = select_attention_backend(q, k, v)
    if backend == "metal":
        _check_metal(q, k, v, "the Metal attention kernel")
        return omni_attention_metal(q, k, v, layouts, q_start, scale)
    if backend == "blockwise":
        return blockwise_attention(q, k, v, layouts, q_start, scale)
    if backend == "sdpa":
        return masked_sdpa(q, k, v, layouts, q_start, scale)
    raise AttentionBackendError(f"unknown attention backend {backend!r}; use one of {', '.join(BACKENDS)}")
