"""Model id or path → a ready model folder and its parts.

"showlab/show-o" (a Hub id) is downloaded with huggingface_hub into its cache and converted once
into showo-mlx's cache (``$SHOWO_MLX_CACHE`` or ``~/.cache/showo-mlx``); a folder in the official
layout is converted the same way; an already converted folder is used as is. Loading reads the
config's quantization block and never guesses from shapes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from .config import MagvitConfig, ShowoConfig, read_json
from .convert import (
    DTYPES,
    FORMAT_VERSION,
    QuantizeSpec,
    apply_quantization_block,
    check_dtype,
    convert,
    is_converted,
    quantize_transformer,
)
from .errors import CheckpointError, ShowoConfigError, ShowoError
from .hub import looks_like_repo_id
from .model import ShowoTransformer

DEFAULT_MODEL = "showlab/show-o"


def cache_root() -> Path:
    return Path(os.environ.get("SHOWO_MLX_CACHE", Path.home() / ".cache" / "showo-mlx"))


def resolve_model(model: str | Path, log: Callable[[str], None] = print) -> Path:
    """A converted model folder for `model` (converting once into the cache when needed)."""
    path = Path(model).expanduser()
    if path.is_dir() and is_converted(path):
        return path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ShowoConfigError(f"{path} has no config.json; pass a Show-o model folder or a Hub id")
        target = cache_root() / "converted" / f"local--{path.resolve().name}"
    elif looks_like_repo_id(str(model)):
        target = cache_root() / "converted" / str(model).replace("/", "--")
    else:
        raise ShowoError(f"model {model} is neither a folder nor a Hub id (owner/name); check the name")
    if is_converted(target):
        return target
    log(f"converting {model} once into {target} (MLX format; later runs reuse it)")
    convert(model, target, force=True, log=log)
    return target


def read_model_config(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    config = read_json(folder / "config.json")
    if config.get("model_type") != "showo":
        raise ShowoConfigError(f"{folder} is not a converted showo-mlx model; run `showo convert` first")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ShowoConfigError(
            f"{folder} was written by a newer showo-mlx (format {config['format_version']}); upgrade showo-mlx"
        )
    return config


def _load_safetensors(folder: Path, files: list[str]) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{path} is missing; re-run `showo convert`")
        try:
            weights.update(mx.load(str(path)))
        except Exception as e:
            raise CheckpointError(f"{path} cannot be read ({e}); re-run `showo convert`") from None
    return weights


def load_transformer(
    folder: Path,
    config: dict[str, Any] | None = None,
    *,
    dtype: str | None = None,
    quantize: QuantizeSpec | None = None,
) -> ShowoTransformer:
    """Build the transformer from a converted folder; optionally cast or quantize at load time."""
    folder = Path(folder)
    config = config or read_model_config(folder)
    cfg = ShowoConfig.from_dict(config["showo"])
    model = ShowoTransformer(cfg)
    weights = _load_safetensors(folder, config.get("files", {}).get("transformer", ["model.safetensors"]))
    if cfg.w_clip_vit:  # the CLIP projector is part of the transformer's weights
        from .vision import attach_projector, projector_shape_of

        attach_projector(model, projector_shape_of(config, weights))
    block = config.get("quantization")
    if block:
        if quantize is not None:
            raise ShowoError(f"{folder} is already quantized ({block['bits']} bits); drop --quantize")
        apply_quantization_block(model, block, weights)
    if dtype is not None:
        target = check_dtype(dtype)
        weights = {k: (v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{folder}: weights do not match the config ({str(e).splitlines()[0]}); re-convert") from None
    if quantize is not None:
        quantize_transformer(model, quantize.validate())
    model.eval()
    mx.eval(model.parameters())
    return model


def load_magvit(folder: Path, config: dict[str, Any] | None = None, *, dtype: str | None = None, with_encoder: bool = True):
    """The MAGVIT-v2 tokenizer of a converted folder; decoder-only when `with_encoder` is False."""
    from .magvit import MagvitV2, load_magvit_weights

    folder = Path(folder)
    config = config or read_model_config(folder)
    if "magvit" not in config:
        raise ShowoConfigError(
            f"{folder} was converted without MAGVIT-v2 (--no-vq): it only answers questions (ask, caption); "
            "re-convert without --no-vq to work with images"
        )
    vq_cfg = MagvitConfig.from_dict(config["magvit"])
    dtype = dtype or config.get("magvit_dtype", "float32")
    weights = _load_safetensors(folder, [config.get("files", {}).get("magvit", "magvit.safetensors")])
    vq = MagvitV2(vq_cfg, with_encoder=with_encoder)
    load_magvit_weights(vq, weights, DTYPES[dtype])  # skips encoder tensors when decoder-only
    vq.eval()
    return vq
