"""Where a command's images go, decided and checked before the model loads.

Names: `--output` may hold `{seed}` and `{i}` (the image's index). Several images and no placeholder:
NAME.png, NAME_1.png, NAME_2.png, … The default name (`image.png` for generate) never refuses and
never overwrites: like mflux it moves on to the next free number. A name the user chose that exists
is refused unless `--force`.

Checks, all before any work (so nothing is computed for an output that cannot be written): the name
ends in .png; it is not a folder; its folder exists or can be created; and a file of the exact
temporary name `save_png` will write (a hidden sibling, 18 bytes longer) can be created there — which
catches read-only folders, /proc and /sys, and names too long for the file system, whoever runs it
(a permission test alone says yes to root).
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from .errors import OutputExistsError, OutputWriteError, ShowoError
from .fsutil import ensure_parent

TEMP_SUFFIX_BYTES = len(f"..{secrets.token_hex(6)}.tmp")  # what save_png adds to the name


def numbered(path: Path, k: int) -> Path:
    """image.png, image_1.png, image_2.png, …"""
    return path if k == 0 else path.with_name(f"{path.stem}_{k}{path.suffix}")


def plan_outputs(pattern: str | None, default: str, seeds: list, force: bool) -> list[Path]:
    """One checked output path per image (seeds[i] is image i's seed)."""
    if pattern is None:
        return _free_names(Path(default), len(seeds), force)
    n = len(seeds)
    if "{seed}" in pattern or "{i}" in pattern:
        try:
            paths = [Path(pattern.format(seed=seed, i=i)) for i, seed in enumerate(seeds)]
        except (KeyError, IndexError, ValueError) as e:
            raise ShowoError(f"--output {pattern!r} has an unknown placeholder ({e}); use {{seed}} and {{i}}") from None
    else:
        if "{" in pattern or "}" in pattern:
            raise ShowoError(f"--output {pattern!r} has an unknown placeholder; use {{seed}} and {{i}}")
        paths = [numbered(Path(pattern), k) for k in range(n)]
    if len(set(paths)) != len(paths):
        raise ShowoError(f"--output {pattern!r} gives the same file for several images; add {{i}} or {{seed}}")
    for p in paths:
        check_destination(p)
        if (p.exists() or p.is_symlink()) and not force:
            raise OutputExistsError(f"{p} exists; choose another --output or pass --force to overwrite")
    return paths


def _free_names(path: Path, n: int, force: bool) -> list[Path]:
    paths, k = [], 0
    while len(paths) < n:
        candidate = numbered(path, k)
        k += 1
        taken = candidate.exists() or candidate.is_symlink()
        if candidate.is_dir() or (taken and not force):
            continue
        check_destination(candidate)
        paths.append(candidate)
    return paths


def check_destination(path: Path) -> None:
    """Refuse, in one line, an output that could not be written (see the module docstring)."""
    if path.suffix.lower() != ".png":
        raise ShowoError(f"output {path} must end in .png")
    if path.is_dir():
        raise OutputWriteError(f"{path} is a folder; give a file name such as {path / 'image.png'}")
    ensure_parent(path)
    probe = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            size = len(os.fsencode(path.name))
            raise OutputWriteError(
                f"output name {path.name[:24]}… is too long for the file system ({size} bytes; the limit with the "
                f"temporary suffix is about {255 - TEMP_SUFFIX_BYTES}); choose a shorter --output") from None
        raise OutputWriteError(f"cannot create files in {path.parent} ({e.strerror or type(e).__name__}); "
                               "choose another --output folder") from None
    os.close(fd)
    os.unlink(probe)
