"""Thin entry point: `python cli.py generate "a rally car race"` == `showo generate ...`."""

from showo_mlx.cli import main

if __name__ == "__main__":
    main()
