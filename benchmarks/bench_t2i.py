"""Text-to-image speed: prefix-cached MaskGIT steps vs the reference's full recompute.

Run by hand (random full-size weights unless --model is given; nothing is downloaded):

    python benchmarks/bench_t2i.py --random 256 --steps 3
    python benchmarks/bench_t2i.py --model showlab/show-o --steps 18
    python benchmarks/bench_t2i.py --openblas ...     # Linux: re-run with OpenBLAS preloaded

Prints one table (per-step and per-image times of both paths, their ratio, peak memory) via
showo_mlx.bench, the code behind `showo bench`; see docs/PERFORMANCE.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from showo_mlx.launcher import prepare_process  # noqa: E402


def main() -> None:
    prepare_process()  # before MLX loads: --openblas / SHOWO_OPENBLAS=1 re-executes with OpenBLAS
    from showo_mlx.bench import BenchOptions, format_table, run_bench

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder or Hub id (default: random weights)")
    p.add_argument("--random", type=int, default=256, choices=[256, 512], help="random-weight resolution")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quantize", type=int, help="quantize the transformer to BITS")
    p.add_argument("--steps", type=int, help="MaskGIT steps to time (default: the model's)")
    p.add_argument("--no-recompute", action="store_true", help="time the cached path only")
    p.add_argument("--low-ram", action="store_true")
    p.add_argument("--json", help="write the numbers to this file")
    a = p.parse_args()
    opts = BenchOptions(model=a.model, resolution=a.random, dtype=a.dtype, quantize=a.quantize, steps=a.steps,
                        recompute=not a.no_recompute, phases=("t2i",), low_ram=a.low_ram)
    result = run_bench(opts, log=lambda m: print(m, file=sys.stderr))
    print(format_table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
