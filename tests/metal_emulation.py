"""A NumPy re-implementation of the Metal omni-attention kernel's per-thread index arithmetic.

It follows `showo_mlx/kernels/metal_attention.py::_SOURCE` statement by statement, vectorised over
the simdgroups and lanes of one threadgroup: every array index the kernel computes (query rows, the
staged K/V tile, the 8x8 fragment elements of each lane, flag bytes, tile entries, output
positions) is computed here with the same formula and used to read the same flat buffers the host
code builds (`metal_attention.launch_spec`). Only what Metal's hardware does is modelled:

- `simdgroup_multiply_accumulate` on the lane elements (row fr, columns fc, fc + 1 of each lane)
  = an 8x8 matrix product of the matrices those elements form;
- `simd_shuffle_xor(x, m)` = x of lane `lane ^ m`;
- threadgroup memory starts as NaN, so reading a cell that was never staged shows up in the output;
  every output element must be written exactly once.
"""

from __future__ import annotations

import numpy as np

LANES = np.arange(32)
FR = ((LANES // 4) & 4) + (LANES // 2) % 4  # as in the kernel
FC = ((LANES // 4) & 2) * 2 + (LANES % 2) * 2
OMNI_MIN = np.float32(-3.0e38)
LOG2E = np.float32(1.4426950408889634)
PAD, IMAGE, VISIBLE = 1, 2, 4


def frag_matrix(elements: np.ndarray) -> np.ndarray:
    """(..., 32, 2) lane elements -> (..., 8, 8) matrix (NaN where no lane holds a cell)."""
    m = np.full(elements.shape[:-2] + (8, 8), np.nan, dtype=elements.dtype)
    m[..., FR, FC] = elements[..., 0]
    m[..., FR, FC + 1] = elements[..., 1]
    return m


def frag_elements(matrix: np.ndarray) -> np.ndarray:
    """(..., 8, 8) matrix -> (..., 32, 2) the elements each lane holds."""
    return np.stack([matrix[..., FR, FC], matrix[..., FR, FC + 1]], axis=-1)


def shuffle_xor(x: np.ndarray, mask: int) -> np.ndarray:
    """simd_shuffle_xor over the last (lane) axis."""
    return x[..., LANES ^ mask]


def omni_allowed(qp, kp, fq, fk):
    see = (kp <= qp) | ((fq & IMAGE) != 0) | ((fk & VISIBLE) != 0)
    pad_ok = ((fk & PAD) == 0) | ((fq & PAD) != 0)
    return see & pad_ok


def emulate(spec: dict, out_dtype=np.float32) -> np.ndarray:
    """Run the kernel described by `launch_spec(...)` on the CPU; returns the flat output buffer."""
    q, k, v, tiles, counts, flags, params, scale = (np.asarray(x) for x in spec["inputs_np"])
    q, k, v = (x.reshape(-1).astype(np.float32) for x in (q, k, v))
    tiles, counts, flags = tiles.reshape(-1), counts.reshape(-1), flags.reshape(-1)
    t = dict(spec["template"])
    HEAD_D, BQ, BK, NSG, VEC, PAD_T = (t[n] for n in ("HEAD_D", "BQ", "BK", "NSG", "VEC", "PAD_T"))
    assert spec["threadgroup"] == (32 * NSG, 1, 1)
    assert BQ == 8 * NSG and BK % 8 == 0 and HEAD_D % 8 == 0 and HEAD_D % VEC == 0 and PAD_T % VEC == 0
    assert (BK * HEAD_D // VEC) % (32 * NSG) == 0
    TK, TD, LD, VPR, NTHREADS = BK // 8, HEAD_D // 8, HEAD_D + PAD_T, HEAD_D // VEC, 32 * NSG
    H, Lq, Lk, q0, L, max_visits = (int(x) for x in params)
    nqb = (Lq + BQ - 1) // BQ
    (out_shape,) = spec["output_shapes"]
    out = np.full(int(np.prod(out_shape)), np.nan, dtype=np.float32)
    writes = np.zeros(out.size, dtype=np.int64)
    grid, tg = spec["grid"], spec["threadgroup"]
    groups = (grid[0] // tg[0], grid[1] // tg[1], grid[2] // tg[2])
    assert groups[0] == nqb and groups[1] == H

    sg = np.arange(NSG)[:, None]  # (NSG, 1): simdgroup_index_in_threadgroup
    fr, fc = FR[None, :], FC[None, :]  # (1, 32)
    tid = sg * 32 + LANES[None, :]
    dd = np.arange(TD)[:, None, None]  # feature fragment index d
    jj = np.arange(TK)[:, None, None]  # key fragment index j
    ee = np.arange(2)
    qscale = np.float32(scale[0]) * LOG2E

    for b in range(groups[2]):
        for h in range(groups[1]):
            for qblock in range(groups[0]):
                qi = qblock * BQ + sg * 8 + fr  # (NSG, 32)
                q_in = qi < Lq
                qp = q0 + qi
                fq = np.where(q_in, flags[b * L + np.where(q_in, qp, 0)], 0)
                bh = b * H + h
                q_row = (bh * Lq + np.where(q_in, qi, 0)) * HEAD_D  # (NSG, 32)
                Qf = np.stack(
                    [np.where(q_in, q[q_row + dd * 8 + fc + e] * qscale, np.float32(0)) for e in (0, 1)], axis=-1
                ).astype(np.float32)  # (TD, NSG, 32, 2)
                Of = np.zeros_like(Qf)
                m = np.full((NSG, 32), OMNI_MIN, dtype=np.float32)
                l = np.zeros((NSG, 32), dtype=np.float32)
                base = (b * nqb + qblock) * max_visits
                for t_ in range(int(counts[b * nqb + qblock])):
                    entry = int(tiles[base + t_])
                    k0 = (entry >> 1) * BK
                    partial = (entry & 1) != 0
                    # Stage the K and V tiles.
                    k_tile = np.full(BK * LD, np.nan, dtype=np.float32)
                    v_tile = np.full(BK * LD, np.nan, dtype=np.float32)
                    i = np.arange(BK * VPR)  # vector i is moved by thread tid = i % NTHREADS
                    assert np.ptp(np.bincount(i % NTHREADS, minlength=tid.size)) == 0  # an equal share each
                    r, c = i // VPR, (i % VPR) * VEC
                    kp = k0 + r
                    dst = r * LD + c
                    assert (dst % VEC == 0).all()  # the OmniVec index (r * LD + c) / VEC is exact
                    src = ((bh * Lk + kp) * HEAD_D + c)[:, None] + np.arange(VEC)
                    inside = (kp < Lk)[:, None]
                    k_tile[dst[:, None] + np.arange(VEC)] = np.where(inside, k[np.where(inside, src, 0)], 0)
                    v_tile[dst[:, None] + np.arange(VEC)] = np.where(inside, v[np.where(inside, src, 0)], 0)
                    # S = Q Kᵀ with Kᵀ fragments read as the kernel reads them.
                    Kt = np.stack([k_tile[(jj[..., None] * 8 + fc + e) * LD + dd[None] * 8 + fr] for e in (0, 1)], -1)
                    Kt = Kt.reshape(TK, TD, 1, 32, 2)  # (TK, TD, 1, 32, 2): the same for every simdgroup
                    Sm = np.einsum("dsab,jdsbc->jsac", frag_matrix(Qf), frag_matrix(np.broadcast_to(Kt, (TK, TD, NSG, 32, 2))))
                    Sf = frag_elements(Sm)  # (TK, NSG, 32, 2)
                    kp_el = k0 + jj[..., None] * 8 + fc[..., None] + ee  # (TK, 1, 32, 2)
                    fk = flags[b * L + np.minimum(kp_el, Lk - 1)]
                    ok = (kp_el < Lk) & (
                        (not partial) | omni_allowed(qp[None, ..., None], kp_el, fq[None, ..., None], fk)
                    )
                    s = np.where(ok, Sf, OMNI_MIN).astype(np.float32)
                    tile_max = s.max(axis=(0, 3))  # this lane's 2*TK scores
                    tile_max = np.maximum(tile_max, shuffle_xor(tile_max, 1))
                    tile_max = np.maximum(tile_max, shuffle_xor(tile_max, 8))
                    m_new = np.maximum(m, tile_max)
                    factor = np.exp2(m - m_new)
                    with np.errstate(over="ignore"):
                        p = np.where(ok, np.exp2(s - m_new[None, ..., None]), np.float32(0)).astype(np.float32)
                    tile_sum = p.sum(axis=(0, 3))
                    tile_sum = tile_sum + shuffle_xor(tile_sum, 1)
                    tile_sum = tile_sum + shuffle_xor(tile_sum, 8)
                    l = l * factor + tile_sum
                    m = m_new
                    Of = Of * factor[None, ..., None]
                    Vf = np.stack([v_tile[(jj[..., None] * 8 + fr) * LD + dd[None] * 8 + fc + e] for e in (0, 1)], -1)
                    Vf = Vf.reshape(TK, TD, 1, 32, 2)
                    Om = frag_matrix(Of) + np.einsum(
                        "jsab,jdsbc->dsac", frag_matrix(p), frag_matrix(np.broadcast_to(Vf, (TK, TD, NSG, 32, 2)))
                    )
                    Of = frag_elements(Om).astype(np.float32)
                # Output in (B, Lq, H, D).
                o_row = ((b * Lq + qi) * H + h) * HEAD_D  # (NSG, 32)
                with np.errstate(divide="ignore", invalid="ignore"):  # rows past Lq: l = 0, never written
                    inv = np.float32(1) / l
                    for d in range(TD):
                        for e in (0, 1):
                            index = (o_row + d * 8 + fc + e)[q_in]
                            out[index] = (Of[d, ..., e] * inv)[q_in].astype(out_dtype)
                            np.add.at(writes, index, 1)
    assert (writes == 1).all(), "every output element is written exactly once"
    return out
