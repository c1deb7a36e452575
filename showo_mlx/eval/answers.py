"""The answer log that makes a benchmark run resumable.

One JSON object per line, appended and flushed to disk (fsync) as soon as each answer exists, so a
run killed at any moment loses at most the answer being computed. Reopening reads every complete
line; a last line cut off by the kill (no newline, or not valid JSON) is dropped from the file
before anything new is appended, so it can never fuse with the next record. A damaged line
elsewhere is refused: that file was not written by this log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from . import EvalError


class AnswerLog:
    def __init__(self, path: str | Path, log: Callable[[str], None] = lambda m: None):
        self.path = Path(path)
        self.log = log
        self._file = None

    def load(self) -> dict[str, dict]:
        """Records by id (call before appending); repairs a torn last line."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # everything before the last newline is whole lines
        records: dict[str, dict] = {}
        for n, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
            if raw.strip():
                record = _record(raw)
                if record is None:
                    raise EvalError(f"{self.path} line {n} is damaged; delete the file (or pass --force) to start over")
                records[str(record["id"])] = record
        tail = data[end:]
        if tail.strip():
            record = _record(tail)
            if record is not None:  # the kill came between the record and its newline
                records[str(record["id"])] = record
                with open(self.path, "ab") as f:
                    f.write(b"\n")
            else:
                self.log(f"note: dropped the incomplete last line of {self.path} (the previous run was interrupted)")
                with open(self.path, "r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
        return records

    def append(self, record: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "AnswerLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "id" in record else None
