"""A Hugging Face Hub cache laid out by hand, as huggingface_hub stores downloaded snapshots, so
tests can load "owner/name" ids with HF_HUB_OFFLINE=1 and no network."""

from __future__ import annotations

import shutil
from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(hub: Path, repo_id: str, files: dict[str, Path], commit: str = REVISION, main: bool = True) -> Path:
    """Copy `files` (name → source) into HUB/models--owner--name/snapshots/COMMIT; with `main`,
    refs/main points at that commit. Returns the snapshot folder."""
    root = hub / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "refs").mkdir(exist_ok=True)
    if main:
        (root / "refs" / "main").write_text(commit)
    for name, src in files.items():
        shutil.copy(src, snap / name)
    return snap
