"""LoRA on the Show-o transformer with mlx-lm's `LoRALinear`, adapters on disk, and fusing.

`apply_lora` wraps the chosen Linear layers (default: every projection of every block) in
`mlx_lm.tuner.lora.LoRALinear`: ``y = W·x + b + scale · (x·A)·B`` with A random, B zero, so the
wrapped model starts exactly equal to the base. On a quantized base (`nn.QuantizedLinear`) this is
QLoRA: the quantized weights stay frozen and only A, B (float32) train.

Adapters folder (mlx-lm's file names):
    adapters.safetensors   lora_a / lora_b of every wrapped layer
    adapter_config.json    rank, scale, dropout, keys, layers, and the base it was trained on
                           (weights fingerprint, quantization applied at load)

`fuse` folds ``scale · Bᵀ·Aᵀ`` into each weight and writes a normal converted model folder.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .. import __version__
from ..checkpoint_io import check_safetensors
from ..errors import CheckpointError, TrainingConfigError
from ..fsutil import atomic_output_dir, read_regular_file

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LORA_LEAVES = ("lora_a", "lora_b")


def _lora_class():
    from mlx_lm.tuner.lora import LoRALinear

    return LoRALinear


def _matches(path: str, local: str, keys: list[str]) -> bool:
    # A key names a module inside a block ("self_attn.q_proj", wildcards allowed) or a full path
    # ("lm_head").
    return any(fnmatch.fnmatchcase(local, k) or fnmatch.fnmatchcase(path, k) for k in keys)


def apply_lora(model: nn.Module, *, rank: int, scale: float, dropout: float, keys: list[str], num_layers: int = -1) -> int:
    """Wrap matching Linear/QuantizedLinear layers in LoRALinear; returns how many were wrapped."""
    LoRALinear = _lora_class()
    if rank < 1:
        raise TrainingConfigError(f"lora_rank must be at least 1, got {rank}")
    n_blocks = len(model.layers)
    first = 0 if num_layers < 0 else max(0, n_blocks - num_layers)
    replaced = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            continue
        parts = path.split(".")
        if parts[0] == "layers":
            if int(parts[1]) < first:
                continue
            local = ".".join(parts[2:])
        else:
            local = path
        if _matches(path, local, keys):
            replaced.append((path, LoRALinear.from_base(module, r=rank, scale=scale, dropout=dropout)))
    if not replaced:
        raise TrainingConfigError(f"lora_keys {keys} match no Linear layer of the model")
    model.update_modules(tree_unflatten(replaced))
    return len(replaced)


def freeze_for_lora(model: nn.Module) -> None:
    """Only the adapter matrices train."""
    model.freeze()
    LoRALinear = _lora_class()
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.unfreeze(keys=list(LORA_LEAVES), recurse=False)


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in LORA_LEAVES}


def adapter_config(*, rank: int, scale: float, dropout: float, keys: list[str], num_layers: int, base: dict[str, Any]) -> dict[str, Any]:
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": list(keys)},
        "base": base,
        "showo_mlx_version": __version__,
    }


def save_adapters(folder: Path, model: nn.Module, config: dict[str, Any], force: bool = True) -> Path:
    with atomic_output_dir(folder, force=force) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), adapter_weights(model), metadata={"format": "mlx"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return Path(folder)


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    try:  # a regular file of sane size: never a FIFO that blocks or a link to /dev/zero
        config = json.loads(read_regular_file(path, limit=1 << 20, error=TrainingConfigError))
    except FileNotFoundError:
        raise TrainingConfigError(f"{path} not found; pass the adapters folder written by `showo train --lora`") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise TrainingConfigError(f"{path} is not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None
    if not isinstance(config, dict) or config.get("fine_tune_type") != "lora":
        raise TrainingConfigError(f"{path} does not describe LoRA adapters")
    return config


def load_adapters(model: nn.Module, folder: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Wrap `model` as the adapters' config says and load their weights (strict on names/shapes)."""
    config = config or read_adapter_config(folder)
    lp = config["lora_parameters"]
    apply_lora(model, rank=lp["rank"], scale=lp["scale"], dropout=lp["dropout"], keys=lp["keys"], num_layers=config["num_layers"])
    try:
        check_safetensors(Path(folder) / ADAPTER_WEIGHTS)  # mx.load accepts overlapping offsets
        weights = mx.load(str(Path(folder) / ADAPTER_WEIGHTS))
    except (OSError, ValueError, RuntimeError, CheckpointError) as e:
        raise TrainingConfigError(f"{folder}/{ADAPTER_WEIGHTS} cannot be read ({e})") from None
    expected = adapter_weights(model)
    if set(weights) != set(expected):
        missing = sorted(set(expected) ^ set(weights))[:2]
        raise TrainingConfigError(f"adapters in {folder} do not fit this model ({missing}); use the base they were trained on")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise TrainingConfigError(f"adapter {k} has shape {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}")
    model.load_weights(list(weights.items()), strict=False)
    return config


def fuse_layers(model: nn.Module, dequantize: bool = False) -> None:
    """Replace every LoRALinear by its fused Linear (re-quantized if the base layer was quantized,
    unless `dequantize`)."""
    LoRALinear = _lora_class()
    fused = [(p, m.fuse(dequantize=dequantize)) for p, m in model.named_modules() if isinstance(m, LoRALinear)]
    if fused:
        model.update_modules(tree_unflatten(fused))


# -- showo fuse ------------------------------------------------------------------------------------
def fuse(
    model: str,
    adapters: str | Path,
    out: str | Path,
    *,
    dequantize: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Merge LoRA adapters into the base model and write a converted folder loadable by
    `loading.load_transformer` (config.json + model.safetensors + MAGVIT + tokenizer)."""
    from mlx_lm.utils import dequantize_model

    from ..convert import QuantizeSpec, quantize_transformer
    from ..loading import load_transformer, read_model_config, resolve_model
    from .checkpoint import model_fingerprint
    from .export import check_model_output, write_model_folder

    folder = resolve_model(model, log=log)
    check_model_output(out, force=force, inputs=(model, folder, adapters))
    config = read_model_config(folder)
    acfg = read_adapter_config(Path(adapters))
    base = load_transformer(folder, config)
    base_info = acfg.get("base", {})
    if base_info.get("fingerprint") and base_info["fingerprint"] != model_fingerprint(base):
        raise TrainingConfigError(f"the adapters in {adapters} were trained on another base model than {model}; fuse them into that one")
    block = config.get("quantization")
    q = base_info.get("quantize_at_load")
    if q:
        block = quantize_transformer(base, QuantizeSpec(bits=q["bits"], group_size=q["group_size"]).validate())
    load_adapters(base, Path(adapters), acfg)
    fuse_layers(base, dequantize=dequantize)
    if dequantize and block:
        dequantize_model(base)
        block = None
    note = {"fused_adapters": str(adapters), "lora_parameters": acfg["lora_parameters"], "showo_mlx_version": __version__}
    out = write_model_folder(folder, config, dict(tree_flatten(base.parameters())), Path(out), quantization=block, note=note, force=force)
    log(f"fused {adapters} into {out}")
    return out
