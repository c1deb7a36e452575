"""Bounds and checks on what callers pass in (API and command line alike).

Each check raises :class:`GenerationInputError` with one line naming the problem and the fix; the
command line prints it with exit code 2. The bounds on work (steps, images, extension canvas) stop a
typo from running for days; a caller who means it passes ``allow_long=True`` (``--force`` on the
command line).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import GenerationInputError

MAX_STEPS = 1000  # MaskGIT steps per image; the reference uses 16-50 (more than one per token is wasted)
MAX_IMAGES = 1000  # images per call (prompts x seeds)
MAX_CANVAS_WINDOWS = 16  # an extended canvas may cover at most 16 model windows (e.g. 16x256 tokens)
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63: MLX keys take unsigned 64-bit, numpy/JSON signed 64-bit
LONG_HINT = "pass allow_long=True (on the command line: --force) to run it anyway"


def is_integer(value: Any) -> bool:
    """int or numpy integer, but not bool (True would silently mean 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_seed(seed: Any, what: str = "seed") -> int:
    """A seed as a Python int in [0, 2**63); anything else is a one-line GenerationInputError."""
    if not is_integer(seed):
        raise GenerationInputError(f"{what} must be an integer from 0 to 2**63 - 1, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise GenerationInputError(f"{what} {seed} is out of range; use an integer from 0 to 2**63 - 1 ({SEED_LIMIT - 1})")
    return seed


def check_count(value: Any, what: str, limit: int | None = None, allow_long: bool = False) -> int:
    """An integer >= 1, and <= `limit` unless `allow_long`."""
    if not is_integer(value) or value < 1:
        raise GenerationInputError(f"{what} must be an integer >= 1, got {value!r}")
    if limit is not None and value > limit and not allow_long:
        raise GenerationInputError(f"{what} {value} is over the limit of {limit}; {LONG_HINT}")
    return int(value)


def check_number(value: Any, what: str, low: float = 0.0, high: float = math.inf) -> float:
    """A finite real number in [low, high] (NaN and infinities are refused)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise GenerationInputError(f"{what} must be a finite number, got {value!r}")
    if not low <= value <= high:
        bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise GenerationInputError(f"{what} must be {bounds}, got {value!r}")
    return float(value)


def check_text(text: Any, what: str = "prompt") -> str:
    """A str that is valid Unicode (encodable as UTF-8): lone surrogates, which Python produces for
    undecodable bytes (e.g. argv in a wrong locale), are refused instead of reaching the tokenizer."""
    if not isinstance(text, str):
        raise GenerationInputError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raise GenerationInputError(
            f"{what} is not valid Unicode text (unpaired surrogate U+{ord(bad):04X} at character {e.start}); "
            "pass UTF-8 text (check the terminal's or file's encoding)"
        ) from None
    return text
