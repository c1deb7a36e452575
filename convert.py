"""Thin entry point: `python convert.py SRC DST [options]` == `showo convert SRC DST [options]`."""

import sys

from showo_mlx.cli import main

if __name__ == "__main__":
    sys.argv.insert(1, "convert")
    main()
