"""What every `showo` command shares: one-line errors (exit 2), clean Ctrl-C (exit 130), the
closing line with time and peak memory."""

from __future__ import annotations

import functools
import time
from typing import Callable

import typer

from .errors import ShowoError

MODEL_HELP = "Hub id (e.g. showlab/show-o) or a local folder (converted or official layout)."


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable | None = None, *, interrupted: str = "interrupted; nothing more was written") -> Callable:
    """Map showo-mlx's typed errors to one line + exit 2, Ctrl-C to `interrupted` + exit 130."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ShowoError as e:
                fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
            except KeyboardInterrupt:
                typer.echo(f"\n{interrupted}", err=True)
                raise typer.Exit(130)

        return wrapper

    return decorate(fn) if fn is not None else decorate


def closing_line(start: float) -> None:
    import mlx.core as mx

    typer.echo(f"done in {time.perf_counter() - start:.1f} s, peak memory {mx.get_peak_memory() / 1e9:.2f} GB", err=True)
