"""Fused omni-attention on Metal (`mx.fast.metal_kernel`), executing a BlockPlan.

NOT RUN ON THIS MACHINE: it needs Apple silicon with MLX's Metal backend. Its loop is the one of
`blockwise.py` (tested on CPU); the tests compare the two wherever Metal exists.

Work split: one threadgroup per (row b, head h, query block of BLOCK_Q queries). The threadgroup is
NSG simdgroups of 32 lanes; each simdgroup owns ROWS_PER_SG query rows, each lane owns D / 32
features of q and of the output accumulator. For every non-skipped key block of its query block the
threadgroup loads BLOCK_K keys and values into threadgroup memory once (shared by all its queries),
then each simdgroup computes its rows' scores (dot products finished with simd_sum), applies the
element rule only when the tile is PARTIAL, and updates a running max / sum / accumulator in float32.

The plan enters as buffers: `tiles[b, qblock, t]` lists the visited key blocks as (block << 1) |
partial, `counts[b, qblock]` says how many, `flags[b, pos]` holds the PAD / IMAGE / VISIBLE bits the
element rule reads. Dynamic sizes travel in `params` so that a growing KV cache (one more key per
decoded token) does not recompile the kernel; only dtype and tile sizes are template constants.
"""

from __future__ import annotations

import functools
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..errors import AttentionBackendError
from ..layout import Layout
from .block_plan import IMAGE, PAD, PARTIAL, VISIBLE, BlockPlan, make_block_plan

HEAD_DIM = 64
SIMD = 32
NSG = 8  # simdgroups per threadgroup (256 threads)
ROWS_PER_SG = 2  # query rows per simdgroup
BLOCK_Q = NSG * ROWS_PER_SG  # 16 queries per threadgroup
BLOCK_K = 32  # keys per tile: K and V tiles in float32 take 2 * 32 * 64 * 4 = 16 KiB of threadgroup memory

_HEADER = f"""
// Flag bits, as in showo_mlx/kernels/block_plan.py.
static constant constexpr const uint8_t OMNI_PAD = {PAD};
static constant constexpr const uint8_t OMNI_IMAGE = {IMAGE};
static constant constexpr const uint8_t OMNI_VISIBLE = {VISIBLE};

// Layout.allowed for one (query, key) pair, from the two positions' flag bytes.
inline bool omni_allowed(int qp, int kp, uint8_t fq, uint8_t fk) {{
  bool see = kp <= qp || (fq & OMNI_IMAGE) || (fk & OMNI_VISIBLE);
  bool pad_ok = !(fk & OMNI_PAD) || (fq & OMNI_PAD);
  return see && pad_ok;
}}
"""

