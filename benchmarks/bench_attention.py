"""Omni-attention speed: SDPA with a boolean mask vs blockwise MLX vs the fused Metal kernel.

Run by hand:  python benchmarks/bench_attention.py [--lengths 387 1155] [--repeats 3] [--dtype float16]

Shapes are Show-o's: a CFG batch of two t2i rows (a prompt with a few left pads and the
unconditional prompt with 126), 32 heads of 64, L = 387 (256 px) and 1155 (512 px); "prefix" runs
only the queries after the cached 129-token text prefix (q_start = 129) over all L keys, as every
MaskGIT step does. Blockwise MLX is the CPU-testable spec of the kernel, not a fast path. On Linux
set LD_PRELOAD to OpenBLAS for meaningful CPU numbers (see shared/reference/mlx-on-linux.md).
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from showo_mlx.kernels import blockwise_attention_with_plan, make_block_plan, masked_sdpa, metal_available
from showo_mlx.kernels import metal_attention
from showo_mlx.layout import t2i_layout

TEXT = 129  # t2i text prefix length: the soi sits at position 129


def timed(fn, repeats: int) -> tuple[float, mx.array]:
    """Best wall time in ms over `repeats` runs after one warm-up."""
    out = fn()
    mx.eval(out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        mx.eval(out)
        best = min(best, time.perf_counter() - start)
    return best * 1e3, out


def run_case(length: int, prefix: bool, heads: int, dtype, repeats: int, blockwise: bool) -> dict:
    layouts = [t2i_layout(length, 5, TEXT, length - 1), t2i_layout(length, 126, TEXT, length - 1)]
    q_start = TEXT if prefix else 0
    keys = mx.random.split(mx.random.key(0), 3)
    q = mx.random.normal((2, heads, length - q_start, 64), key=keys[0]).astype(dtype)
    k = mx.random.normal((2, heads, length, 64), key=keys[1]).astype(dtype)
    v = mx.random.normal((2, heads, length, 64), key=keys[2]).astype(dtype)
    scale = 0.125

    start = time.perf_counter()
    plan = make_block_plan(layouts, q_start, length, length, 64, 64)
    row = {"L": length, "prefix": prefix, "plan_ms": (time.perf_counter() - start) * 1e3, "density": plan.density()}

    row["sdpa_ms"], ref = timed(lambda: masked_sdpa(q, k, v, layouts, q_start, scale), repeats)
    if blockwise:
        row["blockwise_ms"], out = timed(lambda: blockwise_attention_with_plan(q, k, v, plan, scale), repeats)
        row["blockwise_err"] = mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max().item()
    if metal_available():
        row["metal_ms"], out = timed(
            lambda: metal_attention.omni_attention_metal(q, k, v, layouts, q_start, scale), repeats
        )
        row["metal_err"] = mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max().item()
    return row


def cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "skipped"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[387, 1155])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-blockwise", action="store_true", help="skip the (slow) blockwise MLX path")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)

    print(f"device {mx.default_device()}, dtype {args.dtype}, B=2 (CFG), H={args.heads}, D=64, best of {args.repeats}")
    if not metal_available():
        print("metal: skipped: no Metal")
    header = (
        f"{'L':>5} {'prefix':>6} {'tiles':>6} {'plan ms':>8} {'sdpa ms':>9} {'blockwise ms':>13} "
        f"{'metal ms':>9} {'max |Δ| blockwise':>18} {'max |Δ| metal':>14}"
    )
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        for prefix in (False, True):
            row = run_case(length, prefix, args.heads, dtype, args.repeats, not args.no_blockwise)
            print(
                f"{row['L']:>5} {'yes' if prefix else 'no':>6} {row['density']:>6.0%} {row['plan_ms']:>8.2f} "
                f"{row['sdpa_ms']:>9.1f} {cell(row, 'blockwise_ms', '.1f'):>13} {cell(row, 'metal_ms', '.1f'):>9} "
                f"{cell(row, 'blockwise_err', '.1e'):>18} {cell(row, 'metal_err', '.1e'):>14}"
            )
    print("tiles: share of 64×64 tiles the plan computes (the rest are skipped)")


if __name__ == "__main__":
    main()
