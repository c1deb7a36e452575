"""Answer decoding speed: KV-cached tokens vs the reference's full forward per token.

Run by hand (random full-size weights unless --model is given; nothing is downloaded):

    python benchmarks/bench_ask.py --tokens 100                        # recompute at 5 evenly spaced positions
    python benchmarks/bench_ask.py --tokens 100 --recompute-tokens 100  # every position (slow)
    python benchmarks/bench_ask.py --openblas ...     # Linux: re-run with OpenBLAS preloaded

The recompute path re-runs the whole sequence (image + question + answer so far) for each token, as
the reference does; with --recompute-tokens it is timed at that many evenly spaced answer positions
and the table says so. Prints the image encode, prefill and per-token times, their ratio and peak
memory: `showo bench --only ask`, runnable without installing the entry point.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from showo_mlx.bench import main  # noqa: E402

if __name__ == "__main__":
    main(preset=["--only", "ask"])  # any `showo bench` option works here too
