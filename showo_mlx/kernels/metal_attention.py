"""Fused omni-attention on Metal (`mx.fast.metal_kernel`), executing a BlockPlan.

NOT RUN ON THE DEVELOPMENT MACHINE (Linux, no Metal). It is used only where `showo doctor` has run it
on this Mac and found it exact and faster than MLX's SDPA (kernels/auto.py); `SHOWO_ATTENTION=metal`
forces it. Its per-thread index arithmetic is re-implemented in NumPy by the tests
(tests/test_metal_emulation.py) and run over the buffers built here, and the Metal source MLX
generates is checked for the template values, buffer kinds and thread attributes this host code
assumes.

Work split (the technique of MLX's steel attention kernels; this code is our own):

- one threadgroup per (query block of BQ = 8·NSG queries, head, row); NSG simdgroups of 32 lanes;
- each simdgroup owns 8 query rows and computes with 8×8 `simdgroup_matrix` tiles: S = Q·Kᵀ for its
  8 queries × BK keys, then O += P·V; Q, S, P and O are float32;
- each lane holds 2 elements of every 8×8 tile: row `fr`, columns `fc` and `fc + 1` (the layout of
  `simdgroup_matrix::thread_elements`), so the online-softmax bookkeeping of a query row is shared
  by the 4 lanes holding that row and needs one max and one sum reduction (two `simd_shuffle_xor`
  each) per key tile;
- for every non-skipped key block the threadgroup stages BK keys and values in threadgroup memory
  in their own dtype, with VEC-element vector loads (16 bytes);
- the element rule is evaluated only in PARTIAL tiles; masked scores take a finite minimum and
  masked probabilities are exactly 0, so nothing depends on -inf arithmetic (safe under fast math);
- the output is written in (B, L, H, D), the layout the model's output projection reads, so the
  transpose back to (B, L, H·D) is free.

The plan enters as buffers: `tiles[b, qblock, t]` lists the visited key blocks as (block << 1) |
partial, `counts[b, qblock]` how many, `flags[b, pos]` the PAD / IMAGE / VISIBLE bits. These are
padded to at least 8 elements so that MLX always passes them in the `device` address space; the
sizes that change while decoding travel in the 6-element `params` buffer (`constant` space), so a
growing key count does not recompile the kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..errors import AttentionBackendError
from ..layout import Layout
from .block_plan import IMAGE, PAD, PARTIAL, VISIBLE, BlockPlan, make_block_plan

SIMD = 32  # lanes per simdgroup on Apple GPUs
FRAG = 8  # simdgroup_matrix tiles are 8 x 8
NSG = 4  # simdgroups per threadgroup
BLOCK_Q = FRAG * NSG  # 32 queries per threadgroup: one 8-row fragment per simdgroup
BLOCK_K = 32  # keys per staged tile
THREADS = SIMD * NSG  # 128 threads per threadgroup
SUPPORTED_HEAD_DIMS = (64,)
MAX_THREADGROUP_BYTES = 32 * 1024  # Apple GPUs: 32 KiB of threadgroup memory per threadgroup
MIN_DEVICE_ELEMENTS = 8  # MLX passes inputs with fewer elements in the `constant` address space
PARAMS = ("heads", "q_len", "k_len", "q_start", "flag_len", "max_visits")
OUTPUT_LAYOUT = "BLHD"

_HEADER = f"""
#include <metal_simdgroup>
#include <metal_simdgroup_matrix>

// Flag bits, as in showo_mlx/kernels/block_plan.py.
static constant constexpr const uint8_t OMNI_PAD = {PAD};
static constant constexpr const uint8_t OMNI_IMAGE = {IMAGE};
static constant constexpr const uint8_t OMNI_VISIBLE = {VISIBLE};
// The score of a masked pair: finite, so max/exp never meet -inf (safe under fast math).
static constant constexpr const float OMNI_MIN = -3.0e38f;

