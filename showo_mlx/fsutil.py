"""Atomic outputs: a converted model folder, a checkpoint or a PNG either appears complete or not at
all. Everything is first written under a hidden temporary name next to the destination (same
folder → same file system → `os.rename`/`os.replace` is atomic), then moved into place.

Temporary names start with a dot and carry the process id, so a crash leaves an obviously stale,
hidden `.<name>.tmp-<pid>-<token>` that never shadows a real output."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

from .errors import OutputExistsError, OutputWriteError

__all__ = ["atomic_output_dir", "atomic_write_bytes", "atomic_write_file", "ensure_parent"]


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _write_error(path: Path, exc: OSError) -> OutputWriteError:
    reason = exc.strerror or type(exc).__name__
    return OutputWriteError(
        _one_line(f"cannot write {path}: {reason}; choose another output location or fix its permissions")
    )


def _sibling(dst: Path, tag: str, suffix: str = "") -> Path:
    # The random token keeps two outputs of one process (or a reused pid) from colliding.
    return dst.parent / f".{dst.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling symlink is still in the way


def _refuse_existing(dst: Path) -> None:
    raise OutputExistsError(f"{dst} already exists; pass --force to replace it or choose another output")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def ensure_parent(path: str | Path) -> Path:
    """Create the parent folders of `path` (OutputWriteError if that is impossible); returns Path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(path.parent, exc) from None
    if not path.parent.is_dir():  # mkdir(exist_ok) accepts nothing else, but be explicit
        raise OutputWriteError(
            f"cannot write {path}: {path.parent} is not a folder; choose another output location"
        )
    return path


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary hidden sibling name, then move it to `dst` on success.

    Refuses an existing `dst` unless `force` (OutputExistsError). On any exception in the block the
    temporary folder is deleted and the exception re-raised; `dst` is untouched. With `force`, the old
    `dst` is moved aside before the new one is renamed in, and deleted only afterwards, so no failure
    leaves neither the old nor the new folder."""
    dst = Path(dst)
    if _exists(dst) and not force:
        _refuse_existing(dst)
    ensure_parent(dst)
    tmp = _sibling(dst, "tmp")
    try:
        tmp.mkdir()  # default permissions (umask), unlike tempfile.mkdtemp's 0700
    except OSError as exc:
        raise _write_error(dst, exc) from None
    try:
        yield tmp
        _move_into_place(tmp, dst, force)
    except BaseException:  # including KeyboardInterrupt: never leave a half-built folder behind
        _remove(tmp)
        raise


def _move_into_place(tmp: Path, dst: Path, force: bool) -> None:
    if not _exists(dst):
        _rename(tmp, dst)
        return
    if not force:  # appeared while we were building
        _refuse_existing(dst)
    old = _sibling(dst, "old")
    _rename(dst, old)
    try:
        _rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)  # put the previous output back
        raise
    _remove(old)


def _rename(src: Path, dst: Path) -> None:
    try:
        os.rename(src, dst)
    except OSError as exc:
        raise _write_error(dst, exc) from None


def atomic_write_file(path: str | Path, writer: Callable[[Path], object], *, overwrite: bool = True) -> Path:
    """Call `writer(tmp_path)` to write a file, then atomically replace `path` with it.

    The temporary path is in the same folder and keeps `path`'s suffix (`mx.save_safetensors`
    appends ".safetensors" to other names, and PIL picks the format from the suffix). If the writer
    raises, the temporary file is removed and the exception re-raised (an OSError becomes
    OutputWriteError). `overwrite=False` refuses an existing `path` (OutputExistsError)."""
    path = ensure_parent(path)
    if not overwrite and _exists(path):
        _refuse_existing(path)
    tmp = _sibling(path, "tmp", path.suffix)
    try:
        writer(tmp)
        if not tmp.is_file():
            raise OutputWriteError(f"cannot write {path}: the writer did not create {tmp.name}")
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise _write_error(path, exc) from None
    except BaseException:
        _remove(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, overwrite: bool = True) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, os.replace)."""

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:  # "x": never follow a planted file or symlink
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them

    return atomic_write_file(path, write, overwrite=overwrite)
