"""Answer decoding speed: KV-cached tokens vs the reference's full forward per token.

Run by hand (random full-size weights unless --model is given; nothing is downloaded):

    python benchmarks/bench_ask.py --tokens 100                       # recompute every position
    python benchmarks/bench_ask.py --tokens 100 --recompute-tokens 10  # 10 evenly spaced positions
    python benchmarks/bench_ask.py --openblas ...     # Linux: re-run with OpenBLAS preloaded

The recompute path re-runs the whole sequence (image + question + answer so far) for each token, as
the reference does; with --recompute-tokens it is timed at that many evenly spaced answer positions
and the table says so. Prints the image encode, prefill and per-token times, their ratio and peak
memory via showo_mlx.bench (the code behind `showo bench`).
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
    p.add_argument("--tokens", type=int, default=100, help="answer length")
    p.add_argument("--recompute-tokens", type=int, help="recompute at this many evenly spaced positions (default all)")
    p.add_argument("--no-recompute", action="store_true", help="time the KV-cache path only")
    p.add_argument("--low-ram", action="store_true")
    p.add_argument("--json", help="write the numbers to this file")
    a = p.parse_args()
    opts = BenchOptions(model=a.model, resolution=a.random, dtype=a.dtype, quantize=a.quantize, tokens=a.tokens,
                        recompute_tokens=a.recompute_tokens, recompute=not a.no_recompute, phases=("ask",),
                        low_ram=a.low_ram)
    result = run_bench(opts, log=lambda m: print(m, file=sys.stderr))
    print(format_table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
