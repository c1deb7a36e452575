"""Official PyTorch checkpoints → one self-contained showo-mlx model folder.

    DST/config.json          {"model_type": "showo", "showo": {...}, "magvit": {...}, "dtype": ...,
                              "quantization": {"group_size": g, "bits": b, <path>: {...}}}  (mlx-lm format)
    DST/model.safetensors    the transformer (model-0000i-of-0000n.safetensors + index above 5 GB)
    DST/magvit.safetensors   MAGVIT-v2 (always float: 16 or 32 bit; absent with --no-vq)
    DST/vision.safetensors   the CLIP tower of w_clip_vit checkpoints (float or quantized)
    DST/tokenizer files      phi-1_5's tokenizer (from SRC, --tokenizer, or the Hub)

Everything is written into a temporary sibling folder and renamed into place at the end, so a
failure never leaves a half-written model; an existing DST is only replaced with force=True, and only
if it is empty or a previous conversion (fsutil.check_output_folder, which also refuses a DST that is,
holds or sits inside an input).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import __version__
from .checkpoint_io import check_safetensors, find_weight_files, iter_checkpoint
from .config import MagvitConfig, ShowoConfig, read_json
from .errors import CheckpointError, ShowoError
from .config_schema import check_converted_config
from .fsutil import atomic_output_dir, check_output_folder, has_json_marker, read_regular_file, source_roots
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


# Size limits per tokenizer file (phi-1_5's are 2.1 MB, 0.8 MB and 0.5 MB; the largest tokenizers
# in use are ~35 MB); anything else a tokenizer folder holds is a small JSON file.
TOKENIZER_LIMITS = {"tokenizer.json": 128 << 20, "vocab.json": 64 << 20, "merges.txt": 64 << 20}
SMALL_FILE_LIMIT = 8 << 20


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of `src` into `dst`: regular files only (never a FIFO or device),
    each within its size limit, and only if its real location is inside `src` (or, for a Hub
    cache snapshot, its blob store): a link to a file elsewhere is refused, not copied into the
    output for anyone to read."""
    copied = []
    roots = source_roots(src)
    for name in TOKENIZER_FILES:
        if not os.path.lexists(src / name):
            continue
        try:
            data = read_regular_file(src / name, limit=TOKENIZER_LIMITS.get(name, SMALL_FILE_LIMIT), within=roots)
        except FileNotFoundError:
            continue  # a dangling link: the file is not there
        except OSError as e:
            raise ShowoError(f"{src / name} cannot be read ({e.strerror or type(e).__name__}); check its permissions") from None
        (dst / name).write_bytes(data)
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
    weights = {k: mx.array(v) for k, v in finite_weights(iter_checkpoint(src, select=keep), src)}
    weights = require_float(sanitize_showo_weights(weights), src)
    if cfg.w_clip_vit and not any(k.startswith("mm_projector.") for k in weights):
        raise CheckpointError(f"{src} says w_clip_vit but holds no mm_projector weights; re-download the checkpoint")
    return cfg, weights


def load_magvit_source(vq: Path) -> tuple[MagvitConfig, dict[str, mx.array]]:
    cfg = MagvitConfig.from_hub_dict(read_json(vq / "config.json"))
    raw = require_float(sanitize_magvit_weights(dict(finite_weights(iter_checkpoint(vq), vq))), vq)
    return cfg, {k: mx.array(v) for k, v in raw.items()}


def finite_weights(tensors, source: Path):
    """Pass (name, array) pairs through, refusing a float tensor with NaN or infinite values: a
    model of NaNs converts, loads and then answers "!!!!!" with no error anywhere."""
    for name, arr in tensors:
        if arr.dtype.kind == "f" and arr.size:
            finite = int(np.count_nonzero(np.isfinite(arr)))
            if finite != arr.size:
                nans = int(np.count_nonzero(np.isnan(arr)))
                raise CheckpointError(
                    f"{source}: tensor '{name}' holds {nans} NaN and {arr.size - finite - nans} infinite values "
                    f"of {arr.size}; the checkpoint is corrupt, download it again"
                )
        yield name, arr


