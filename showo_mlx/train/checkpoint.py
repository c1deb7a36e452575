"""Training checkpoints: written atomically, the last `keep` kept, checked before resuming.

    RUN/checkpoints/step-00000200/
        trainable.safetensors   the trained parameters (all of them, or only the LoRA adapters), fp32
        optimizer.safetensors   the optimizer state tree (moments, step counters, learning rates)
        state.json              step, data positions, seed, fingerprints, config, last losses

A checkpoint folder is built under a hidden temporary name and renamed into place
(fsutil.atomic_output_dir), so a crash leaves either the complete folder or none; older folders are
deleted only after the new one exists, and only those of the same run (state.json's ``run_id``).
Weights or optimizer moments with a NaN or Inf are never written (TrainingDivergedError): the good
checkpoints stay. A resume takes the newest checkpoint only if it belongs to the folder's run.

Randomness needs no saved generator state: every draw of the data pipeline is seeded by (seed,
task, stream position, purpose) and LoRA dropout by (seed, step), so the step restores all of it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..checkpoint_io import check_safetensors
from ..errors import CheckpointError, TrainingConfigError, TrainingDivergedError
from ..fsutil import atomic_output_dir, recover_interrupted
from .runfolder import read_run_id

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")
SAMPLE = 4096  # elements per tensor that enter the fingerprint


def model_fingerprint(model: nn.Module) -> str:
    """Identity of a model's weights: names, shapes, dtypes and the exact bytes of a fixed strided
    sample of every tensor. Cheap (no full pass over 1.3B weights) and independent of reduction
    order, so it matches across runs and machines for the same weights."""
    h = hashlib.sha256()
    for name, p in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        flat = p.reshape(-1)
        stride = max(1, flat.size // SAMPLE)
        sample = flat[::stride][:SAMPLE]
        if sample.dtype in (mx.bfloat16, mx.float16):
            sample = sample.view(mx.uint16)
        h.update(np.array(sample).tobytes())
    return h.hexdigest()[:24]


def checkpoint_dir(run: Path) -> Path:
    return Path(run) / CHECKPOINTS


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    folder = checkpoint_dir(run)
    if not folder.is_dir():
        return []
    recover_interrupted(folder)  # a kill between the two renames of a checkpoint's replace left it aside
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run: Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1][1] if found else None


def checkpoint_run_id(folder: Path) -> str | None:
    """The run that wrote a checkpoint (None: unreadable, or written before run ids existed)."""
    try:
        state = json.loads((Path(folder) / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    run_id = state.get("run_id") if isinstance(state, dict) else None
    return run_id if isinstance(run_id, str) else None


def resolve_resume(run: Path) -> tuple[Path, str | None]:
    """The checkpoint `--resume` continues from, and the run id it continues.

    The folder's run is the one named in RUN/run.json. Its newest checkpoint is taken only if the
    folder's newest checkpoint is one of its own: a newer checkpoint of another run means two runs
    wrote into one folder, and continuing either silently would mix them, so that is refused naming
    the run found. Folders from before run ids (no run.json, checkpoints without ids) resume from the
    newest checkpoint as before."""
    found = list_checkpoints(run)
    if not found:
        raise TrainingConfigError(f"--resume: no checkpoint in {checkpoint_dir(run)}; start without --resume")
    step, newest = found[-1]
    newest_id = checkpoint_run_id(newest)
    own = read_run_id(run)
    if own is None:  # run.json lost or a folder of an older version: the checkpoints must agree
        ids = {checkpoint_run_id(p) for _, p in found}
        if len(ids) > 1:
            names = ", ".join(sorted(str(i) for i in ids))
            raise TrainingConfigError(
                f"--resume: {checkpoint_dir(run)} holds checkpoints of several runs ({names}) and no run.json says "
                "which is this folder's; move the other runs' step-* folders away"
            )
        return newest, newest_id
    if newest_id != own:
        raise TrainingConfigError(
            f"--resume: the newest checkpoint {newest.name} in {run} belongs to run {newest_id or '(no run id)'}, not to "
            f"this folder's run {own}; move it away to resume run {own}, or start a new run elsewhere"
        )
    return newest, own


def _flat_arrays(tree: Any) -> dict[str, mx.array]:
    return {k: v for k, v in tree_flatten(tree) if isinstance(v, mx.array)}


def save_checkpoint(
    run: Path,
    step: int,
    trainable: dict,
    optimizer_state: dict,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    weights, moments = _flat_arrays(trainable), _flat_arrays(optimizer_state)
    bad = first_non_finite({**weights, **moments})
    if bad is not None:
        raise TrainingDivergedError(
            f"step {step}: {bad} holds NaN or Inf values, so no checkpoint was written; the previous checkpoints "
            "are kept (lower lr, set max_grad_norm, or check the data, then --resume)"
        )
    run_id = state.get("run_id")
    dst = checkpoint_dir(run) / f"step-{step:08d}"
    with atomic_output_dir(dst, force=True) as tmp:
        mx.save_safetensors(str(tmp / "trainable.safetensors"), weights)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), moments)
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    # Prune only this run's checkpoints: another run's are not ours to delete. Checkpoints without
    # a run id predate run ids; a folder holding them was adopted by the run resuming it.
    own = [p for _, p in list_checkpoints(run) if checkpoint_run_id(p) in (run_id, None)]
    for old in own[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def first_non_finite(arrays: dict[str, mx.array]) -> str | None:
    """The name of the first array holding a NaN or ±Inf, or None. One evaluation for all of them
    (a pass over the values, cheap next to writing them)."""
    floats = [(k, v) for k, v in arrays.items() if mx.issubdtype(v.dtype, mx.inexact)]
    if not floats:
        return None
    flags = mx.stack([mx.isfinite(v).all() for _, v in floats])
    if bool(flags.all()):
        return None
    return floats[int(mx.argmin(flags.astype(mx.int32)))][0]


def load_checkpoint(folder: Path) -> tuple[dict[str, mx.array], dict, dict[str, Any]]:
    """(trainable weights flat, optimizer state tree, state dict)."""
    try:
        state = json.loads((folder / "state.json").read_text())
        check_safetensors(folder / "trainable.safetensors"), check_safetensors(folder / "optimizer.safetensors")
        weights = mx.load(str(folder / "trainable.safetensors"))
        opt_flat = mx.load(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError, RuntimeError, CheckpointError) as e:
        raise TrainingConfigError(f"checkpoint {folder} cannot be read ({' '.join(str(e).split())[:160]}); delete it to fall back to the previous one") from None
    return weights, tree_unflatten(list(opt_flat.items())), state


def check_resume(state: dict[str, Any], expected: dict[str, Any], folder: Path) -> None:
    """Refuse a resume whose model or way of training differs from the checkpoint's."""
    for key, what in (
        ("base_fingerprint", "the base model's weights"),
        ("model_config", "the model config"),
        ("fine_tune", "full fine-tuning vs LoRA"),
        ("trainable_signature", "the set of trained parameters (LoRA layout, freezing)"),
    ):
        if state.get(key) != expected.get(key):
            raise TrainingConfigError(
                f"cannot resume from {folder}: {what} differ from this run's; use the same --model and "
                "training mode, or start a new output folder"
            )
