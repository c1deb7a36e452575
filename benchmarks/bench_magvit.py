"""MAGVIT-v2 encode / decode speed and peak memory (full-size architecture, random weights).

Run by hand, e.g.:

    python benchmarks/bench_magvit.py --sizes 256 512 --dtypes float32 float16 --repeats 3

On Linux CPU, preload OpenBLAS first or float32 convolutions run on the bundled reference BLAS
(~20x slower); half precision bypasses BLAS entirely and is very slow there (see
docs/PERFORMANCE.md, "Running on Linux"), so the default on a machine without Metal is float32 only:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
    OPENBLAS_CORETYPE=SkylakeX python benchmarks/bench_magvit.py

Times are wall-clock per call for batch size --batch (first call = warm-up, not counted unless
--repeats 1); peak memory is ``mx.get_peak_memory()`` over one call, reset before it, and includes
the resident weights.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from showo_mlx.config import MagvitConfig  # noqa: E402
from showo_mlx.magvit import MagvitV2  # noqa: E402

GB = 1024**3


def parse_args() -> argparse.Namespace:
    on_metal = mx.metal.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides in pixels")
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "float16", "bfloat16"] if on_metal else ["float32"],
        choices=["float32", "float16", "bfloat16"],
        help="compute dtypes (default: all on Metal, float32 only on CPU where half is very slow)",
    )
    p.add_argument("--parts", nargs="+", default=["encode", "decode"], choices=["encode", "decode"])
    p.add_argument("--repeats", type=int, default=2, help="timed calls per case (after a warm-up)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def timed(fn, repeats: int) -> tuple[list[float], float]:
    """Run ``fn`` once to warm up (when repeats > 1), then ``repeats`` times; return the call
    times and the largest peak memory seen in any single call."""
    if repeats > 1:
        mx.eval(fn())
    times, peak = [], 0
    for _ in range(repeats):
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
        peak = max(peak, mx.get_peak_memory())
    return times, peak


def bench(args: argparse.Namespace) -> list[tuple]:
    rows = []
    key = mx.random.key(args.seed)
    cfg = MagvitConfig()
    f = cfg.downsample_factor
    for dtype_name in args.dtypes:
        dtype = getattr(mx, dtype_name)
        model = MagvitV2(cfg, with_encoder="encode" in args.parts)
        model.set_dtype(dtype)
        mx.eval(model.parameters())
        weights_gb = mx.get_active_memory() / GB
        for size in args.sizes:
            k1, k2, key = mx.random.split(key, 3)
            pixels = mx.random.uniform(-1, 1, (args.batch, size, size, 3), key=k1)
            codes = mx.random.randint(0, cfg.codebook_size, (args.batch, (size // f) ** 2), key=k2)
            mx.eval(pixels, codes)
            for part in args.parts:
                fn = functools.partial(model.encode, pixels) if part == "encode" else functools.partial(model.decode, codes)
                times, peak = timed(fn, args.repeats)
                rows.append((dtype_name, size, part, min(times), statistics.mean(times), peak / GB, weights_gb))
                print(f"  done: {dtype_name} {size}px {part}: {min(times):.2f} s", file=sys.stderr, flush=True)
        del model
        mx.clear_cache()
    return rows


def main() -> None:
    args = parse_args()
    preload = os.environ.get("LD_PRELOAD", "")
    backend = "metal" if mx.metal.is_available() else "cpu"
    print(f"mlx {mx.__version__}, backend {backend}, batch {args.batch}, repeats {args.repeats}")
    if backend == "cpu" and "openblas" not in preload:
        print("note: OpenBLAS is not preloaded; float32 convolutions use the slow bundled BLAS")
    rows = bench(args)
    header = f"{'dtype':<9} {'size':>5} {'part':<7} {'best s':>8} {'mean s':>8} {'peak GB':>8} {'weights GB':>10}"
    print(header)
    print("-" * len(header))
    for dtype, size, part, best, mean, peak, weights in rows:
        print(f"{dtype:<9} {size:>5} {part:<7} {best:>8.2f} {mean:>8.2f} {peak:>8.2f} {weights:>10.2f}")


if __name__ == "__main__":
    main()
