"""Omni-attention speed on Show-o's shapes: SDPA with each mask form, blockwise MLX, the Metal kernel.

Run by hand:  python benchmarks/bench_attention.py [--lengths 387 1155] [--repeats 3] [--dtype float16]
              [--prompt-pads 5] [--no-blockwise]

Shapes are Show-o's: a CFG batch of two t2i rows (a prompt with --prompt-pads left pads and the
unconditional prompt with 126), 32 heads of 64, L = 387 (256 px) and 1155 (512 px). Rows:

- prefill: every query of the rows (the reference's recompute, training): rows differ, SDPA gets
  the (B, 1, L, L) boolean mask;
- hot loop: the queries after the cached 129-token text prefix (q_start = 129) over all L keys, as
  every MaskGIT step runs them, with SDPA given the full (B, 1, Lq, Lk) mask (what showo-mlx did
  before), the compact (B, 1, 1, Lk) key mask (the default now), and the compact mask with the pad
  keys common to both rows dropped from the prefix (exact: masked keys contribute nothing).

Every mask and plan is built once, before the clock starts (as the model does: once per prompt),
so the times are the attention calls alone; the variants of a shape are timed in interleaved rounds
(best of --repeats), so a busy spell of a shared machine hurts all of them alike. "tiles" is the share of the Metal kernel's 32x32 tiles
its block plan computes. Blockwise MLX is the CPU-testable spec of the kernel, not a fast path.
On Linux run with OpenBLAS preloaded (SHOWO_OPENBLAS=1, see docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from showo_mlx.attention import attention_mask
from showo_mlx.doctor import TEXT, interleaved_best_ms, random_qkv
from showo_mlx.kernels import blockwise_attention_with_plan, make_block_plan, metal_attention
from showo_mlx.layout import t2i_layout

SCALE = 0.125


def sdpa(q, k, v, mask):
    return lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=mask)


def run_shape(name: str, layouts, q_start: int, heads: int, dtype, repeats: int, blockwise: bool) -> list[dict]:
    """Every variant of one shape, timed in interleaved rounds (see `interleaved_best_ms`)."""
    length = layouts[0].length
    lq = length - q_start
    q, k, v = random_qkv(2, heads, lq, length, 64, 0, dtype)
    mx.eval(q, k, v)
    mask = attention_mask(layouts, q_start)
    plan32 = make_block_plan(layouts, q_start, length, length, metal_attention.BLOCK_Q, metal_attention.BLOCK_K)
    plan64 = make_block_plan(layouts, q_start, length, length, 64, 64)
    variants = {"full": (f"{name}, full mask (B,1,Lq,Lk)", length, sdpa(q, k, v, mask.array))}
    if mask.uniform_rows:
        key = mask.key_mask
        variants["compact"] = (f"{name}, compact key mask (B,1,1,Lk)", length, sdpa(q, k, v, key))
        # Left pads shared by both rows: no image query sees them, so dropping them is exact.
        common = min(lay.pads[0][1] if lay.pads else 0 for lay in layouts)
        if common:
            variants["dropped"] = (f"{name}, compact, {common} common pad keys dropped", length - common,
                                   sdpa(q, k[:, :, common:], v[:, :, common:], key[..., common:]))
    calls = {key: fn for key, (_, _, fn) in variants.items()}
    if blockwise:
        calls["blockwise"] = lambda: blockwise_attention_with_plan(q, k, v, plan64, SCALE)
    if metal_attention.metal_unavailable_reason() is None:
        calls["metal"] = lambda: metal_attention.omni_attention_metal_with_plan(q, k, v, plan32, SCALE)
    ms = interleaved_best_ms(calls, repeats)
    ref = variants["full"][2]().astype(mx.float32)

    def err(fn):
        return mx.abs(fn().astype(mx.float32) - ref).max().item()

    rows = []
    for key, (call, keys, fn) in variants.items():
        row = {"L": length, "call": call, "shape": f"{lq}x{keys}", "tiles": plan32.density(), "sdpa_ms": ms[key]}
        if key == "full":
            for other in ("blockwise", "metal"):
                if other in calls:
                    row[f"{other}_ms"] = ms[other]
                    row[f"{other}_err"] = err(calls[other])
        else:
            row["sdpa_err"] = err(fn)
        rows.append(row)
    return rows


def run_length(length: int, pads: int, heads: int, dtype, repeats: int, blockwise: bool) -> list[dict]:
    layouts = [t2i_layout(length, pads, TEXT, length - 1), t2i_layout(length, 126, TEXT, length - 1)]
    return [
        *run_shape("prefill, rows differ", layouts, 0, heads, dtype, repeats, blockwise),
        *run_shape("hot loop", layouts, TEXT, heads, dtype, repeats, blockwise),
    ]


def cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[387, 1155])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-pads", type=int, default=5, help="left pads of the prompt row (a short prompt has ~100)")
    parser.add_argument("--no-blockwise", action="store_true", help="skip the (slow) blockwise MLX path")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)

    print(f"device {mx.default_device()}, dtype {args.dtype}, B=2 (CFG: prompt with {args.prompt_pads} pads, "
          f"unconditional with 126), H={args.heads}, D=64, best of {args.repeats} interleaved rounds after a warm-up")
    reason = metal_attention.metal_unavailable_reason()
    if reason:
        print(f"metal: skipped: {reason}")
    header = (f"{'L':>5}  {'call':<46} {'Lq x Lk':>9} {'tiles':>6} {'sdpa ms':>9} {'blockwise ms':>13} "
              f"{'metal ms':>9} {'max |Δ| vs full-mask sdpa':>26}")
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        for row in run_length(length, args.prompt_pads, args.heads, dtype, args.repeats, not args.no_blockwise):
            errs = [f"{k.split('_')[0]} {row[k]:.1e}" for k in ("sdpa_err", "blockwise_err", "metal_err") if k in row]
            print(f"{row['L']:>5}  {row['call']:<46} {row['shape']:>9} {row['tiles']:>6.0%} {row['sdpa_ms']:>9.1f} "
                  f"{cell(row, 'blockwise_ms', '.1f'):>13} {cell(row, 'metal_ms', '.1f'):>9} {', '.join(errs):>26}")
    print("tiles: share of the Metal kernel's 32x32 tiles its plan computes (the rest are skipped)")


if __name__ == "__main__":
    main()
