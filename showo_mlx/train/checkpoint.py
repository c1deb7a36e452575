"""Training checkpoints: written atomically, the last `keep` kept, checked before resuming.

    RUN/checkpoints/step-00000200/
        trainable.safetensors   the trained parameters (all of them, or only the LoRA adapters), fp32
        optimizer.safetensors   the optimizer state tree (moments, step counters, learning rates)
        state.json              step, data positions, seed, fingerprints, config, last losses

A checkpoint folder is built under a hidden temporary name and renamed into place
(fsutil.atomic_output_dir), so a crash leaves either the complete folder or none; older folders are
deleted only after the new one exists.

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
from ..errors import CheckpointError, TrainingConfigError
from ..fsutil import atomic_output_dir

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
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run: Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1][1] if found else None


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
    dst = checkpoint_dir(run) / f"step-{step:08d}"
    with atomic_output_dir(dst, force=True) as tmp:
        mx.save_safetensors(str(tmp / "trainable.safetensors"), _flat_arrays(trainable))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), _flat_arrays(optimizer_state))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    for _, old in list_checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dst


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
