"""Nothing lost (issue 16 items 1 and 4): the output guard every folder-writing command calls, and
recovery from a kill between the renames of an atomic replace.

Item 1: `--force` used to delete whatever DST was (the source checkpoint's parent, the source, the
MAGVIT folder, the current folder, the images being prepared). Every case here must be refused with
exit code 2 and one line, and every input must be byte-identical afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import REF
from showo_mlx import fsutil
from showo_mlx.cli import app
from showo_mlx.errors import OutputExistsError, UnsafeOutputError
from showo_mlx.fsutil import atomic_output_dir, atomic_write_bytes, check_output_folder, recover_interrupted
from showo_mlx.loading import resolve_model
from showo_mlx.train.export import write_model_folder

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def tree(root: Path) -> dict[str, object]:
    """Every path under `root` with its bytes (or link target): equal trees mean nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


@pytest.fixture()
def ws(tmp_path, monkeypatch):
    """An official checkpoint with a sibling, MAGVIT, a tokenizer, pictures, a home and a cwd."""
    models = tmp_path / "models"
    (models / "src").mkdir(parents=True)
    for name in ("config.json", "pytorch_model.safetensors"):
        shutil.copy(REF / "showo" / name, models / "src" / name)
    (models / "other-checkpoint.txt").write_text("a sibling of SRC that must survive")
    shutil.copytree(REF / "magvitv2", tmp_path / "vq")
    shutil.copytree(REF / "tokenizer", tmp_path / "tok")
    (tmp_path / "pics").mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / "pics" / f"p{i}.png")
        (tmp_path / "pics" / f"p{i}.txt").write_text(f"picture {i}")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".profile").write_text("export KEEP=1")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("the user's notes")
    (tmp_path / "userdata").mkdir()
    (tmp_path / "userdata" / "thesis.tex").write_text("years of work")
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