def require_float(weights: dict[str, Any], source: Path) -> dict[str, Any]:
    """Model weights are floating point; an integer tensor under a weight's name is a mislabelled
    dtype (e.g. float bytes declared I32), which a cast would silently turn into garbage."""
    for name, value in weights.items():
        kind = value.dtype.kind if isinstance(value, np.ndarray) else ("f" if mx.issubdtype(value.dtype, mx.floating) else "i")
        if kind != "f":
            raise CheckpointError(
                f"{source}: tensor '{name}' is stored as {str(value.dtype).rsplit('.', 1)[-1]}, but model weights are floating point; "
                "the checkpoint is corrupt, download it again"
            )
    return weights


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
    source: dict[str, Any] | None = None,
    vision_tower: str | Path | None = None,
    vision_dtype: str | None = None,
    quantize_vision: bool = False,
    no_vq: bool = False,
    family: str | None = None,
) -> Path:
    """Convert an official Show-o checkpoint (Hub id or folder) into a showo-mlx folder at `dst`.

    `source` replaces the record of where the inputs came from (config.json's "source"; the model
    cache stores its key there). An already converted SRC is handled by `convert_converted`.

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

    requested = {"dtype": dtype, "vq_dtype": vq_dtype}  # as given, for an already converted SRC
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
    if is_converted(src_dir):
        return convert_converted(src_dir, dst, quantize=quantize, vq=vq, tokenizer=tokenizer, force=force, log=log,
                                 **requested)
    src_cfg = ShowoConfig.from_hub_dict(read_json(src_dir / "config.json"))
    named = (source or {}).get("model", str(src))  # the Hub id, when the model cache converts a downloaded snapshot
    fam = resolve_family(named, src_cfg.w_clip_vit, src_cfg.num_vq_tokens, family)
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
    check_output_folder(dst, force=force, inputs=(src, src_dir, vq, vq_dir, tokenizer, tok_dir, vision_tower, vision_dir),
                        is_previous_output=is_converted, command="`showo convert`")

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
        "source": source or {"model": str(src), "vq": None if no_vq else str(vq or DEFAULT_VQ)},
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
        check_converted_config(config, "the converted config")  # what loads the folder later accepts
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    log(f"wrote {dst} ({folder_size(dst) / 1e6:.1f} MB)")
    return dst


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def is_converted(folder: Path) -> bool:
    return has_json_marker(Path(folder), "config.json", "model_type", "showo")


# -- a converted SRC: nothing to do, or a new precision ----------------------------------------------
def convert_converted(
    src: Path,
    dst: str | Path,
    *,
    dtype: str | None = None,
    quantize: QuantizeSpec | None = None,
    vq: str | Path | None = None,
    vq_dtype: str | None = None,
    tokenizer: str | Path | None = None,
    force: bool = False,
    log=print,
) -> Path:
    """SRC is already a showo-mlx folder. Without a new precision there is nothing to do (returns
    SRC, writes nothing). With `quantize` and/or `dtype`/`vq_dtype` the folder is rewritten into
    `dst` at that precision: a quantized SRC is dequantized first, so re-quantizing compounds the
    rounding (converting the official checkpoint again is more accurate)."""
    from mlx.utils import tree_flatten

    from .loading import load_transformer, read_model_config

    src = Path(src)
    if vq is not None or tokenizer is not None:
        raise ShowoError(f"{src} is already converted and carries its own MAGVIT-v2 and tokenizer; "
                         "--vq/--tokenizer apply to official checkpoints")
    if quantize is None and dtype is None and vq_dtype is None:
        log(f"{src} is already converted (showo-mlx format); nothing to do: use it as is (--model {src}), "
            "or pass -q/--dtype to write it at another precision")
        return src
    for name, value in (("dtype", dtype), ("MAGVIT dtype", vq_dtype)):
        if value is not None and value not in DTYPES:
            raise ShowoError(f"unsupported {name} {value!r}; choose one of {list(DTYPES)}")
    if quantize is not None:
        quantize.validate()
    dst = check_output_folder(dst, force=force, inputs=(src,), is_previous_output=is_converted, command="`showo convert`")
    config = read_model_config(src)
    model = load_transformer(src, config)
    block = config.get("quantization")
    if quantize is not None and block:
        from mlx_lm.utils import dequantize_model

        log(f"{src} is already quantized ({block['bits']} bits): dequantizing it before quantizing again "
            "(the rounding compounds; converting the official checkpoint is more accurate)")
        dequantize_model(model)
        block = None
    # the defaults of a direct conversion: float16 beside quantized weights, else as stored
    dtype = dtype or ("float16" if quantize is not None else config.get("dtype", "float32"))
    if vq_dtype is None and quantize is not None and config.get("magvit_dtype", "float32") == "float32":
        vq_dtype = "float16"
    model.set_dtype(check_dtype(dtype))
    if quantize is not None:
        block = quantize_transformer(model, quantize)
        log(f"quantized to {quantize.bits} bits (group {quantize.group_size}, embeddings/head: "
            f"{quantize.head_bits or 'float'})")
    out_config = {k: v for k, v in config.items() if k not in ("quantization", "files")}
    out_config.update(dtype=dtype, showo_mlx_version=__version__,
                      source={**config.get("source", {}), "rewritten_from": str(src)})
    if block:
        out_config["quantization"] = block
    magvit_file = config.get("files", {}).get("magvit", "magvit.safetensors")
    with atomic_output_dir(dst, force=force) as tmp:
        files = save_sharded(tmp, dict(tree_flatten(model.parameters())))
        check_safetensors(src / magvit_file)  # read, never copied blindly (a link or FIFO in SRC)
        magvit = mx.load(str(src / magvit_file))
        if vq_dtype is not None:
            magvit = {k: v.astype(DTYPES[vq_dtype]) for k, v in magvit.items()}
            out_config["magvit_dtype"] = vq_dtype
        mx.save_safetensors(str(tmp / "magvit.safetensors"), magvit, metadata={"format": "mlx"})
        copy_tokenizer(src, tmp)  # regular files inside SRC only, size-limited (as for an official SRC)
        out_config["files"] = {"transformer": files, "magvit": "magvit.safetensors"}
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2))
    log(f"wrote {dst} ({folder_size(dst) / 1e6:.1f} MB)")
    return dst


# -- publishing --------------------------------------------------------------------------------------
MODEL_CARD = """---
library_name: showo-mlx
tags:
- mlx
- show-o
{base}---

