"""Text-to-image speed: prefix-cached MaskGIT steps vs the reference's full recompute.

Run by hand (random full-size weights unless --model is given; nothing is downloaded):

    python benchmarks/bench_t2i.py --random 256 --steps 3
    python benchmarks/bench_t2i.py --model showlab/show-o --steps 18
    python benchmarks/bench_t2i.py --openblas ...     # Linux: re-run with OpenBLAS preloaded

Prints one table (per-step and per-image times of both paths, their ratio, peak memory) via
showo_mlx.bench, the code behind `showo bench`; see docs/PERFORMANCE.md for what the numbers mean.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from showo_mlx.bench import main  # noqa: E402

if __name__ == "__main__":
    main(preset=["--only", "t2i"])  # any `showo bench` option works here too