def refused(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    return lines[0]


CONVERT = ["convert"]
FIXTURE = ["--vq", "{ws}/vq", "--tokenizer", "{ws}/tok"]
CASES = {
    # id: (arguments, words the one-line error must contain)
    "dst-is-parent-of-src": ([*CONVERT, "{ws}/models/src", "{ws}/models", "--force", *FIXTURE], "contains the input {ws}/models/src"),
    "dst-is-src": ([*CONVERT, "{ws}/models/src", "{ws}/models/src", "--force", *FIXTURE], "is the input {ws}/models/src"),
    "dst-is-magvit": ([*CONVERT, "{ws}/models/src", "{ws}/vq", "--force", *FIXTURE], "is the input {ws}/vq"),
    "dst-is-tokenizer": ([*CONVERT, "{ws}/models/src", "{ws}/tok", "--force", *FIXTURE], "is the input {ws}/tok"),
    "dst-inside-src": ([*CONVERT, "{ws}/models/src", "{ws}/models/src/out", *FIXTURE], "is inside the input"),
    "dst-is-cwd-dot": ([*CONVERT, "{ws}/models/src", ".", "--force", *FIXTURE], "is the current folder"),
    "dst-is-cwd-absolute": ([*CONVERT, "{ws}/models/src", "{ws}/work", "--force", *FIXTURE], "is the current folder"),
    "dst-holds-cwd": ([*CONVERT, "{ws}/models/src", "..", "--force", *FIXTURE], "contains the current folder"),
    "dst-is-home": ([*CONVERT, "{ws}/models/src", "~", "--force", *FIXTURE], "is your home folder"),
    "dst-is-user-folder": ([*CONVERT, "{ws}/models/src", "{ws}/userdata", "--force", *FIXTURE], "only replaces an empty folder or one written by `showo convert`"),
    "dst-is-a-file": ([*CONVERT, "{ws}/models/src", "{ws}/a-file", "--force", *FIXTURE], "it is a file"),
    "prepare-pics-into-pics": (["prepare", "{ws}/pics", "{ws}/pics", "--force", "--model", "{model}"], "is the input {ws}/pics"),
    "prepare-into-user-folder": (["prepare", "{ws}/pics", "{ws}/userdata", "--force", "--model", "{model}"], "only replaces an empty folder or one written by `showo prepare`"),
    "fuse-into-the-base-model": (["fuse", "{ws}/base", "{ws}/adapters", "{ws}/base", "--force"], "is the input {ws}/base"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_force_never_deletes_inputs_or_protected_folders(ws, converted, case):
    shutil.copytree(converted, ws / "base")  # a converted model: the base of `fuse`
    (ws / "adapters").mkdir()
    args, needle = CASES[case]
    fill = {"ws": ws, "model": converted}
    before = tree(ws)
    message = refused([a.format(**fill) for a in args])
    assert needle.format(**fill) in message, message
    assert tree(ws) == before  # nothing touched, nothing created


def test_training_export_refuses_to_overwrite_its_base(converted, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(converted, base)
    before = tree(base)
    config = json.loads((base / "config.json").read_text())
    with pytest.raises(UnsafeOutputError, match="is the input"):
        write_model_folder(base, config, {}, base, quantization=None, note={}, force=True)
    assert tree(base) == before


def test_force_replaces_an_empty_folder_or_a_previous_output(tmp_path):
    marker = lambda p: (p / "mark").exists()  # noqa: E731
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_folder(empty, force=True, is_previous_output=marker) == empty
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "mark").write_text("")
    assert check_output_folder(previous, force=True, is_previous_output=marker) == previous
    with pytest.raises(OutputExistsError, match="--force"):
        check_output_folder(previous, force=False, is_previous_output=marker)
    with pytest.raises(UnsafeOutputError, match="is the file system root"):  # never tried through a
        check_output_folder("/", force=True, is_previous_output=lambda p: True)  # command, to be safe
    (tmp_path / "link").symlink_to(previous)
    with pytest.raises(UnsafeOutputError, match="symbolic link"):
        check_output_folder(tmp_path / "link", force=True, is_previous_output=marker)


def test_prepare_force_accepts_its_own_previous_output(ws, converted):
    """The guard lets `prepare --force` replace a folder with prepare's index.json; here the run then
    fails later (no readable picture), so the previous output must still be intact."""
    out = ws / "prepared"
    out.mkdir()
    (out / "index.json").write_text(json.dumps({"format": "showo-prepared", "version": 1}))
    (ws / "no-pics").mkdir()
    (ws / "no-pics" / "broken.png").write_bytes(b"not a png")  # skipped as unreadable: 0 samples
    (ws / "no-pics" / "broken.txt").write_text("a caption")
    before = tree(out)
    result = runner.invoke(app, ["prepare", str(ws / "no-pics"), str(out), "--force", "--model", str(converted)])
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1].startswith("error: no usable samples")
    assert tree(out) == before


# ------------------------------------------------------------------------------------------------
# Item 4: a kill between the two renames of a replace
# ------------------------------------------------------------------------------------------------

KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from showo_mlx import fsutil

dst = Path(sys.argv[1])
real_rename = os.rename

def rename(src, target):
    real_rename(src, target)
    if Path(target).name.startswith(f".{dst.name}.old-"):  # the old folder is aside, the new not yet in
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = rename
with fsutil.atomic_output_dir(dst, force=True) as tmp:
    (tmp / "weights.bin").write_bytes(b"new weights")
"""


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_kill_between_the_renames_is_completed_by_the_next_run(tmp_path):
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "weights.bin").write_bytes(b"old weights")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(dst)], env=env, timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not dst.exists() and any(n.startswith(".model.old-") for n in hidden(tmp_path))  # the window
    with atomic_output_dir(tmp_path / "next-output"):  # the next run writing anything here
        pass
    assert (dst / "weights.bin").read_bytes() == b"new weights"  # the complete new copy was put in place
    assert hidden(tmp_path) == []


def test_kill_leaving_only_the_old_copy_restores_it_for_the_next_model_lookup(tmp_path, converted):
    # What the issue found on disk: the destination absent, the old copy and the half-built new one
    # hidden beside it.
    pid = dead_pid()
    shutil.copytree(converted, tmp_path / f".model.old-{pid}-{fsutil._HOST}-0123abcd")
    (tmp_path / f".model.tmp-{pid}-89abcdef").mkdir()  # a half-built copy (older name format)
    (tmp_path / f".model.tmp-{pid}-89abcdef" / "model.safetensors").write_bytes(b"partial")
    folder = resolve_model(tmp_path / "model", log=lambda m: pytest.fail(f"converted again: {m}"))
    assert folder == tmp_path / "model" and tree(folder) == tree(converted)
    assert hidden(tmp_path) == []


def test_cleanup_removes_dead_processes_temporaries_and_keeps_live_ones(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = dead_pid()
        (tmp_path / "ckpt").mkdir()
        names = {
            "dead-tmp": f".step-1.tmp-{dead}-{fsutil._HOST}-00000001",
            "dead-old-of-existing": f".ckpt.old-{dead}-{fsutil._HOST}-00000002",
            "dead-file": f".x.png.tmp-{dead}-{fsutil._HOST}-00000003.png",
            "live-child": f".step-2.tmp-{live.pid}-{fsutil._HOST}-00000004",
            "this-process": f".step-3.tmp-{os.getpid()}-{fsutil._HOST}-00000005",
            "other-host": f".step-4.tmp-{dead}-fffff0-00000006",
            "user-dotfile": ".step-5.tmp-notes",
        }
        for key, name in names.items():
            if key == "dead-file":
                (tmp_path / name).write_bytes(b"half a png")
            else:
                (tmp_path / name).mkdir()
                (tmp_path / name / "data").write_bytes(b"x" * 100)
        notes = recover_interrupted(tmp_path)
        left = set(hidden(tmp_path))
        assert left == {names[k] for k in ("live-child", "this-process", "other-host", "user-dotfile")}
        assert (tmp_path / "ckpt").is_dir() and len(notes) == 3
    finally:
        live.kill()
        live.wait()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_outputs_are_fsynced_before_they_are_published(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", f"{Path(src).name}>{Path(dst).name}"))
        real_rename(src, dst)

    def replace(src, dst):
        events.append(("rename", f"{Path(src).name}>{Path(dst).name}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    dst = tmp_path / "out"
    dst.mkdir()
    with atomic_output_dir(dst, force=True) as tmp:
        (tmp / "a.safetensors").write_bytes(b"a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_bytes(b"b")
    first_rename = next(i for i, e in enumerate(events) if e[0] == "rename")
    synced_before = {name for kind, name in events[:first_rename] if kind == "fsync"}
    assert {"a.safetensors", "b.json", "sub", tmp.name} <= synced_before
    last_rename = max(i for i, e in enumerate(events) if e[0] == "rename" and e[1].endswith(">out"))
    assert ("fsync", tmp_path.name) in events[last_rename:]  # the parent folder records the new name

    events.clear()
    atomic_write_bytes(tmp_path / "image.png", b"png")
    kinds = [(kind, name.split(">")[-1] if kind == "rename" else name) for kind, name in events]
    assert kinds[-1] == ("fsync", tmp_path.name) and kinds[-2] == ("rename", "image.png")
    assert kinds[-3][0] == "fsync" and kinds[-3][1].startswith(".image.png.tmp-")
