"""Model id or path → a ready model folder and its parts.

"showlab/show-o" (a Hub id) is downloaded with huggingface_hub into its cache and converted once
into showo-mlx's cache (``$SHOWO_MLX_CACHE`` or ``~/.cache/showo-mlx``); a folder in the official
layout is converted the same way; an already converted folder, local or on the Hub, is used as is.
Loading reads the config's quantization block and never guesses from shapes.

The conversion cache is keyed on what was converted, so the right model is loaded every time:

    converted/<name>-<slot>/   slot = digest of (resolved folder path or Hub repo id, --vq, --tokenizer)
        config.json["source"]["cache_key"]  = the exact inputs: for a folder the size and mtime of
                                              every file conversion reads, for a Hub repo the commit
                                              (MAGVIT and tokenizer repos: by name)

Two folders with the same name get different slots; a folder whose weights changed, or a Hub repo
with a new commit, is converted again into its slot (replacing the superseded conversion), and
conversions of folders that no longer exist are removed, so the cache holds one conversion per
source in use. Deleting the cache folder is always safe; deleting the Hub's copy of a converted
model is too (without a connection, the last conversion is used).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from . import convert as _convert
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
from .checkpoint_io import check_safetensors
from .config_schema import check_converted_config
from .errors import CheckpointError, ShowoConfigError, ShowoError
from .fsutil import recover_interrupted
from .hub import fetch_config, fetch_files, looks_like_repo_id, resolve_source, snapshot_commit
from .model import ShowoTransformer

DEFAULT_MODEL = "showlab/show-o"
CACHE_KEY_VERSION = 1
# Files a conversion reads besides the weights (their size and mtime enter a folder's fingerprint).
_READ_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "merges.txt")


def cache_root() -> Path:
    return Path(os.environ.get("SHOWO_MLX_CACHE", Path.home() / ".cache" / "showo-mlx"))


def resolve_model(
    model: str | Path,
    log: Callable[[str], None] = print,
    *,
    vq: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """A converted model folder for `model` (converting once into the cache when needed).

    `vq` and `tokenizer` (folders or Hub ids) say where an official checkpoint's MAGVIT-v2 and
    tokenizer come from (default: showlab/magvitv2, and the checkpoint's own tokenizer or
    microsoft/phi-1_5); a converted model carries its own, so they are refused for one.

    For a Hub id only config.json is fetched (one request) while its conversion is up to date;
    when the Hub cannot be reached, the last conversion of that repo is used, with a note."""
    path = Path(model).expanduser()
    recover_interrupted(path.parent)  # a run killed while replacing this folder left it aside
    if path.is_dir() and is_converted(path):
        _refuse_parts_for_converted(path, vq, tokenizer)
        return path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ShowoConfigError(f"{path} has no config.json; pass a Show-o model folder or a Hub id")
        name, model_id, head = f"local--{path.resolve().name}", folder_identity(path), None
    elif looks_like_repo_id(str(model)):
        name = str(model).replace("/", "--")
        try:
            head = fetch_config(str(model))  # nothing is announced before this works
        except ShowoError as e:
            return _last_conversion(str(model), name, vq, tokenizer, e, log)
        if head.converted:
            _refuse_parts_for_converted(str(model), vq, tokenizer)
            folder = fetch_files(head).path  # used in place from the Hub cache
            read_model_config(folder)  # a newer format fails here, with the fix
            return folder
        model_id = {"repo": str(model), "commit": head.commit}
    else:
        raise ShowoError(f"model {model} is neither a folder nor a Hub id (owner/name); check the name")

    key = {"version": CACHE_KEY_VERSION, "model": model_id, "vq": part_identity(vq), "tokenizer": part_identity(tokenizer)}
    target = _slot(name, model_id.get("path") or str(model), vq, tokenizer)
    recover_interrupted(target.parent)
    stored = _stored_key(target)
    if stored == key:
        return target
    src_dir = path if head is None else fetch_files(head).path
    vq_dir = resolve_source(vq or _convert.DEFAULT_VQ, kind="vq")
    tok_dir = resolve_source(tokenizer, kind="tokenizer") if tokenizer is not None else None
    if tok_dir is None and not _convert._has_tokenizer(src_dir):
        tok_dir = resolve_source(_convert.DEFAULT_TOKENIZER, kind="tokenizer")
    why = "its inputs changed since it was converted" if stored is not None else "once"
    log(f"converting {model} {why} into {target} (MLX format; later runs reuse it)")
    record = {"model": str(model), "vq": str(vq or _convert.DEFAULT_VQ), "cache_key": key,
              "vq_commit": snapshot_commit(vq_dir)}
    if tok_dir is not None:
        record["tokenizer"] = str(tokenizer or _convert.DEFAULT_TOKENIZER)
        record["tokenizer_commit"] = snapshot_commit(tok_dir)
    convert(src_dir, target, vq=vq_dir, tokenizer=tok_dir or src_dir, force=True, log=log, source=record)
    prune_cache(keep=target, log=log)
    return target


def _slot(name: str, source: str, vq, tokenizer) -> Path:
    """The cache folder of one source (resolved folder path or repo id) with its --vq/--tokenizer."""
    slot = {"model": source, "vq": _spec(vq), "tokenizer": _spec(tokenizer)}
    return cache_root() / "converted" / f"{name}-{_digest(slot)}"


def _last_conversion(repo: str, name: str, vq, tokenizer, error: ShowoError, log) -> Path:
    """Offline or the Hub unreachable: the existing conversion of `repo`, if there is one."""
    target = _slot(name, repo, vq, tokenizer)
    key = _stored_key(target)
    if key is None or key.get("model", {}).get("repo") != repo:
        raise error
    commit = str(key["model"].get("commit") or "?")[:12]
    log(f"note: could not check the Hub for a newer {repo}; using its conversion of commit {commit} ({target})")
    return target


def part_identity(part: str | Path | None) -> Any:
    """How a --vq/--tokenizer choice enters the cache key: "default"; a Hub id by name (MAGVIT and
    tokenizer repos do not change, and a request per run to check them would buy nothing); a local
    folder by its fingerprint."""
    if part is None:
        return "default"
    local = Path(part).expanduser()
    if local.is_dir():
        return folder_identity(local)
    return {"repo": str(part)}


def _refuse_parts_for_converted(model, vq, tokenizer) -> None:
    if vq is not None or tokenizer is not None:
        flags = " and ".join(f for f, v in (("--vq", vq), ("--tokenizer", tokenizer)) if v is not None)
        raise ShowoError(f"{model} is already converted and carries its own MAGVIT-v2 and tokenizer; {flags} "
                         "apply to official checkpoints (drop them, or convert the official one with them)")


def _spec(part: str | Path | None) -> str:
    """How a --vq/--tokenizer choice enters the cache slot: a local folder by its resolved path."""
    if part is None:
        return ""
    path = Path(part).expanduser()
    return str(path.resolve()) if path.exists() else str(part)


def _digest(value: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:n]


def folder_identity(folder: Path) -> dict[str, Any]:
    """A local folder's identity: its resolved path and the size + mtime of every file conversion
    reads (config, weights and index, tokenizer). Cheap: no weight is read."""
    from .checkpoint_io import find_weight_files

    folder = Path(folder).resolve()
    files = {folder / n for n in _READ_FILES if (folder / n).is_file()}
    try:
        files |= {Path(p).resolve() for p in find_weight_files(folder)}
    except ShowoError:
        pass  # an unreadable folder fails in convert with its own message
    index = [p for p in folder.glob("*.index.json")]
    files |= set(index)
    stats = []
    for p in sorted(files):
        st = p.stat()
        stats.append([p.name, st.st_size, st.st_mtime_ns])
    return {"path": str(folder), "files": stats}


def _stored_key(target: Path) -> dict[str, Any] | None:
    if not is_converted(target):
        return None
    try:
        return json.loads((target / "config.json").read_text()).get("source", {}).get("cache_key")
    except (OSError, ValueError):
        return None


def prune_cache(keep: Path | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """Remove conversions nothing can ask for any more: those made from a local folder that no
    longer exists, and those made by showo-mlx before conversions were keyed (no cache key; their
    folder name did not identify the source). Returns what was removed."""
    root = cache_root() / "converted"
    removed = []
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir() or (keep is not None and entry == keep):
            continue
        if not is_converted(entry):
            continue
        key = _stored_key(entry)
        source = (key or {}).get("model", {})
        if key is not None and ("repo" in source or Path(source.get("path", "")).is_dir()):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if removed:
        log(f"removed {len(removed)} superseded conversion{'s' if len(removed) > 1 else ''} from {root}")
    return removed


def read_model_config(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    config = read_json(folder / "config.json")
    if not isinstance(config, dict) or config.get("model_type") != "showo":
        raise ShowoConfigError(f"{folder} is not a converted showo-mlx model; run `showo convert` first")
    if isinstance(config.get("format_version"), int) and config["format_version"] > FORMAT_VERSION:
        raise ShowoConfigError(
            f"{folder} was written by a newer showo-mlx (format {config['format_version']}); upgrade showo-mlx"
        )
    check_converted_config(config, f"{folder / 'config.json'}")
    return config


def _load_safetensors(folder: Path, files: list[str]) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{path} is missing; re-run `showo convert`")
        check_safetensors(path)  # mx.load itself accepts overlapping or out-of-range headers
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


# -- compute precision --------------------------------------------------------------------------
def on_cpu_backend() -> bool:
    """True when MLX computes on the CPU (Linux, or a Mac with the CPU as default device)."""
    return mx.default_device().type == mx.DeviceType.cpu


@dataclass
class ComputePlan:
    """How a converted folder is brought into memory for inference."""

    dtype: str | None  # cast the transformer's float tensors to this (None: as stored)
    dequantize: bool  # turn quantized layers back into float ones (then cast to `dtype`)
    vq_dtype: str | None  # MAGVIT dtype (None: as stored)
    note: str | None = None  # the line that tells the user, when the stored precision is not kept


def compute_plan(config: dict[str, Any], dtype: str | None = None, vq_dtype: str | None = None, *,
                 cpu: bool | None = None, name: str = "the model") -> ComputePlan:
    """The compute precision for a folder. On Metal (and whenever `dtype` is given) the stored
    precision is kept. On the CPU backend, with no `dtype`, a float16/bfloat16 or quantized folder
    is computed in float32: MLX's CPU backend has fast kernels only for float32 (measured with
    OpenBLAS: float16 products 30x slower, 4-bit ones with float16 activations 2000x; see
    docs/PERFORMANCE.md), so quantized layers are dequantized at load and half tensors cast up. An explicit `dtype` keeps quantized layers quantized (float32 then means
    float32 activations over the stored low-bit weights: slower than dequantized, a quarter of the
    memory)."""
    if dtype is not None:
        check_dtype(dtype)
    cpu = on_cpu_backend() if cpu is None else cpu
    stored = config.get("dtype", "float32")
    vq_stored = config.get("magvit_dtype", "float32")
    if not cpu:
        return ComputePlan(dtype, False, vq_dtype)
    if vq_dtype is None and vq_stored != "float32" and dtype in (None, "float32"):
        vq_dtype = "float32"  # MAGVIT's convolutions too are fast only in float32 on the CPU
    if dtype is not None:
        return ComputePlan(dtype, False, vq_dtype)
    block = config.get("quantization")
    if not block and stored == "float32":
        return ComputePlan(None, False, vq_dtype)
    what = f"{block['bits']}-bit weights ({stored} scales)" if block else f"{stored} weights"
    how = "dequantizes them to float32 at load" if block else "casts them to float32 at load"
    keep = ("--dtype float32 keeps them quantized with float32 activations, --dtype float16 as stored"
            if block else f"--dtype {stored} keeps them as stored")
    note = (f"note: {name} stores {what}, which MLX's CPU backend computes 30x to >1000x slower than "
            f"float32; showo-mlx {how} ({keep})")
    return ComputePlan("float32", bool(block), vq_dtype, note)


def load_for_inference(
    folder: Path,
    config: dict[str, Any] | None = None,
    *,
    plan: ComputePlan | None = None,
    quantize: QuantizeSpec | None = None,
    adapter_path: str | Path | None = None,
    adapter_scale: float = 1.0,
) -> ShowoTransformer:
    """The transformer of a converted folder as `plan` says (precision), optionally quantized at
    load time and with LoRA adapters (written by `showo train --lora`) applied on top, unfused:
    ``y = W·x + adapter_scale · scale · (x·A)·B`` (adapter_scale 1 = as trained, 0 = the base)."""
    folder = Path(folder)
    config = config or read_model_config(folder)
    plan = plan or ComputePlan(None, False, None)
    if adapter_path is None and adapter_scale != 1.0:
        raise ShowoError("--adapter-scale (adapter_scale) needs --adapter-path (adapter_path): there are no adapters to scale")
    adapters = _read_adapters(adapter_path, adapter_scale) if adapter_path is not None else None
    fingerprint = adapters and adapters.get("base", {}).get("fingerprint")
    if config.get("quantization") and quantize is not None:
        raise ShowoError(f"{folder} is already quantized ({config['quantization']['bits']} bits); drop --quantize")
    # Cast while loading (one copy in memory) unless the stored weights must be seen first: to
    # dequantize them, or to check that adapters were trained on exactly these weights.
    cast_at_load = not plan.dequantize and not fingerprint
    model = load_transformer(folder, config, dtype=plan.dtype if cast_at_load else None)
    if fingerprint:
        from .train.checkpoint import model_fingerprint

        if fingerprint != model_fingerprint(model):
            raise ShowoError(f"the adapters in {adapter_path} were trained on another base model than {folder}; "
                             "load them with the model they were trained on")
    if not cast_at_load and plan.dtype is not None:
        model.set_dtype(check_dtype(plan.dtype))  # scales and biases first: dequantize at this precision
    if plan.dequantize:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
    q_at_load = (adapters or {}).get("base", {}).get("quantize_at_load")
    if quantize is None and q_at_load and not config.get("quantization") and not plan.dequantize:
        # QLoRA adapters trained over a base quantized at load time: rebuild that base (as `fuse` does)
        quantize = QuantizeSpec(bits=q_at_load["bits"], group_size=q_at_load["group_size"])
    if quantize is not None:
        quantize_transformer(model, quantize.validate())
    if adapters is not None:
        from .train.lora import load_adapters

        load_adapters(model, Path(adapter_path), adapters)
    model.eval()
    mx.eval(model.parameters())
    return model


def _read_adapters(path: str | Path, scale: float) -> dict[str, Any]:
    from .train.lora import read_adapter_config

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ShowoError(f"adapter path {path} is not a folder; pass the adapters folder written by "
                         "`showo train --lora` (RUN/adapters)")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ShowoError(f"adapter scale must be a number, got {scale!r}") from None
    if not scale == scale or abs(scale) == float("inf"):
        raise ShowoError(f"adapter scale must be a finite number, got {scale}")
    config = read_adapter_config(folder)
    lp = dict(config["lora_parameters"])
    lp["scale"] = lp["scale"] * scale  # LoRALinear computes scale · (x·A)·B
    return {**config, "lora_parameters": lp}


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
