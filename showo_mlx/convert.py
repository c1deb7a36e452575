"""Official PyTorch checkpoints → one self-contained showo-mlx model folder.

    DST/config.json          {"model_type": "showo", "showo": {...}, "magvit": {...}, "dtype": ...,
                              "quantization": {"group_size": g, "bits": b, <path>: {...}}}  (mlx-lm format)
    DST/model.safetensors    the transformer (model-0000i-of-0000n.safetensors + index above 5 GB)
    DST/magvit.safetensors   MAGVIT-v2 (always float: 16 or 32 bit; absent with --no-vq)
    DST/vision.safetensors   the CLIP tower of w_clip_vit checkpoints (float or quantized)
    DST/tokenizer files      phi-1_5's tokenizer (from SRC, --tokenizer, or the Hub)

Everything is written into a temporary sibling folder and renamed into place at the end, so a
failure never leaves a half-written model and an existing DST is only replaced with force=True.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import __version__
from .checkpoint_io import find_weight_files, iter_checkpoint
from .config import MagvitConfig, ShowoConfig, read_json
from .errors import CheckpointError, ShowoError
from .fsutil import atomic_output_dir
from .magvit import sanitize_magvit_weights
from .model import ShowoTransformer
from .prompting import TOKENIZER_FILES
from .hub import resolve_source

FORMAT_VERSION = 1
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
DEFAULT_VQ = "showlab/magvitv2"
DEFAULT_TOKENIZER = "microsoft/phi-1_5"
SHARD_BYTES = 5 << 30  # shard the transformer above ~5 GB, as mlx-lm does


@dataclass
class QuantizeSpec:
    """Affine quantization of the transformer's Linear layers (mlx-lm format).

    head_bits quantizes the embedding and lm_head too (None: they stay in float). They hold 17% of
    the weights and are the most sensitive to rounding, hence a separate, usually higher, width."""

    bits: int = 4
    group_size: int = 64
    head_bits: int | None = None

    def validate(self) -> "QuantizeSpec":
        for name, b in (("bits", self.bits), ("head bits", self.head_bits)):
            if b is not None and b not in Q_BITS:
                raise ShowoError(f"unsupported quantization {name} {b}; choose one of {list(Q_BITS)}")
        if self.group_size not in Q_GROUP_SIZES:
            raise ShowoError(
                f"unsupported quantization group size {self.group_size}; choose one of {list(Q_GROUP_SIZES)}"
            )
        return self


def check_dtype(dtype: str) -> mx.Dtype:
    if dtype not in DTYPES:
        raise ShowoError(f"unsupported dtype {dtype!r}; choose one of {list(DTYPES)}")
    return DTYPES[dtype]


# -- key mapping ---------------------------------------------------------------------------------
def sanitize_showo_weights(weights: dict[str, Any]) -> dict[str, Any]:
    """Official `Showo` keys → ours: `showo.model.X` → `X`, `showo.lm_head.*` → `lm_head.*`, the CLIP
    projector of w_clip_vit checkpoints `mm_projector.{0,2}.*` → `mm_projector.{fc1,fc2}.*`."""
    from .vision import projector_keys, sanitize_projector_weights

    out = sanitize_projector_weights(projector_keys(weights))
    for key, value in weights.items():
        if key.startswith("mm_projector."):
            continue
        if key.startswith("showo.model."):
            out[key[len("showo.model."):]] = value
        elif key.startswith("showo."):
            out[key[len("showo."):]] = value
        else:
            raise CheckpointError(f"unexpected tensor {key!r} in the Show-o checkpoint; is SRC a Show-o model?")
    return out


def check_complete(model: nn.Module, weights: dict[str, Any], what: str) -> None:
    """Refuse missing or unexpected tensors and wrong shapes by name, before anything is written."""
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{what}: {detail} (and {max(len(missing), len(extra)) - 1} more?); the checkpoint does not match its config")
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{what}: {k} has shape {tuple(weights[k].shape)}, config implies {tuple(v.shape)}; "
                "the checkpoint does not match its config"
            )


# -- quantization --------------------------------------------------------------------------------
def quantize_transformer(model: ShowoTransformer, spec: QuantizeSpec) -> dict[str, Any]:
    """Quantize in place; return the config block in mlx-lm's format (defaults + per-path overrides)."""
    block: dict[str, Any] = {"group_size": spec.group_size, "bits": spec.bits, "mode": "affine"}
    heads = ("embed_tokens", "lm_head")

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % spec.group_size:
            return False
        if path in heads:
            if spec.head_bits is None:
                return False
            block[path] = {"group_size": spec.group_size, "bits": spec.head_bits, "mode": "affine"}
            return block[path]
        return isinstance(module, nn.Linear)

    nn.quantize(model, group_size=spec.group_size, bits=spec.bits, class_predicate=predicate)
    return block


