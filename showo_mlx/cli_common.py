"""What every `showo` command shares: one-line errors (exit 2), clean Ctrl-C (exit 130), the
closing line with time and peak memory, `--verbose/-v` and `--quiet`, and the quantization options.

Output discipline: results go to stdout (answers, the paths of saved images); everything else —
notes, progress bars, summaries — goes to stderr through `say`, which `--quiet` silences. The
library's notes (an image centre-cropped, its alpha channel dropped, a mask resized, an EXIF
rotation applied, …) are log records of the `showo_mlx` loggers; during a command they are printed
on stderr, one line each (`note: …`), and `--verbose` adds the debug records.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from typing import Callable, Optional

import typer

from .errors import ShowoError

MODEL_HELP = "Hub id (e.g. showlab/show-o) or a local folder (converted or official layout)."
LOGGER = "showo_mlx"

QUIET, NORMAL, VERBOSE = 0, 1, 2
_verbosity = NORMAL


def verbosity() -> int:
    return _verbosity


def say(message: str) -> None:
    """A line on stderr unless --quiet."""
    if _verbosity > QUIET:
        typer.echo(message, err=True)


def debug(message: str) -> None:
    """A `debug:` line on stderr with --verbose only."""
    if _verbosity >= VERBOSE:
        typer.echo(f"debug: {message}", err=True)


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class _StderrNotes(logging.Handler):
    """Library log records → one line each on stderr (looked up at emit time, so test runners that
    swap sys.stderr see them)."""

    PREFIX = {logging.DEBUG: "debug", logging.INFO: "note", logging.WARNING: "warning"}

    def emit(self, record: logging.LogRecord) -> None:
        prefix = self.PREFIX.get(record.levelno, "error")
        text = " ".join(record.getMessage().split())  # one line, whatever the message holds
        typer.echo(f"{prefix}: {text}", err=True)


def _show_library_notes(level: int) -> Callable[[], None]:
    """Print the showo_mlx loggers' records at `level` and above until the returned undo is called."""
    logger = logging.getLogger(LOGGER)
    handler = _StderrNotes(level)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous)

    return undo


VerboseOption = typer.Option(False, "--verbose", "-v", help="More detail on stderr (debug notes); off by default.")
QuietOption = typer.Option(False, "--quiet", help="Only results and errors: no notes, progress bars or summaries; off by default.")


def handle_errors(fn: Callable | None = None, *, interrupted: str = "interrupted; nothing more was written") -> Callable:
    """Map showo-mlx's typed errors to one line + exit 2, Ctrl-C to `interrupted` + exit 130, and
    give the command `--verbose/-v` and `--quiet` (added to its signature, so typer shows them)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, verbose: bool = False, quiet: bool = False, **kwargs):
            global _verbosity
            if verbose and quiet:
                fail("--verbose and --quiet contradict each other; give one of them")
            saved = _verbosity
            _verbosity = QUIET if quiet else VERBOSE if verbose else NORMAL
            undo = _show_library_notes({QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}[_verbosity])
            try:
                return fn(*args, **kwargs)
            except ShowoError as e:  # exit 2, or the error's own code (3: training diverged, 4: a rank failed)
                fail(" ".join(str(e).split()) or type(e).__name__, code=getattr(e, "exit_code", 2))
            except KeyboardInterrupt:
                typer.echo(f"\n{interrupted}", err=True)
                raise typer.Exit(130)
            finally:
                undo()
                _verbosity = saved

        signature = inspect.signature(fn, eval_str=True)
        extra = [
            inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=VerboseOption, annotation=bool),
            inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=QuietOption, annotation=bool),
        ]
        wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
        wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "verbose": bool, "quiet": bool}
        return wrapper

    return decorate(fn) if fn is not None else decorate


def closing_line(start: float) -> None:
    import mlx.core as mx

    say(f"done in {time.perf_counter() - start:.1f} s, peak memory {mx.get_peak_memory() / 1e9:.2f} GB")


# -- quantization: mlx-lm's spelling on every command --------------------------------------------
QuantizeOption = typer.Option(False, "--quantize", "-q", help="Quantize the transformer's Linear layers (mlx-lm's -q); off by default.")
QBitsOption = typer.Option(None, "--q-bits", help="Bits per weight with -q: 2, 3, 4, 5, 6 or 8 (default 4).")
QGroupSizeOption = typer.Option(None, "--q-group-size", help="Weights per scale with -q: 32, 64 or 128 (default 64).")
QHeadBitsOption = typer.Option(None, "--q-head-bits", help="With -q, also quantize the embedding and lm_head at this width (default: they stay float).")


def quantize_spec(quantize: bool, bits: Optional[int], group_size: Optional[int], head_bits: Optional[int]):
    """The QuantizeSpec the flags ask for (None without -q); the --q-* options need -q."""
    from .convert import QuantizeSpec

    if not quantize:
        flags = {"--q-bits": bits, "--q-group-size": group_size, "--q-head-bits": head_bits}
        given = [(name, value) for name, value in flags.items() if value is not None]
        if given:
            raise ShowoError(f"{given[0][0]} needs -q/--quantize: write -q {given[0][0]} {given[0][1]}")
        return None
    return QuantizeSpec(bits if bits is not None else 4, group_size if group_size is not None else 64, head_bits).validate()