_SOURCE = """
  // params = [H, Lq, Lk, q_start, L (flag row length), max_visits]
  const int H = params[0], Lq = params[1], Lk = params[2], q0 = params[3];
  const int L = params[4], max_visits = params[5];
  constexpr int DPL = HEAD_D / 32;                 // features per lane
  constexpr int BQ = NSG * ROWS;              // queries per threadgroup
  const int nqb = (Lq + BQ - 1) / BQ;

  const int qblock = threadgroup_position_in_grid.y;
  const int bh = threadgroup_position_in_grid.z;      // b * H + h
  const int b = bh / H;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const uint tid = thread_index_in_threadgroup;
  auto row_flags = flags + b * L;   // auto: small buffers arrive in `constant` space

  threadgroup float k_tile[BK * HEAD_D];
  threadgroup float v_tile[BK * HEAD_D];

  // Per-row state lives in registers. Rows past Lq (last block) still run every step so that
  // the barriers below are reached by all threads; they are just never written out.
  float qr[ROWS][DPL], acc[ROWS][DPL], m[ROWS], l[ROWS];
  int qpos[ROWS];
  uint8_t fq[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    const int qi = qblock * BQ + r * NSG + sg;
    qpos[r] = q0 + qi;
    fq[r] = qi < Lq ? row_flags[q0 + qi] : uint8_t(0);
    for (int d = 0; d < DPL; ++d) {
      // Fold the softmax scale into q once instead of scaling every score.
      qr[r][d] = qi < Lq ? float(q[(size_t(bh) * Lq + qi) * HEAD_D + lane * DPL + d]) * scale[0] : 0.0f;
      acc[r][d] = 0.0f;
    }
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }

  auto visits = tiles + (b * nqb + qblock) * max_visits;
  const int n_visits = counts[b * nqb + qblock];
  for (int t = 0; t < n_visits; ++t) {
    const int k0 = (visits[t] >> 1) * BK;
    const bool partial = visits[t] & 1;

    // All threads load the key/value tile once; keys past Lk read as zero and are masked below.
    for (int idx = tid; idx < BK * HEAD_D; idx += NSG * 32) {
      const int kp = k0 + idx / HEAD_D;
      const size_t off = (size_t(bh) * Lk + kp) * HEAD_D + idx % HEAD_D;
      k_tile[idx] = kp < Lk ? float(k[off]) : 0.0f;
      v_tile[idx] = kp < Lk ? float(v[off]) : 0.0f;
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);

    for (int r = 0; r < ROWS; ++r) {
      float s[BK];
      float s_max = -INFINITY;
      for (int j = 0; j < BK; ++j) {
        float dot = 0.0f;
        for (int d = 0; d < DPL; ++d) {
          dot += qr[r][d] * k_tile[j * HEAD_D + lane * DPL + d];
        }
        dot = metal::simd_sum(dot);                  // every lane now holds the full score
        const int kp = k0 + j;
        const bool ok = kp < Lk && (!partial || omni_allowed(qpos[r], kp, fq[r], row_flags[kp]));
        s[j] = ok ? dot : -INFINITY;
        s_max = metal::max(s_max, s[j]);
      }
      const float m_new = metal::max(m[r], s_max);
      if (m_new == -INFINITY) {
        continue;                             // nothing visible yet for this row: state unchanged
      }
      const float alpha = metal::exp(m[r] - m_new); // 0 when m[r] = -inf (safe math mode)
      l[r] *= alpha;
      for (int d = 0; d < DPL; ++d) {
        acc[r][d] *= alpha;
      }
      for (int j = 0; j < BK; ++j) {
        const float p = metal::exp(s[j] - m_new);
        l[r] += p;
        for (int d = 0; d < DPL; ++d) {
          acc[r][d] += p * v_tile[j * HEAD_D + lane * DPL + d];
        }
      }
      m[r] = m_new;
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // before the next tile overwrites k/v_tile
  }

  for (int r = 0; r < ROWS; ++r) {
    const int qi = qblock * BQ + r * NSG + sg;
    if (qi < Lq) {
      for (int d = 0; d < DPL; ++d) {
        out[(size_t(bh) * Lq + qi) * HEAD_D + lane * DPL + d] = static_cast<T>(acc[r][d] / l[r]);
      }
    }
  }
"""


def metal_available() -> bool:
    """True when MLX runs with its Metal backend (Apple silicon); False on Linux."""
    try:
        return bool(mx.metal.is_available())
    except Exception:  # pragma: no cover - older or stripped builds
        return False


@functools.lru_cache(maxsize=1)
def _kernel():
    return mx.fast.metal_kernel(
        name="showo_omni_attention",
        input_names=["q", "k", "v", "tiles", "counts", "flags", "params", "scale"],
        output_names=["out"],
        source=_SOURCE,
        header=_HEADER,
    )


def pack_tiles(plan: BlockPlan) -> tuple[np.ndarray, np.ndarray]:
    """(B, nqb, max_visits) int32 entries (key block << 1) | partial, and (B, nqb) int32 counts."""
    blocks = np.maximum(plan.key_blocks, 0)
    rows = np.arange(plan.batch)[:, None, None]
    qblocks = np.arange(plan.num_q_blocks)[None, :, None]
    partial = plan.tiles[rows, qblocks, blocks] == PARTIAL
    packed = np.where(plan.key_blocks >= 0, (blocks << 1) | partial, 0).astype(np.int32)
    return packed, plan.key_counts.astype(np.int32)


