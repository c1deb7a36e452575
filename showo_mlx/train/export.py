"""Write a trained transformer as a normal converted model folder.

The new folder is the base folder with the transformer weights replaced: config.json (its `files`
and `quantization` entries updated, plus a note of where the weights came from), the weights via
convert.save_sharded, and every other file (MAGVIT weights, tokenizer) copied unchanged. Built under
a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..fsutil import atomic_output_dir, check_output_folder


def check_model_output(out: Path, *, force: bool, inputs) -> Path:
    """The output guard for model folders (fsutil.check_output_folder): --force replaces only a
    previous model folder (config.json with model_type "showo") or an empty one."""
    from ..convert import is_converted

    return check_output_folder(out, force=force, inputs=inputs, is_previous_output=is_converted, command="`showo convert`, `showo fuse` or `showo train` (a model folder)")


def write_model_folder(
    base_folder: Path,
    base_config: dict[str, Any],
    weights: dict[str, mx.array],
    out: Path,
    *,
    quantization: dict[str, Any] | None,
    note: dict[str, Any],
    force: bool = False,
) -> Path:
    from ..convert import save_sharded

    replaced = set(base_config.get("files", {}).get("transformer", ["model.safetensors"]))
    replaced |= {"model.safetensors.index.json", "config.json"}
    check_model_output(out, force=force, inputs=(base_folder,))
    with atomic_output_dir(out, force=force) as tmp:
        for item in Path(base_folder).iterdir():
            if item.name in replaced or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        files = save_sharded(tmp, weights)
        config = dict(base_config)
        config["files"] = {**base_config.get("files", {}), "transformer": files}
        config.pop("quantization", None)
        if quantization:
            config["quantization"] = quantization
        config["trained"] = note
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(out)