// Layout.allowed for one (query, key) pair, from the two positions' flag bytes.
inline bool omni_allowed(int qp, int kp, uint8_t fq, uint8_t fk) {{
  bool see = kp <= qp || (fq & OMNI_IMAGE) || (fk & OMNI_VISIBLE);
  bool pad_ok = !(fk & OMNI_PAD) || (fq & OMNI_PAD);
  return see && pad_ok;
}}

// VEC elements moved as one aligned unit (a vector load/store for any element type).
template <typename T, int N>
struct alignas(sizeof(T) * N) OmniVec {{
  T v[N];
}};
"""

# Template constants: T (dtype of q, k, v, out), HEAD_D, BQ, BK, NSG, VEC (elements per vector
# load), PAD_T (threadgroup row padding in elements, against bank conflicts).
_SOURCE = """
  static_assert(BQ == 8 * NSG, "each simdgroup owns one 8-row fragment of queries");
  static_assert(BK % 8 == 0 && HEAD_D % 8 == 0, "8x8 simdgroup matrix tiles");
  static_assert(HEAD_D % VEC == 0 && PAD_T % VEC == 0, "rows split into whole vectors");
  static_assert((BK * HEAD_D / VEC) % (32 * NSG) == 0, "every thread stages the same number of vectors");
  constexpr int TK = BK / 8;            // key fragments per tile
  constexpr int TD = HEAD_D / 8;        // feature fragments
  constexpr int LD = HEAD_D + PAD_T;    // threadgroup row stride in elements
  constexpr int VPR = HEAD_D / VEC;     // vectors per key row
  constexpr int NTHREADS = 32 * NSG;

  // params = [H, Lq, Lk, q_start, L (flag row length), max_visits]
  const int H = params[0], Lq = params[1], Lk = params[2], q0 = params[3];
  const int L = params[4], max_visits = params[5];
  const int nqb = (Lq + BQ - 1) / BQ;

  const int qblock = int(threadgroup_position_in_grid.x);
  const int h = int(threadgroup_position_in_grid.y);
  const int b = int(threadgroup_position_in_grid.z);
  const int sg = int(simdgroup_index_in_threadgroup);
  const int lane = int(thread_index_in_simdgroup);
  const int tid = sg * 32 + lane;

  // This lane's place in every 8x8 tile: row fr, columns fc and fc + 1.
  const int fr = ((lane / 4) & 4) + (lane / 2) % 4;
  const int fc = ((lane / 4) & 2) * 2 + (lane % 2) * 2;

  const int qi = qblock * BQ + sg * 8 + fr;   // query row of this lane; past Lq in a ragged last block
  const bool q_in = qi < Lq;
  const int qp = q0 + qi;
  const device uint8_t* row_flags = flags + b * L;
  const uint8_t fq = q_in ? row_flags[qp] : uint8_t(0);
  const size_t bh = size_t(b) * H + h;

  threadgroup OmniVec<T, VEC> k_stage[BK * LD / VEC];
  threadgroup OmniVec<T, VEC> v_stage[BK * LD / VEC];
  const threadgroup T* k_tile = (const threadgroup T*)k_stage;
  const threadgroup T* v_tile = (const threadgroup T*)v_stage;

  // Q (scaled so that exp2 of a score difference is the softmax weight) and O, in float32.
  const float qscale = scale[0] * M_LOG2E_F;
  metal::simdgroup_matrix<float, 8, 8> Qf[TD];
  metal::simdgroup_matrix<float, 8, 8> Of[TD];
  const device T* q_row = q + (bh * Lq + (q_in ? qi : 0)) * HEAD_D;
  for (int d = 0; d < TD; ++d) {
    Qf[d].thread_elements()[0] = q_in ? float(q_row[d * 8 + fc]) * qscale : 0.0f;
    Qf[d].thread_elements()[1] = q_in ? float(q_row[d * 8 + fc + 1]) * qscale : 0.0f;
    Of[d] = metal::make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  float m = OMNI_MIN;   // running max of this lane's query row (log2 units)
  float l = 0.0f;       // running sum of its softmax weights

  const device int32_t* visits = tiles + (b * nqb + qblock) * max_visits;
  const int n_visits = counts[b * nqb + qblock];
  for (int t = 0; t < n_visits; ++t) {
    const int k0 = (visits[t] >> 1) * BK;
    const bool partial = (visits[t] & 1) != 0;

    // Stage BK keys and values; keys past Lk read as zero and are masked below.
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);   // the previous tile is no longer read
    for (int i = tid; i < BK * VPR; i += NTHREADS) {
      const int r = i / VPR;
      const int c = (i % VPR) * VEC;
      const int kp = k0 + r;
      OmniVec<T, VEC> kv, vv;
      if (kp < Lk) {
        const size_t off = (bh * Lk + kp) * HEAD_D + c;
        kv = *(const device OmniVec<T, VEC>*)(k + off);
        vv = *(const device OmniVec<T, VEC>*)(v + off);
      } else {
        for (int e = 0; e < VEC; ++e) {
          kv.v[e] = T(0);
          vv.v[e] = T(0);
        }
      }
      k_stage[(r * LD + c) / VEC] = kv;
      v_stage[(r * LD + c) / VEC] = vv;
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);

    // S = Q Kᵀ: 8 queries x BK keys per simdgroup, TK fragments.
    metal::simdgroup_matrix<float, 8, 8> Sf[TK];
    for (int j = 0; j < TK; ++j) {
      Sf[j] = metal::make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (int d = 0; d < TD; ++d) {
        metal::simdgroup_matrix<float, 8, 8> Kt;   // Kᵀ block: row = feature d*8 + fr, column = key j*8 + fc
        Kt.thread_elements()[0] = float(k_tile[(j * 8 + fc) * LD + d * 8 + fr]);
        Kt.thread_elements()[1] = float(k_tile[(j * 8 + fc + 1) * LD + d * 8 + fr]);
        metal::simdgroup_multiply_accumulate(Sf[j], Qf[d], Kt, Sf[j]);
      }
    }

    // The element rule, then one max reduction for the whole tile over the 4 lanes of a row.
    float s[2 * TK];
    bool ok[2 * TK];
    float tile_max = OMNI_MIN;
    for (int j = 0; j < TK; ++j) {
      for (int e = 0; e < 2; ++e) {
        const int kp = k0 + j * 8 + fc + e;
        ok[2 * j + e] = kp < Lk && (!partial || omni_allowed(qp, kp, fq, row_flags[kp]));
        s[2 * j + e] = ok[2 * j + e] ? float(Sf[j].thread_elements()[e]) : OMNI_MIN;
        tile_max = metal::max(tile_max, s[2 * j + e]);
      }
    }
    tile_max = metal::max(tile_max, metal::simd_shuffle_xor(tile_max, ushort(1)));
    tile_max = metal::max(tile_max, metal::simd_shuffle_xor(tile_max, ushort(8)));
    const float m_new = metal::max(m, tile_max);
    const float factor = metal::exp2(m - m_new);   // 1 while nothing was visible; underflows to 0 after

    metal::simdgroup_matrix<float, 8, 8> Pf[TK];
    float tile_sum = 0.0f;
    for (int j = 0; j < TK; ++j) {
      for (int e = 0; e < 2; ++e) {
        const float p = ok[2 * j + e] ? metal::exp2(s[2 * j + e] - m_new) : 0.0f;
        Pf[j].thread_elements()[e] = p;
        tile_sum += p;
      }
    }
    tile_sum += metal::simd_shuffle_xor(tile_sum, ushort(1));
    tile_sum += metal::simd_shuffle_xor(tile_sum, ushort(8));
    l = l * factor + tile_sum;
    m = m_new;

    // O = O * factor + P V.
    for (int d = 0; d < TD; ++d) {
      Of[d].thread_elements()[0] *= factor;
      Of[d].thread_elements()[1] *= factor;
      for (int j = 0; j < TK; ++j) {
        metal::simdgroup_matrix<float, 8, 8> Vf;   // V block: row = key j*8 + fr, column = feature d*8 + fc
        Vf.thread_elements()[0] = float(v_tile[(j * 8 + fr) * LD + d * 8 + fc]);
        Vf.thread_elements()[1] = float(v_tile[(j * 8 + fr) * LD + d * 8 + fc + 1]);
        metal::simdgroup_multiply_accumulate(Of[d], Pf[j], Vf, Of[d]);
      }
    }
  }

  // l > 0 for every real query: it always sees itself (the plan visits its diagonal block).
  if (q_in) {
    const float inv = 1.0f / l;
    device T* o_row = out + ((size_t(b) * Lq + qi) * H + h) * HEAD_D;   // (B, Lq, H, D)
    for (int d = 0; d < TD; ++d) {
      o_row[d * 8 + fc] = static_cast<T>(Of[d].thread_elements()[0] * inv);
      o_row[d * 8 + fc + 1] = static_cast<T>(Of[d].thread_elements()[1] * inv);
    }
  }
