"""Blockwise online-softmax attention following a BlockPlan, in plain MLX.

This is the executable specification of the Metal kernel (metal_attention.py): the same loop
structure (one query block at a time, only its non-skipped key blocks, the element rule only on
PARTIAL tiles, running max / sum / accumulator in float32), written with ordinary MLX ops so it runs
and is tested on any backend. It is not meant to be fast: the Python loop issues small ops per tile.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from ..layout import Layout
from .block_plan import IMAGE, PAD, VISIBLE, BlockPlan, make_block_plan


def tile_mask(flags: mx.array, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> mx.array:
    """(q_hi - q_lo, k_hi - k_lo) boolean element rule of one tile from a row's flag bytes (L,).

    Same rule as `Layout.allowed`: (k <= q or IMAGE[q] or VISIBLE[k]) and (not PAD[k] or PAD[q])."""
    fq = flags[q_lo:q_hi, None]
    fk = flags[None, k_lo:k_hi]
    q = mx.arange(q_lo, q_hi)[:, None]
    k = mx.arange(k_lo, k_hi)[None, :]
    see = (k <= q) | ((fq & IMAGE) != 0) | ((fk & VISIBLE) != 0)
    return see & (((fk & PAD) == 0) | ((fq & PAD) != 0))


def _online_step(m, l, acc, scores, v_tile):
    """Fold one tile of scores (H, n, bk) into the running max m, sum l and accumulator acc.

    A query that has seen only masked keys so far has m = -inf; subtracting a 0 instead of -inf
    keeps exp() at exactly 0 for those entries rather than NaN (-inf - -inf)."""
    m_new = mx.maximum(m, scores.max(axis=-1))
    m_safe = mx.where(m_new == -mx.inf, 0.0, m_new)
    p = mx.exp(scores - m_safe[..., None])
    alpha = mx.exp(m - m_safe)  # rescales what was accumulated under the old max; 0 when m = -inf
    l = l * alpha + p.sum(axis=-1)
    acc = acc * alpha[..., None] + p @ v_tile
    return m_new, l, acc


def blockwise_attention_with_plan(q: mx.array, k: mx.array, v: mx.array, plan: BlockPlan, scale: float) -> mx.array:
    """softmax(q·kᵀ·scale masked by the plan's layouts)·v, tile by tile.

    q: (B, H, q_end - q_start, D) for absolute positions [q_start, q_end); k, v: (B, H, key_len, D)
    for positions [0, key_len). Accumulates in float32, returns q's dtype."""
    B, H, Lq, D = q.shape
    if Lq != plan.q_end - plan.q_start or k.shape[2] != plan.key_len or B != plan.batch:
        raise ValueError(
            f"shapes q {q.shape}, k {k.shape} do not match the plan "
            f"(batch {plan.batch}, queries [{plan.q_start}, {plan.q_end}), {plan.key_len} keys)"
        )
    flags = mx.array(plan.flags)
    qf, kf, vf = (x.astype(mx.float32) for x in (q, k, v))
    rows = []
    for b in range(B):
        blocks = []
        for i in range(plan.num_q_blocks):
            q_lo, q_hi = plan.query_block(i)
            q_tile = qf[b, :, q_lo - plan.q_start : q_hi - plan.q_start] * scale
            n = q_hi - q_lo
            m = mx.full((H, n), -mx.inf)
            l = mx.zeros((H, n))
            acc = mx.zeros((H, n, D))
            for j, partial in plan.visits(b, i):
                k_lo, k_hi = plan.key_block(j)
                scores = q_tile @ kf[b, :, k_lo:k_hi].swapaxes(-1, -2)
                if partial:
                    scores = mx.where(tile_mask(flags[b], q_lo, q_hi, k_lo, k_hi), scores, -mx.inf)
                m, l, acc = _online_step(m, l, acc, scores, vf[b, :, k_lo:k_hi])
            # l > 0: every query sees at least itself (k = q is always allowed, key_len >= q_end).
            blocks.append(acc / l[..., None])
        rows.append(mx.concatenate(blocks, axis=1))
    return mx.stack(rows).astype(q.dtype)


def blockwise_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    layouts: Sequence[Layout],
    q_start: int,
    scale: float,
    block_q: int = 64,
    block_k: int = 64,
) -> mx.array:
    """Plan and run blockwise attention for queries at absolute positions q_start.. over k, v."""
    plan = make_block_plan(layouts, q_start, q_start + q.shape[2], k.shape[2], block_q, block_k)
    return blockwise_attention_with_plan(q, k, v, plan, scale)