# {repo}

{source} ([Show-o](https://github.com/showlab/Show-o)) converted for Apple silicon with showo-mlx {version}
(MLX format{quant}). Load it by its repo id:

```bash
showo generate "a rally car race" --model {repo}
```

```python
import showo_mlx
pipe = showo_mlx.load("{repo}")
```
"""


def check_upload_repo(repo_id: str) -> None:
    """Refuse a malformed --upload-repo before any conversion work."""
    from .hub import looks_like_repo_id

    if not looks_like_repo_id(repo_id):
        raise ShowoError(f"--upload-repo {repo_id!r} is not a Hub repo id; use owner/name")


def upload_folder_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, log=print, api=None) -> str:
    """Publish a converted folder as the Hub model repo `repo_id` (created if needed) with
    huggingface_hub's `HfApi.create_repo` + `upload_folder`; `showo … --model repo_id` then loads
    it in place. Writes a short model card (README.md) first when the folder has none."""
    from .hub import clip_words

    folder = Path(folder)
    check_upload_repo(repo_id)
    if not is_converted(folder):
        raise ShowoError(f"{folder} is not a converted showo-mlx folder; nothing to upload")
    config = json.loads((folder / "config.json").read_text())
    card = folder / "README.md"
    if not card.exists():
        source = str(config.get("source", {}).get("model", "a Show-o checkpoint"))
        base = f"base_model: {source}\n" if "/" in source and not Path(source).exists() else ""
        q = config.get("quantization")
        card.write_text(MODEL_CARD.format(
            base=base, repo=repo_id, source=f"`{source}`", version=__version__,
            quant=f", {q['bits']}-bit weights, group {q['group_size']}" if q else ""))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=f"Upload showo-mlx {__version__} conversion")
    except Exception as e:  # auth, network, permissions: one line
        raise ShowoError(f"could not upload {folder} to {repo_id} ({clip_words(f'{type(e).__name__}: {e}', 120)}); "
                         "log in with `hf auth login` and check that you may write to that repo") from None
    url = f"https://huggingface.co/{repo_id}"
    log(f"uploaded {folder} to {url}")
    return url