def apply_quantization_block(model: nn.Module, block: dict[str, Any], weights: dict[str, Any]) -> None:
    """Rebuild quantized layers from the config block: a layer is quantized iff its scales are in
    the weights; per-path entries override the default width (never guessed from shapes)."""

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        override = block.get(path)
        return override if isinstance(override, dict) else True

    nn.quantize(
        model,
        group_size=block["group_size"],
        bits=block["bits"],
        mode=block.get("mode", "affine"),
        class_predicate=predicate,
    )


# -- writing -------------------------------------------------------------------------------------
def make_shards(weights: dict[str, mx.array], max_bytes: int) -> list[dict[str, mx.array]]:
    """Consecutive groups of tensors of at most `max_bytes` (a larger tensor gets its own shard)."""
    shards: list[dict[str, mx.array]] = []
    size = 0
    for key, value in weights.items():
        if not shards or size + value.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    return shards


def save_sharded(folder: Path, weights: dict[str, mx.array], stem: str = "model") -> list[str]:
    shards = make_shards(weights, SHARD_BYTES)
    if len(shards) == 1:
        mx.save_safetensors(str(folder / f"{stem}.safetensors"), shards[0], metadata={"format": "mlx"})
        return [f"{stem}.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
        names.append(name)
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return names


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        raise ShowoError(f"no tokenizer files in {src}; pass --tokenizer with phi-1_5's tokenizer folder")
    return copied


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()


def load_showo_source(src: Path) -> tuple[ShowoConfig, dict[str, mx.array]]:
    cfg = ShowoConfig.from_hub_dict(read_json(src / "config.json"))
    # One tensor at a time: the 5.8 GB float32 checkpoint is never held twice. The CLIP projector is
    # read only for w_clip_vit checkpoints (their transformer is built with it).
    keep = (lambda k: True) if cfg.w_clip_vit else (lambda k: not k.startswith("mm_projector."))
    weights = {k: mx.array(v) for k, v in iter_checkpoint(src, select=keep)}
    weights = sanitize_showo_weights(weights)
    if cfg.w_clip_vit and not any(k.startswith("mm_projector.") for k in weights):
        raise CheckpointError(f"{src} says w_clip_vit but holds no mm_projector weights; re-download the checkpoint")
    return cfg, weights


def load_magvit_source(vq: Path) -> tuple[MagvitConfig, dict[str, mx.array]]:
    cfg = MagvitConfig.from_hub_dict(read_json(vq / "config.json"))
    raw = sanitize_magvit_weights(dict(iter_checkpoint(vq)))
    return cfg, {k: mx.array(v) for k, v in raw.items()}


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | None = None,
    quantize: QuantizeSpec | None = None,
    vq: str | Path | None = None,
    vq_dtype: str | None = None,
    tokenizer: str | Path | None = None,
    force: bool = False,
    log=print,
    vision_tower: str | Path | None = None,
    vision_dtype: str | None = None,
    quantize_vision: bool = False,
    no_vq: bool = False,
    family: str | None = None,
) -> Path:
    """Convert an official Show-o checkpoint (Hub id or folder) into a showo-mlx folder at `dst`.

    `dtype` defaults to float32, and to float16 when quantizing: the scales, biases, LayerNorms and
    any unquantized embedding/head are then stored in float16 (1.007 → 0.961 GB for the 4-bit,
    group-128 model), the precision Apple silicon computes quantized matmuls in anyway.

    w_clip_vit checkpoints also get their CLIP tower (`vision_tower`, default
    openai/clip-vit-large-patch14-336; stored in `vision_dtype`, default like MAGVIT's, and quantized
    like the transformer with `quantize_vision`); `no_vq` leaves MAGVIT out (an understanding-only
    folder). `family` names the checkpoint's family (family.py) when SRC's name does not tell it."""
    from .family import resolve_family
    from .magvit import MagvitV2
    from .vision import DEFAULT_VISION_TOWER, attach_projector, convert_vision_tower, projector_shape, resolve_vision_source

    dtype = dtype or ("float16" if quantize is not None else "float32")
    target = check_dtype(dtype)
    if quantize is not None:
        quantize.validate()
    vq_dtype = vq_dtype or ("float16" if quantize is not None or dtype != "float32" else "float32")
    if vq_dtype not in ("float32", "float16", "bfloat16"):
        raise ShowoError(f"unsupported MAGVIT dtype {vq_dtype!r}; choose float32, float16 or bfloat16")
    if vision_dtype is not None and vision_dtype not in DTYPES:
        raise ShowoError(f"unsupported vision tower dtype {vision_dtype!r}; choose float32, float16 or bfloat16")
    dst = Path(dst)
    if dst.exists() and not force:
        raise ShowoError(f"{dst} already exists; choose another destination or pass --force to replace it")

    src_dir = resolve_source(src, kind="model")
    src_cfg = ShowoConfig.from_hub_dict(read_json(src_dir / "config.json"))
    fam = resolve_family(str(src), src_cfg.w_clip_vit, src_cfg.num_vq_tokens, family)
    if no_vq and not src_cfg.w_clip_vit:
        raise ShowoError("--no-vq makes an understanding-only folder, which only w_clip_vit checkpoints can use "
                         "(the others answer through MAGVIT tokens); drop --no-vq")
    if vision_tower is not None and not src_cfg.w_clip_vit:
        raise ShowoError(f"{src} is not a w_clip_vit checkpoint and uses no vision tower; drop --vision-tower")
    if quantize_vision and quantize is None:
        raise ShowoError("--q-vision quantizes the CLIP tower like the transformer: it needs --quantize")
    vision_dir = resolve_vision_source(vision_tower or DEFAULT_VISION_TOWER) if src_cfg.w_clip_vit else None
    vq_dir = None if no_vq else resolve_source(vq or DEFAULT_VQ, kind="vq")
    if tokenizer is not None:
        tok_dir = resolve_source(tokenizer, kind="tokenizer")
    elif _has_tokenizer(src_dir):
        tok_dir = src_dir
    else:
        tok_dir = resolve_source(DEFAULT_TOKENIZER, kind="tokenizer")

    # Check configs and weight files of every input before reading gigabytes of any of them.
    if vq_dir is not None:
        MagvitConfig.from_hub_dict(read_json(vq_dir / "config.json"))
        find_weight_files(vq_dir)
    find_weight_files(src_dir)
    log(f"reading Show-o weights from {src_dir}")
    cfg, weights = load_showo_source(src_dir)
    model = ShowoTransformer(cfg)
    proj_shape = projector_shape(weights)  # read before quantization packs the weights
    attach_projector(model, proj_shape)
    check_complete(model, weights, str(src_dir))
    model.load_weights([(k, v.astype(target)) for k, v in weights.items()])
    del weights
    config: dict[str, Any] = {
        "model_type": "showo",
        "format_version": FORMAT_VERSION,
        "showo_mlx_version": __version__,
        "dtype": dtype,
        "showo": cfg.to_dict(),
        "source": {"model": str(src), "vq": None if no_vq else str(vq or DEFAULT_VQ)},
        "family": fam.name,
    }
    if quantize is not None:
        config["quantization"] = quantize_transformer(model, quantize)
        log(f"quantized to {quantize.bits} bits (group {quantize.group_size}, embeddings/head: "
            f"{quantize.head_bits or 'float'})")

    vq_weights = None
    if vq_dir is not None:
        log(f"reading MAGVIT-v2 weights from {vq_dir}")
        vq_cfg, vq_weights = load_magvit_source(vq_dir)
        check_complete(MagvitV2(vq_cfg), vq_weights, str(vq_dir))
        config["magvit"] = vq_cfg.to_dict()
        config["magvit_dtype"] = vq_dtype
    vision_weights = None
    if vision_dir is not None:
        log(f"reading the CLIP vision tower from {vision_dir}")
        vision_block, vision_weights = convert_vision_tower(
            vision_dir, dtype=DTYPES[vision_dtype or vq_dtype], quantize=quantize if quantize_vision else None)
        config["vision"] = {**vision_block, "source": str(vision_tower or DEFAULT_VISION_TOWER),
                            "projector": list(proj_shape)}

    from mlx.utils import tree_flatten

    with atomic_output_dir(dst, force=force) as tmp:
        files = save_sharded(tmp, dict(tree_flatten(model.parameters())))
        config["files"] = {"transformer": files}
        if vq_weights is not None:
            vq_target = DTYPES[vq_dtype]
            mx.save_safetensors(
                str(tmp / "magvit.safetensors"),
                {k: v.astype(vq_target) for k, v in vq_weights.items()},
                metadata={"format": "mlx"},
            )
            config["files"]["magvit"] = "magvit.safetensors"
        if vision_weights is not None:
            mx.save_safetensors(str(tmp / config["vision"]["file"]), vision_weights, metadata={"format": "mlx"})
            config["files"]["vision"] = config["vision"]["file"]
        copy_tokenizer(tok_dir, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    log(f"wrote {dst} ({folder_size(dst) / 1e6:.1f} MB)")
    return dst


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def is_converted(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.exists():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "showo"
    except (OSError, json.JSONDecodeError):
        return False
