"""The schema of every config.json value: type, sane range and the relations between values.

A config.json is user input: a string where a number belongs, zero heads, a negative epsilon or a
million layers must be one clear line (ShowoConfigError), not a ZeroDivisionError, a traceback deep
inside model construction or an unbounded allocation. `config.ShowoConfig` / `MagvitConfig` call
these checks whenever they are built (from the official Hub config at conversion and from our
converted config at load time), and `check_converted_config` covers the rest of a converted
folder's config.json (dtypes, quantization block, file list), so a folder that converts also loads.

Upper bounds are far above any Show-o model (Phi-1.5: 24 layers, hidden 2048, vocab 58498) and
low enough that a config cannot ask for terabytes.
"""

from __future__ import annotations

import math
import reprlib
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from .errors import ShowoConfigError

_FIX = "fix the model's config.json (or convert it again from the official checkpoint)"
_show = reprlib.Repr()
_show.maxstring, _show.maxother, _show.maxlist, _show.maxdict = 40, 40, 4, 4

# name → (kind, low, high); floats are open at a low bound of 0 (eps, theta, rotary factor > 0).
SHOWO_FIELDS: dict[str, tuple[type, float, float]] = {
    "hidden_size": (int, 1, 65536),
    "num_hidden_layers": (int, 1, 1000),
    "num_attention_heads": (int, 1, 4096),
    "intermediate_size": (int, 1, 262144),
    "partial_rotary_factor": (float, 0, 1),
    "rope_theta": (float, 0, 1e12),
    "layer_norm_eps": (float, 0, 1),
    "max_position_embeddings": (int, 1, 1 << 20),
    "vocab_size": (int, 2, 1_000_000),
    "llm_vocab_size": (int, 1, 1_000_000),
    "codebook_size": (int, 2, 1 << 20),
    "num_vq_tokens": (int, 1, 65536),
    "mask_token_id": (int, 0, 1_000_000),
    "num_new_special_tokens": (int, 0, 1000),
    "max_seq_length": (int, 1, 1 << 20),
}
MAGVIT_FIELDS: dict[str, tuple[type, float, float]] = {
    "codebook_bits": (int, 1, 20),
    "num_groups": (int, 1, 1024),
    "norm_eps": (float, 0, 1),
}
CODER_FIELDS: dict[str, tuple[type, float, float]] = {
    "ch": (int, 1, 4096),
    "z_channels": (int, 1, 64),
    "in_channels": (int, 3, 3),  # RGB in and out: the pipeline feeds and expects 3 channels
    "out_channels": (int, 3, 3),
}
MAX_FILES = 10_000


def fail(where: str, problem: str) -> ShowoConfigError:
    return ShowoConfigError(" ".join(f"{where}: {problem}; {_FIX}".split()))


def require_object(value: Any, where: str) -> dict:
    """A JSON object (dict), or a one-line error naming what it got instead."""
    if not isinstance(value, dict):
        raise fail(where, f"expected a JSON object, got {type(value).__name__} {_show.repr(value)}")
    return value


def check_number(value: Any, name: str, kind: type, low: float, high: float, where: str):
    """`value` as `kind` if it is one (ints accepted for floats; bools never) within [low, high]
    (for floats: (low, high]); raises otherwise. Returns the normalised value."""
    if kind is int:
        ok = type(value) is int and low <= value <= high
        rule = f"an integer from {low:,} to {high:,}" if low != high else f"{low}"
    else:  # every float field is strictly positive
        ok = type(value) in (int, float) and math.isfinite(value) and low < value <= high
        rule = f"a number above {low:g} and at most {high:g}"
        value = float(value) if ok else value
    if not ok:
        raise fail(where, f"{name} must be {rule}, got {_show.repr(value)}")
    return value


def _check_fields(obj: Any, fields: dict[str, tuple[type, float, float]], where: str) -> None:
    for name, (kind, low, high) in fields.items():
        if hasattr(obj, name):
            setattr(obj, name, check_number(getattr(obj, name), name, kind, low, high, where))


