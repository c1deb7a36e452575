"""Atomic outputs: a converted model folder, a checkpoint or a PNG either appears complete or not at
all. Everything is first written under a hidden temporary name next to the destination (same
folder → same file system → `os.rename`/`os.replace` is atomic), then moved into place.

Temporary names start with a dot and carry the process id and a host tag, so a crash leaves an
obviously stale, hidden `.<name>.tmp-<pid>-<host>-<token>` that never shadows a real output.

Replacing an existing folder takes three renames: the finished temporary becomes
`.<name>.new-…` (so a complete copy is recognisable), the old folder becomes `.<name>.old-…`, the
new one takes the name; the old one is deleted last. A process killed between two renames leaves
`<name>` missing for a moment; `recover_interrupted` (run before every folder output and model
lookup) completes that swap, or puts the old folder back when no complete new one exists, and
deletes the temporaries of processes that no longer run. Files and folders are fsynced before the
rename that publishes them, and the parent folder after it, so a power cut cannot publish a name
whose data is not on disk.

`check_output_folder` is the guard every command that writes a folder calls first: the output may
not be, hold or sit inside one of the command's inputs, nor be `/`, the home folder or the current
folder, and `--force` only replaces an empty folder or one the same command wrote before."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import OutputExistsError, OutputWriteError, ShowoError, UnsafeOutputError

__all__ = [
    "atomic_output_dir",
    "atomic_write_bytes",
    "atomic_write_file",
    "check_output_folder",
    "ensure_parent",
    "has_json_marker",
    "read_regular_file",
    "recover_interrupted",
    "source_roots",
]

log = logging.getLogger(__name__)

# Which machine a temporary belongs to: a pid only means something on the host that made it (a
# run folder on a disk shared by several Macs must not lose another host's live temporaries).
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_TEMP_NAME = re.compile(
    r"^\.(?P<name>.+)\.(?P<tag>tmp|new|old)-(?P<pid>\d{1,10})-(?:(?P<host>[0-9a-f]{6})-)?[0-9a-f]{8}(?:\.[^.]*)?$"
)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _write_error(path: Path, exc: OSError) -> OutputWriteError:
    reason = exc.strerror or type(exc).__name__
    return OutputWriteError(
        _one_line(f"cannot write {path}: {reason}; choose another output location or fix its permissions")
    )


def _sibling(dst: Path, tag: str, suffix: str = "") -> Path:
    # The random token keeps two outputs of one process (or a reused pid) from colliding.
    return dst.parent / f".{dst.name}.{tag}-{os.getpid()}-{_HOST}-{secrets.token_hex(4)}{suffix}"


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


# --------------------------------------------------------------------------------------------
# Durability: fsync before a rename publishes data, and the folder after it
# --------------------------------------------------------------------------------------------


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # some file systems cannot open folders for syncing; the data is synced anyway
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # folders: EINVAL on file systems without directory sync
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                _fsync(path)
        _fsync(Path(folder), directory=True)


# --------------------------------------------------------------------------------------------
# Recovery after a kill
# --------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to another user
    except (OverflowError, ValueError, OSError):
        return False  # not a pid this system can have
    return True


def _dead_temporaries(parent: Path) -> dict[str, list[tuple[str, Path]]]:
    """name → [(tag, path)] of the hidden temporaries in `parent` whose process is gone."""
    groups: dict[str, list[tuple[str, Path]]] = {}
    try:
        entries = [e.name for e in os.scandir(parent) if e.name.startswith(".")]
    except OSError:
        return groups
    for entry in entries:
        m = _TEMP_NAME.match(entry)
        if m is None or m["host"] not in (None, _HOST) or _pid_alive(int(m["pid"])):
            continue
        groups.setdefault(m["name"], []).append((m["tag"], parent / entry))
    return groups


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def recover_interrupted(parent: str | Path) -> list[str]:
    """Finish the replaces killed processes left half-done in folder `parent`; returns what it did.

    For every output name with temporaries of dead processes: if the output itself is missing, a
    complete new copy (`.new-`) takes its place, else the previous copy (`.old-`) is put back.
    Then every remaining temporary of a dead process is deleted. Temporaries of live processes (and
    of other hosts) are left alone."""
    parent = Path(parent)
    notes: list[str] = []
    for name, items in _dead_temporaries(parent).items():
        dst = parent / name
        if not _exists(dst):
            for tag, verb in (("new", "completed the interrupted replacement of"), ("old", "restored the previous")):
                candidates = sorted((p for t, p in items if t == tag), key=_mtime, reverse=True)
                if not candidates:
                    continue
                try:
                    os.rename(candidates[0], dst)
                except OSError:
                    break  # another process got there first, or the folder is read-only
                items = [(t, p) for t, p in items if p != candidates[0]]
                notes.append(f"{verb} {dst} (a previous run was killed while replacing it)")
                break
        for _, path in items:
            _remove(path)
        if items:
            notes.append(f"removed {len(items)} stale temporary item(s) of {dst} left by killed runs")
    if notes:
        _fsync(parent, directory=True)
        for note in notes:
            log.warning(note)
    return notes


# --------------------------------------------------------------------------------------------
# The output guard
# --------------------------------------------------------------------------------------------


def _forms(path: Path) -> set[Path]:
    """The path as written (made absolute) and with every symlink resolved."""
    path = path.expanduser()
    return {Path(os.path.abspath(path)), Path(os.path.realpath(path))}


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _input_places(item: str | Path) -> list[tuple[Path, bool]]:
    """(path, is_the_input_itself) for one input argument; globs and brace ranges protect the
    folder they expand in (the output may sit inside that folder, not be it or hold it)."""
    parts = Path(str(item)).expanduser().parts
    cut = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[{")), None)
    if cut == 0:
        return []  # a pattern relative to the current folder, which is protected anyway
    base = Path(*parts[:cut]) if cut is not None else Path(*parts)
    if not _exists(base):
        return []  # a Hub id or a path that is not there: nothing on disk to protect
    places = [(base, cut is None)]
    real = Path(os.path.realpath(base))
    if real.is_dir() and real.parent.name == "snapshots":
        places.append((real.parent.parent, True))  # a Hub cache repo: its blobs hold the files
    return places


def _relation(dst_forms: set[Path], place: Path, whole: bool) -> str | None:
    """How the output relates to a place that must survive: "is", "contains", "is inside" (only
    checked when `whole`: the place is an input folder itself, not the folder a glob expands in)."""
    for form in dst_forms:
        for where in _forms(place):
            if form == where:
                return "is"
            if _within(where, form):
                return "contains"
            if whole and _within(form, where):
                return "is inside"
    return None


def _protected() -> list[tuple[Path, str]]:
    places = [(Path("/"), "the file system root"), (Path.cwd(), "the current folder")]
    with contextlib.suppress(RuntimeError, KeyError):
        places.append((Path.home(), "your home folder"))
    return places


def check_output_folder(
    dst: str | Path,
    *,
    force: bool,
    inputs: Iterable[str | Path | None] = (),
    is_previous_output: Callable[[Path], bool] | None = None,
    command: str = "this command",
) -> Path:
    """Refuse (UnsafeOutputError, nothing touched) an output folder whose replacement could destroy
    data; returns `dst` as a Path. Call it before any work, with every path the command reads.

    Refused: `dst` is, holds or sits inside an input; `dst` is or holds `/`, the home folder or the
    current folder; an existing `dst` without `force` (OutputExistsError); with `force`, an existing
    `dst` that is a file or a symlink, or a non-empty folder that `is_previous_output` does not
    recognise as written by `command`."""
    dst = Path(dst).expanduser()
    if dst.parent.is_dir():
        recover_interrupted(dst.parent)
    here = _forms(dst)
    for place, label in _protected():
        relation = _relation(here, place, whole=False)
        if relation:
            raise UnsafeOutputError(
                f"refusing to write the output to {dst}: it {relation} {label}; choose a new folder for the output"
            )
    for item in inputs:
        for place, whole in _input_places(item) if item is not None else ():
            relation = _relation(here, place, whole)
            if relation:
                raise UnsafeOutputError(
                    f"refusing to write the output to {dst}: it {relation} the input {item}; "
                    "choose an output folder outside the inputs"
                )
    if not _exists(dst):
        return dst
    if not force:
        _refuse_existing(dst)
    if dst.is_symlink() or not dst.is_dir():
        kind = "a symbolic link" if dst.is_symlink() else "a file"
        raise UnsafeOutputError(f"refusing to replace {dst}: it is {kind}, not an output folder; remove it yourself or choose another output")
    try:
        empty = next(os.scandir(dst), None) is None
    except OSError as exc:
        raise _write_error(dst, exc) from None
    if not empty and not (is_previous_output is not None and is_previous_output(dst)):
        raise UnsafeOutputError(
            f"refusing to replace {dst}: --force only replaces an empty folder or one written by {command}, "
            "and this one is neither; delete it yourself if it is not needed, or choose another output"
        )
    return dst


def has_json_marker(folder: Path, name: str, key: str, value: object) -> bool:
    """True when `folder/name` is a small regular JSON file whose `key` equals `value` (the marker
    an output carries, e.g. config.json's model_type "showo")."""
    try:
        data = json.loads(read_regular_file(Path(folder) / name, limit=16 << 20))
    except (OSError, ShowoError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get(key) == value


# --------------------------------------------------------------------------------------------
# Reading input files safely
# --------------------------------------------------------------------------------------------


def source_roots(folder: str | Path) -> list[Path]:
    """Where files of a model folder may really live: the folder itself and, for a Hugging Face
    cache snapshot (whose files are symlinks into `../../blobs`), the repo's blob store."""
    real = Path(os.path.realpath(Path(folder).expanduser()))
    roots = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        roots.append(real.parent.parent / "blobs")
    return roots


def read_regular_file(
    path: str | Path,
    *,
    limit: int,
    within: Iterable[Path] | None = None,
    error: type[ShowoError] = ShowoError,
) -> bytes:
    """The bytes of `path`, if it is a regular file of at most `limit` bytes (and, with `within`,
    one whose real location is inside one of those folders).

    FIFOs, devices and sockets are refused from `stat` alone, before anything opens them (opening a
    FIFO blocks; /dev/zero never ends). FileNotFoundError passes through for the caller to word."""
    path = Path(path)
    st = os.stat(path)  # follows symlinks: the target is what would be read
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} is not a regular file (a FIFO, device, socket or folder); replace it with a real file")
    if within is not None:
        roots = [Path(os.path.realpath(r)) for r in within]
        real = Path(os.path.realpath(path))
        if not any(_within(real, root) for root in roots):
            raise error(
                f"{path} links to {real}, outside {roots[0]}; refusing to read it (copy the real file into the folder)"
            )
    if st.st_size > limit:
        raise error(f"{path} is {st.st_size:,} bytes, more than the {limit:,} such a file may have; check that it is the right file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(f.fileno())
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
            raise error(f"{path} changed while it was being opened; try again")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{path} grew past {limit:,} bytes while it was being read; check that it is the right file")
    return data


# --------------------------------------------------------------------------------------------
# Atomic outputs
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary hidden sibling name, then move it to `dst` on success.

    Refuses an existing `dst` unless `force` (OutputExistsError). On any exception in the block the
    temporary folder is deleted and the exception re-raised; `dst` is untouched. With `force`, the old
    `dst` is moved aside before the new one is renamed in, and deleted only afterwards, so no failure
    leaves neither the old nor the new folder (and a kill in between is repaired by the next run,
    see `recover_interrupted`). Commands with user-chosen outputs call `check_output_folder` first."""
    dst = Path(dst)
    if _exists(dst) and not force:
        _refuse_existing(dst)
    ensure_parent(dst)
    recover_interrupted(dst.parent)
    tmp = _sibling(dst, "tmp")
    try:
        tmp.mkdir()  # default permissions (umask), unlike tempfile.mkdtemp's 0700
    except OSError as exc:
        raise _write_error(dst, exc) from None
    try:
        yield tmp
        try:
            _fsync_tree(tmp)
        except OSError as exc:
            raise _write_error(dst, exc) from None
        _move_into_place(tmp, dst, force)
    except BaseException:  # including KeyboardInterrupt: never leave a half-built folder behind
        _remove(tmp)
        raise


def _move_into_place(tmp: Path, dst: Path, force: bool) -> None:
    if not _exists(dst):
        _rename(tmp, dst)
        _fsync(dst.parent, directory=True)
        return
    if not force:  # appeared while we were building
        _refuse_existing(dst)
    new = _sibling(dst, "new")
    _rename(tmp, new)  # from here on a killed run leaves a recognisably complete copy
    try:
        old = _sibling(dst, "old")
        _rename(dst, old)
        try:
            _rename(new, dst)
        except BaseException:
            os.rename(old, dst)  # put the previous output back
            raise
    except BaseException:
        _remove(new)
        raise
    _fsync(dst.parent, directory=True)
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
        _fsync(tmp)  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
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

    return atomic_write_file(path, write, overwrite=overwrite)