def launch_config(plan: BlockPlan, heads: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, threadgroup) in threads, as mx.fast.metal_kernel takes them: one threadgroup of
    (32, NSG) threads per (query block, row × head)."""
    if plan.block_q != BLOCK_Q or plan.block_k != BLOCK_K:
        raise ValueError(f"the Metal kernel needs a plan with blocks ({BLOCK_Q}, {BLOCK_K})")
    return (SIMD, NSG * plan.num_q_blocks, plan.batch * heads), (SIMD, NSG, 1)


@functools.lru_cache(maxsize=32)
def kernel_inputs(plan: BlockPlan, heads: int, scale: float) -> list[mx.array]:
    """The plan-derived buffers after q, k, v: tiles, counts, flags, params, scale.

    Memoised on the plan (plans are themselves cached), so the 24 layers of a forward pass and
    repeated MaskGIT steps upload them once."""
    packed, counts = pack_tiles(plan)
    params = np.array(
        [heads, plan.q_end - plan.q_start, plan.key_len, plan.q_start, plan.flags.shape[1], packed.shape[2]],
        dtype=np.int32,
    )
    return [
        mx.array(packed),
        mx.array(counts),
        mx.array(plan.flags),
        mx.array(params),
        mx.array([scale], dtype=mx.float32),
    ]


def metal_supports(q: mx.array, k: mx.array, v: mx.array) -> bool:
    """Whether the kernel handles these shapes and dtypes (head dim 64, one float dtype)."""
    return (
        q.ndim == 4
        and q.shape[3] == HEAD_DIM
        and q.dtype == k.dtype == v.dtype
        and q.dtype in (mx.float16, mx.bfloat16, mx.float32)
    )


def omni_attention_metal_with_plan(
    q: mx.array, k: mx.array, v: mx.array, plan: BlockPlan, scale: float
) -> mx.array:
    """Run the kernel for q (B, H, Lq, D) at positions plan.q_start.. over k, v (B, H, Lk, D)."""
    B, H, Lq, D = q.shape
    if not metal_supports(q, k, v):
        raise ValueError(
            f"the Metal omni-attention kernel needs head dim {HEAD_DIM} and one float dtype for q, k, v; "
            f"got q {q.shape} {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k {k.shape} and v {v.shape} do not match q {q.shape}")
    if Lq != plan.q_end - plan.q_start or k.shape[2] != plan.key_len or B != plan.batch:
        raise ValueError(f"shapes q {q.shape}, k {k.shape} do not match the plan")
    grid, threadgroup = launch_config(plan, H)
    (out,) = _kernel()(
        inputs=[q, k, v, *kernel_inputs(plan, H, float(scale))],
        template=[("T", q.dtype), ("HEAD_D", D), ("BK", BLOCK_K), ("NSG", NSG), ("ROWS", ROWS_PER_SG)],
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[q.shape],
        output_dtypes=[q.dtype],
    )
    return out


def omni_attention_metal(
    q: mx.array, k: mx.array, v: mx.array, layouts: Sequence[Layout], q_start: int, scale: float
) -> mx.array:
    """Fused omni-attention: queries at absolute positions [q_start, q_start + Lq) of `layouts`
    (one per row) over keys [0, Lk). Head dim 64; float16 / bfloat16 / float32."""
    if not metal_available():
        raise AttentionBackendError("the fused omni-attention kernel needs Apple silicon with MLX's Metal backend")
    plan = make_block_plan(layouts, q_start, q_start + q.shape[2], k.shape[2], BLOCK_Q, BLOCK_K)
    return omni_attention_metal_with_plan(q, k, v, plan, scale)
