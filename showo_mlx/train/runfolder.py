"""The run folder of `showo train`: which run owns it, its step log, and a machine-readable status.

    RUN/run.json        {"format": "showo-train-run", "run_id", "started"}: written when a run starts
    RUN/status.json     {"status": running|completed|failed|interrupted, "step", "run_id", "message", ...}
    RUN/log.jsonl       one JSON line per step, each carrying the run id
    RUN/.lock           locked (flock) by the process that trains in the folder

A folder belongs to one run. Starting a run in a folder that already holds something is refused
unless the caller resumes (then only that folder's own run continues, see
checkpoint.resolve_resume) or forces (then the previous run's files, and nothing else, are deleted).
Without that, a second run would prune the first one's checkpoints and `--resume` would later pick
the other run's newer checkpoint as its own.

status.json is rewritten atomically (temporary file, fsync, rename) at the start ("running"), and at
the end of every run: "completed", "failed" (with the exit code: 2 bad input, 3 non-finite values,
4 a stalled or lost process) or "interrupted" (Ctrl-C, SIGTERM). Scripts should read it rather than
trust a launcher's exit code (`mlx.launch` exits 0 even when a rank fails). A "running" status whose
``pid`` no longer exists on ``host`` means the process was killed hard (kill -9, power loss).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import OutputWriteError, TrainingConfigError
from ..fsutil import atomic_write_bytes

RUN_FILE = "run.json"
STATUS_FILE = "status.json"
LOG_FILE = "log.jsonl"
LOCK_FILE = ".lock"
RUN_FORMAT = "showo-train-run"
# Everything a run writes into its folder. --force deletes these and refuses a folder holding
# anything else, so it can never delete a user's own files.
RUN_ENTRIES = ("run.json", "status.json", "log.jsonl", "train_config.json", "checkpoints", "samples", "model", "adapters", "init")
# Hidden temporaries of atomic writes next to those entries (fsutil: ".<name>.tmp-<pid>-<token>").
_TEMPORARY = re.compile(r"^\.(%s)\.(tmp|new|old)-" % "|".join(re.escape(n) for n in RUN_ENTRIES))


def new_run_id() -> str:
    """Sortable and unique enough: start time plus 24 random bits."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_run_id(run: Path) -> str | None:
    info = _read_json(Path(run) / RUN_FILE)
    run_id = info.get("run_id") if isinstance(info, dict) else None
    return run_id if isinstance(run_id, str) else None


def _ours(name: str) -> bool:
    return name in RUN_ENTRIES or name == LOCK_FILE or bool(_TEMPORARY.match(name))


def _entries(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name != LOCK_FILE)


def check_run_folder(run: Path, *, resume: bool, force: bool, built: tuple[str, ...] = ()) -> None:
    """Before anything is loaded: refuse an output that is not a folder, an existing non-empty
    folder without resume/force, and force on a folder holding files a run does not write.
    `built`: entries this run has already written during its setup (its `init` start model)."""
    run = Path(run)
    if (run.exists() or run.is_symlink()) and not run.is_dir():
        raise TrainingConfigError(f"output {run} exists and is not a folder; choose a folder for the run")
    if not run.is_dir():
        _check_creatable(run)
    if resume or not run.is_dir():
        return
    try:
        entries = [e for e in _entries(run) if e not in built]
    except OSError as e:
        raise OutputWriteError(f"cannot read output folder {run} ({e.strerror or e}); choose another output") from None
    if not entries:
        return
    if not force:
        found = f"run {read_run_id(run)}" if read_run_id(run) else "files"
        raise TrainingConfigError(
            f"{run} already holds {found}; pass --resume to continue it, --force to delete it and start over, "
            "or choose another output"
        )
    foreign = [e for e in entries if not _ours(e)]
    if foreign:
        raise TrainingConfigError(
            f"--force only replaces a training run folder, but {run} also holds {foreign[0]!r}; choose another output"
        )


def _check_creatable(run: Path) -> None:
    """The run folder can be created: its nearest existing ancestor is a writable folder. Checked
    before the model loads, so a typo'd or read-only output fails in a second, not after setup."""
    parent = run.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputWriteError(f"cannot create run folder {run}: {parent} is not a folder; choose another output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputWriteError(f"cannot create run folder {run}: {parent} is not writable; choose another output")


def start_run(run: Path, *, force: bool, built: tuple[str, ...] = ()) -> str:
    """Make `run` this run's folder: with force, delete the previous run's files (not `built`, what
    this run's setup wrote); write run.json. Returns the new run id. Call with the folder lock held
    (`locked`)."""
    run = Path(run)
    check_run_folder(run, resume=False, force=force, built=built)  # again, now under the lock
    if force:
        for name in (e for e in _entries(run) if e not in built):
            path = run / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    run_id = new_run_id()
    info = {"format": RUN_FORMAT, "run_id": run_id, "started": _now()}
    atomic_write_bytes(run / RUN_FILE, (json.dumps(info, indent=2) + "\n").encode())
    return run_id


def adopt_run(run: Path, run_id: str) -> None:
    """Write run.json for a resumed folder that has none (checkpoints of an older showo-mlx)."""
    if read_run_id(run) is None:
        info = {"format": RUN_FORMAT, "run_id": run_id, "started": _now(), "adopted": True}
        atomic_write_bytes(Path(run) / RUN_FILE, (json.dumps(info, indent=2) + "\n").encode())


@contextlib.contextmanager
def locked(run: Path) -> Iterator[None]:
    """Hold an exclusive lock on RUN/.lock: a second `showo train` on the same folder is refused
    instead of interleaving checkpoints and log lines with the first."""
    run = Path(run)
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputWriteError(f"cannot write run folder {run} ({e.strerror or e}); choose another output") from None
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock on this platform: run unlocked
            pass
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                pass  # a file system without locks (some network shares): run unlocked
            else:
                raise TrainingConfigError(
                    f"another `showo train` is running in {run}; wait for it to finish or choose another output"
                ) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


# -- status ----------------------------------------------------------------------------------------
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_status(run: Path, status: str, *, run_id: str | None, step: int, max_steps: int,
                 message: str = "", exit_code: int | None = None, **extra: Any) -> None:
    payload = {
        "status": status,
        "run_id": run_id,
        "step": step,
        "max_steps": max_steps,
        "exit_code": exit_code,
        "message": message,
        **extra,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "updated": _now(),
    }
    atomic_write_bytes(Path(run) / STATUS_FILE, (json.dumps(payload, indent=2) + "\n").encode())


def read_status(run: Path) -> dict | None:
    status = _read_json(Path(run) / STATUS_FILE)
    return status if isinstance(status, dict) else None


# -- the step log ----------------------------------------------------------------------------------
def append_log(run: Path, record: dict) -> None:
    with open(Path(run) / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(run: Path, step: int) -> int:
    """Keep the log lines of steps up to `step` (the ones after it are about to be redone) and drop
    unreadable lines: a power loss can leave a partial last line. Returns how many were unreadable.
    Rewritten atomically, so a crash here cannot lose the log either."""
    path = Path(run) / LOG_FILE
    if not path.exists():
        return 0
    keep, unreadable = [], 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError):
                unreadable += 1
                continue
            if not isinstance(row, dict):
                unreadable += 1
                continue
            if isinstance(row.get("step"), int) and row["step"] <= step:
                keep.append(raw.rstrip(b"\r\n") + b"\n")  # the line as it was written
    atomic_write_bytes(path, b"".join(keep))
    return unreadable