"""

INPUT_NAMES = ("q", "k", "v", "tiles", "counts", "flags", "params", "scale")
THREAD_ATTRIBUTES = ("threadgroup_position_in_grid", "simdgroup_index_in_threadgroup", "thread_index_in_simdgroup")


def metal_available() -> bool:
    """True when MLX has its Metal backend (Apple silicon); False on Linux."""
    try:
        return bool(mx.metal.is_available())
    except Exception:  # pragma: no cover - older or stripped builds
        return False


def gpu_is_default() -> bool:
    """True when MLX's default stream runs on the GPU: only then do the model's arrays live where the
    kernel runs (`mx.set_default_device(mx.cpu)` on a Mac keeps everything else on the CPU)."""
    return metal_available() and mx.default_device().type == mx.DeviceType.gpu


def metal_unavailable_reason() -> str | None:
    """Why the kernel cannot run here (one line), or None when it can."""
    if not metal_available():
        return "MLX has no Metal backend on this machine (Apple silicon with macOS is required)"
    if not gpu_is_default():
        return "MLX's default device is the CPU (mx.set_default_device(mx.gpu) to use the GPU)"
    return None


@dataclass(frozen=True)
class KernelConfig:
    """The compile-time shape of one kernel instance; `check` asserts what the Metal source assumes."""

    dtype: mx.Dtype
    head_dim: int
    block_q: int = BLOCK_Q
    block_k: int = BLOCK_K
    simdgroups: int = NSG

    @property
    def itemsize(self) -> int:
        return self.dtype.size

    @property
    def vec(self) -> int:  # elements per 16-byte vector load
        return 16 // self.itemsize

    @property
    def pad(self) -> int:  # threadgroup row padding, one vector (16 bytes)
        return self.vec

    @property
    def threads(self) -> int:
        return SIMD * self.simdgroups

    @property
    def threadgroup_bytes(self) -> int:
        return 2 * self.block_k * (self.head_dim + self.pad) * self.itemsize

    def template(self) -> list[tuple[str, object]]:
        return [
            ("T", self.dtype),
            ("HEAD_D", self.head_dim),
            ("BQ", self.block_q),
            ("BK", self.block_k),
            ("NSG", self.simdgroups),
            ("VEC", self.vec),
            ("PAD_T", self.pad),
        ]

    def check(self) -> "KernelConfig":
        """Every threadgroup-size and layout assumption of the kernel, checked before a launch."""
        problems = []
        if self.dtype not in (mx.float16, mx.bfloat16, mx.float32):
            problems.append(f"dtype {self.dtype} (float16, bfloat16 or float32)")
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            problems.append(f"head dim {self.head_dim} (supported: {SUPPORTED_HEAD_DIMS})")
        if self.block_q != FRAG * self.simdgroups:
            problems.append(f"block_q {self.block_q} != 8 x {self.simdgroups} simdgroups")
        if self.block_k % FRAG or self.head_dim % FRAG:
            problems.append("block_k and head dim must be multiples of 8")
        if self.head_dim % self.vec or self.pad % self.vec:
            problems.append(f"head dim {self.head_dim} is not a whole number of {self.vec}-element vectors")
        elif (self.block_k * self.head_dim // self.vec) % self.threads:
            problems.append("a key tile does not split evenly over the threadgroup's threads")
        if self.threads > 1024:
            problems.append(f"{self.threads} threads per threadgroup (max 1024)")
        if self.threadgroup_bytes > MAX_THREADGROUP_BYTES:
            problems.append(f"{self.threadgroup_bytes} bytes of threadgroup memory (max {MAX_THREADGROUP_BYTES})")
        if problems:
            raise AttentionBackendError("the Metal attention kernel cannot run " + "; ".join(problems))
        return self


@functools.lru_cache(maxsize=1)
def _kernel():
    return mx.fast.metal_kernel(
        name="showo_omni_attention",
        input_names=list(INPUT_NAMES),
        output_names=["out"],
        source=_SOURCE,
        header=_HEADER,
        ensure_row_contiguous=True,
    )


def _device_buffer(values: np.ndarray) -> np.ndarray:
    """Flattened, padded with zeros to at least MIN_DEVICE_ELEMENTS so MLX binds it as `device`."""
    flat = np.ascontiguousarray(values).reshape(-1)
    if flat.size < MIN_DEVICE_ELEMENTS:
        flat = np.concatenate([flat, np.zeros(MIN_DEVICE_ELEMENTS - flat.size, flat.dtype)])
    return flat


def pack_tiles(plan: BlockPlan) -> tuple[np.ndarray, np.ndarray]:
    """(B, nqb, max_visits) int32 entries (key block << 1) | partial, and (B, nqb) int32 counts."""
    blocks = np.maximum(plan.key_blocks, 0)
    rows = np.arange(plan.batch)[:, None, None]
    qblocks = np.arange(plan.num_q_blocks)[None, :, None]
    partial = plan.tiles[rows, qblocks, blocks] == PARTIAL
    packed = np.where(plan.key_blocks >= 0, (blocks << 1) | partial, 0).astype(np.int32)
    return packed, plan.key_counts.astype(np.int32)


def launch_config(plan: BlockPlan, heads: int, config: KernelConfig) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, threadgroup) in threads, as mx.fast.metal_kernel takes them: one threadgroup of
    `config.threads` threads per (query block, head, row)."""
    if plan.block_q != config.block_q or plan.block_k != config.block_k:
        raise ValueError(f"the Metal kernel needs a plan with blocks ({config.block_q}, {config.block_k})")
    grid = (config.threads * plan.num_q_blocks, heads, plan.batch)
    threadgroup = (config.threads, 1, 1)
    # The kernel reads its query block, head and row from threadgroup_position_in_grid = grid / threadgroup.
    assert grid[0] % threadgroup[0] == 0 and threadgroup[1] == threadgroup[2] == 1
    return grid, threadgroup