def check_showo_fields(cfg: Any, where: str = "model config") -> None:
    """Types and ranges of a ShowoConfig, then the relations that arithmetic on them relies on."""
    _check_fields(cfg, SHOWO_FIELDS, where)
    if not isinstance(cfg.hidden_act, str):
        raise fail(where, f"hidden_act must be a string, got {_show.repr(cfg.hidden_act)}")
    if type(getattr(cfg, "w_clip_vit", False)) is not bool:
        raise fail(where, f"w_clip_vit must be true or false, got {_show.repr(cfg.w_clip_vit)}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise fail(
            where,
            f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}",
        )
    rotary = int(cfg.hidden_size // cfg.num_attention_heads * cfg.partial_rotary_factor)
    if rotary < 2 or rotary % 2:
        raise fail(
            where,
            f"partial_rotary_factor {cfg.partial_rotary_factor} gives {rotary} rotary dimensions per head of "
            f"{cfg.hidden_size // cfg.num_attention_heads}; RoPE needs an even number of at least 2",
        )
    side = math.isqrt(cfg.num_vq_tokens)
    if side * side != cfg.num_vq_tokens:
        raise fail(where, f"num_vq_tokens {cfg.num_vq_tokens} is not a square number (the image token grid is square)")
    if cfg.num_vq_tokens >= cfg.max_position_embeddings or cfg.max_seq_length >= cfg.max_position_embeddings:
        raise fail(where, f"num_vq_tokens and max_seq_length must be below max_position_embeddings {cfg.max_position_embeddings}")


def _int_list(value: Any, name: str, low: int, high: int, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 8:
        raise fail(where, f"{name} must be a list of 1 to 8 integers, got {_show.repr(value)}")
    return tuple(check_number(v, f"{name} entry", int, low, high, where) for v in value)


def check_magvit_fields(cfg: Any, where: str = "MAGVIT-v2 config") -> None:
    """Types and ranges of a MagvitConfig and of its encoder/decoder, then their relations."""
    _check_fields(cfg, MAGVIT_FIELDS, where)
    for part in ("encoder", "decoder"):
        coder = getattr(cfg, part)
        _check_fields(coder, CODER_FIELDS, f"{where} ({part})")
        coder.ch_mult = _int_list(coder.ch_mult, f"{part}.ch_mult", 1, 64, where)
        coder.num_res_blocks = _int_list(coder.num_res_blocks, f"{part}.num_res_blocks", 0, 64, where)
        if len(coder.num_res_blocks) != len(coder.ch_mult):
            raise fail(where, f"{part}.num_res_blocks needs one entry per ch_mult entry ({len(coder.ch_mult)})")
        if coder.z_channels != cfg.codebook_bits:
            raise fail(where, f"{part}.z_channels {coder.z_channels} must equal codebook_bits {cfg.codebook_bits} (LFQ)")
        for width in (coder.ch, *(coder.ch * m for m in coder.ch_mult)):
            if width % cfg.num_groups:
                raise fail(where, f"{part} has {width} channels, not divisible by num_groups {cfg.num_groups} (GroupNorm)")
    if len(cfg.encoder.ch_mult) != len(cfg.decoder.ch_mult):
        raise fail(where, "encoder and decoder need the same number of levels (ch_mult entries)")


def _plain_file_name(value: Any, what: str, where: str) -> str:
    ok = (
        isinstance(value, str)
        and value.endswith(".safetensors")
        and PurePosixPath(value).name == value
        and PureWindowsPath(value).name == value
        and "\x00" not in value
    )
    if not ok:
        raise fail(where, f"{what} must be a plain .safetensors file name inside the folder, got {_show.repr(value)}")
    return value


def _check_quant(block: Any, where: str, what: str = "quantization") -> None:
    from .convert import Q_BITS, Q_GROUP_SIZES

    require_object(block, f"{where} ({what})")
    for key, allowed in (("bits", Q_BITS), ("group_size", Q_GROUP_SIZES)):
        if type(block.get(key)) is not int or block[key] not in allowed:
            raise fail(where, f"{what} {key} must be one of {list(allowed)}, got {_show.repr(block.get(key))}")
    if block.get("mode", "affine") != "affine":
        raise fail(where, f"{what} mode must be \"affine\", got {_show.repr(block.get('mode'))}")


def check_converted_config(config: Any, where: str = "config.json") -> None:
    """Everything of a converted folder's config.json besides `model_type`/`format_version`
    (checked by the loader first): the two model configs and how they fit together, the dtypes,
    the quantization block and the weight file names. Raises ShowoConfigError (one line)."""
    from .config import MagvitConfig, ShowoConfig
    from .convert import DTYPES

    require_object(config, where)
    version = config.get("format_version", 0)
    if type(version) is not int or version < 0:
        raise fail(where, f"format_version must be a non-negative integer, got {_show.repr(version)}")
    try:
        showo = ShowoConfig.from_dict(require_object(config.get("showo"), f"{where} (showo)"))
        magvit = MagvitConfig.from_dict(require_object(config["magvit"], f"{where} (magvit)")) if "magvit" in config else None
    except ShowoConfigError as e:
        raise ShowoConfigError(e.args[0] if str(e).startswith(where) else f"{where}: {e}") from None
    if magvit is not None:
        if showo.codebook_size != magvit.codebook_size:
            raise fail(
                where,
                f"the transformer has {showo.codebook_size} image codes but MAGVIT-v2 has {magvit.codebook_size} "
                f"(2^{magvit.codebook_bits}); they are not a pair",
            )
    for key in ("dtype", "magvit_dtype"):
        if key in config and (not isinstance(config[key], str) or config[key] not in DTYPES):
            raise fail(where, f"{key} must be one of {list(DTYPES)}, got {_show.repr(config[key])}")
    block = config.get("quantization")
    if block is not None:
        _check_quant(block, where)
        for path, override in block.items():
            if path in ("bits", "group_size", "mode"):
                continue
            if type(override) is not bool:
                _check_quant(override, where, f"quantization of {path}")
    files = require_object(config.get("files", {}), f"{where} (files)")
    transformer = files.get("transformer", ["model.safetensors"])
    if not isinstance(transformer, list) or not 1 <= len(transformer) <= MAX_FILES:
        raise fail(where, f"files.transformer must be a list of 1 to {MAX_FILES} file names, got {_show.repr(transformer)}")
    for name in transformer:
        _plain_file_name(name, "every files.transformer entry", where)
    _plain_file_name(files.get("magvit", "magvit.safetensors"), "files.magvit", where)
    if "vision" in files:
        _plain_file_name(files["vision"], "files.vision", where)
    family = config.get("family")
    if family is not None:
        from .family import BY_NAME

        if not isinstance(family, str) or family not in BY_NAME:
            raise fail(where, f"family must be one of {sorted(BY_NAME)}, got {_show.repr(family)}")
    vision = config.get("vision")
    if vision is not None:
        require_object(vision, f"{where} (vision)")
        _plain_file_name(vision.get("file", "vision.safetensors"), "vision.file", where)
        if "dtype" in vision and (not isinstance(vision["dtype"], str) or vision["dtype"] not in DTYPES):
            raise fail(where, f"vision.dtype must be one of {list(DTYPES)}, got {_show.repr(vision['dtype'])}")
        if vision.get("quantization") is not None:
            _check_quant(vision["quantization"], where, "quantization of the vision tower")