@functools.lru_cache(maxsize=32)
def kernel_inputs(plan: BlockPlan, heads: int, scale: float) -> list[mx.array]:
    """The plan-derived buffers after q, k, v: tiles, counts, flags (device), params, scale (constant).

    Memoised on the plan (plans are themselves cached), so the layers of a forward pass and
    repeated MaskGIT steps upload them once."""
    packed, counts = pack_tiles(plan)
    params = np.array(
        [heads, plan.q_end - plan.q_start, plan.key_len, plan.q_start, plan.flags.shape[1], packed.shape[2]],
        dtype=np.int32,
    )
    assert params.size == len(PARAMS) < MIN_DEVICE_ELEMENTS  # stays in the constant address space
    return [
        mx.array(_device_buffer(packed)),
        mx.array(_device_buffer(counts)),
        mx.array(_device_buffer(plan.flags)),
        mx.array(params),
        mx.array([scale], dtype=mx.float32),
    ]


def unsupported_reason(q: mx.array, k: mx.array, v: mx.array) -> str | None:
    """Why the kernel cannot take these arrays (one line), or None."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return f"q, k, v must be (B, H, L, D), got {q.shape}, {k.shape}, {v.shape}"
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        return f"dtype {q.dtype} is not float16, bfloat16 or float32"
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[3]} is not supported (only {', '.join(map(str, SUPPORTED_HEAD_DIMS))})"
    return None


def metal_supports(q: mx.array, k: mx.array, v: mx.array) -> bool:
    """Whether the kernel handles these shapes and dtypes (head dim 64, one float dtype)."""
    return unsupported_reason(q, k, v) is None


def launch_spec(q: mx.array, k: mx.array, v: mx.array, plan: BlockPlan, scale: float) -> dict:
    """Everything one kernel call is given (inputs, template values, grid, threadgroup, output), after
    checking every assumption the Metal source makes. The tests run their NumPy emulation of the
    kernel on exactly these buffers."""
    B, H, Lq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k {k.shape} and v {v.shape} do not match q {q.shape}")
    if Lq != plan.q_end - plan.q_start or k.shape[2] != plan.key_len or B != plan.batch:
        raise ValueError(f"shapes q {q.shape}, k {k.shape} do not match the plan")
    config = KernelConfig(q.dtype, D).check()
    grid, threadgroup = launch_config(plan, H, config)
    return {
        "inputs": [q, k, v, *kernel_inputs(plan, H, float(scale))],
        "template": config.template(),
        "grid": grid,
        "threadgroup": threadgroup,
        "output_shapes": [(B, Lq, H, D)],
        "output_dtypes": [q.dtype],
    }


def launch(q: mx.array, k: mx.array, v: mx.array, plan: BlockPlan, scale: float, *, verbose: bool = False) -> mx.array:
    """The kernel call itself, output (B, Lq, H, D). Raises MLX's error where Metal is missing
    (except while `mx.export_function` traces it, which is how the tests read the generated source)."""
    (out,) = _kernel()(**launch_spec(q, k, v, plan, scale), verbose=verbose)
    return out


def omni_attention_metal_with_plan(q: mx.array, k: mx.array, v: mx.array, plan: BlockPlan, scale: float) -> mx.array:
    """Run the kernel for q (B, H, Lq, D) at positions plan.q_start.. over k, v (B, H, Lk, D);
    returns (B, H, Lq, D) as a view of the kernel's (B, Lq, H, D) output."""
    reason = metal_unavailable_reason() or unsupported_reason(q, k, v)
    if reason:
        raise AttentionBackendError(f"the Metal attention kernel cannot run: {reason}; use SHOWO_ATTENTION=sdpa")
    return launch(q, k, v, plan, scale).transpose(0, 2, 1, 3)


def omni_attention_metal(
    q: mx.array, k: mx.array, v: mx.array, layouts: Sequence[Layout], q_start: int, scale: float
) -> mx.array:
    """Fused omni-attention: queries at absolute positions [q_start, q_start + Lq) of `layouts`
    (one per row) over keys [0, Lk). Head dim 64; float16 / bfloat16 / float32."""
    plan = make_block_plan(layouts, q_start, q_start + q.shape[2], k.shape[2], BLOCK_Q, BLOCK_K)
    return omni_attention_metal_with_plan(q, k, v, plan, scale)
