"""The CLIP understanding path of the `w_clip_vit` checkpoints (showlab/show-o-w-clip-vit[-512x512]).

    image ─ ClipImageProcessor ─▶ (1, 336, 336, 3) ─ ClipVisionTower ─▶ (1, 576, 1024) ─ MMProjector ─▶ (1, 576, 2048)

* `ClipImageProcessor`: `CLIPImageProcessor.preprocess` of openai/clip-vit-large-patch14-336, re-done
  with PIL and NumPy in the same order and precision (shortest-edge PIL bicubic resize with a truncated
  long side, centre crop at ``(size − crop) // 2``, ``uint8 · (1/255)`` in float64 cast to float32,
  ``(x − mean) / std`` in float32). Channels-last, as MLX's convolution wants.
* `ClipVisionTower`: `CLIPVisionModel` (transformers) up to the hidden state the official
  `models/clip_encoder.py` `CLIPVisionTower.feature_select` reads: ``hidden_states[-2]``, i.e. after
  all but the last encoder layer, without `post_layernorm`, class token dropped. Only those layers are
  built and stored; the last layer and `post_layernorm` are never computed.
* `MMProjector`: `Showo.mm_projector` (`models/modeling_showo.py`), Linear → GELU (exact erf form, not
  Phi's tanh) → Linear; sizes read from the weights (1024 → 2048 → 2048 in the released checkpoints).
  It lives inside the transformer's weights file (`mm_projector.fc1.*`, `mm_projector.fc2.*`), so
  training, LoRA, quantization and export treat it like any other transformer layer.

Key mapping (`sanitize_clip_weights`): the Hub checkpoint is a full `CLIPModel` (text tower included)
or a `CLIPVisionModel`; only ``vision_model.*`` is kept, ``encoder.layers.i`` becomes ``layers.i``, layers
past the selected one and ``post_layernorm`` are dropped, and the patch convolution goes from PyTorch's
OIHW to MLX's OHWI.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from .checkpoint_io import check_safetensors
from .errors import CheckpointError, ShowoConfigError

DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"
SELECT_LAYER = -2  # models/clip_encoder.py: CLIPVisionTower.select_layer
VISION_FILE = "vision.safetensors"
PROJECTOR = "mm_projector"


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class ClipVisionConfig:
    """`CLIPVisionConfig` numbers (defaults are transformers' own, used when a Hub config omits them)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    select_layer: int = SELECT_LAYER

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def layers_used(self) -> int:
        """Encoder layers applied to reach hidden_states[select_layer] ([0] = the embeddings)."""
        return self.num_hidden_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer

    def validate(self) -> "ClipVisionConfig":
        if self.hidden_act != "quick_gelu":
            raise ShowoConfigError(f"vision tower uses {self.hidden_act!r}; Show-o's CLIP tower uses quick_gelu")
        if self.hidden_size % self.num_attention_heads or self.image_size % self.patch_size:
            raise ShowoConfigError("vision tower config is inconsistent (hidden/heads or image/patch not divisible)")
        if not 0 <= self.layers_used <= self.num_hidden_layers:
            raise ShowoConfigError(f"select_layer {self.select_layer} outside a {self.num_hidden_layers}-layer tower")
        return self

    @classmethod
    def from_hub_dict(cls, d: Mapping[str, Any]) -> "ClipVisionConfig":
        """From a `CLIPVisionModel` config or a full `CLIPModel` config (its ``vision_config``)."""
        if d.get("model_type") == "clip" or "vision_config" in d:
            d = d.get("vision_config") or {}
        elif d.get("model_type") not in (None, "clip_vision_model"):
            raise ShowoConfigError(f"vision tower config describes a {d.get('model_type')!r}, not a CLIP vision model")
        names = {f.name for f in dataclasses.fields(cls)} - {"select_layer"}
        return cls(**{k: d[k] for k in names if k in d}).validate()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClipVisionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ShowoConfigError(f"unknown key(s) {unknown} in the vision config; re-convert the model")
        return cls(**d).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------

_PIL_FILTERS = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


@dataclass
class ClipImageProcessor:
    """`CLIPImageProcessor` settings; defaults are openai/clip-vit-large-patch14-336's."""

    shortest_edge: int = 336
    crop_height: int = 336
    crop_width: int = 336
    resample: int = 3  # PIL bicubic
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_hub_dict(cls, d: Mapping[str, Any]) -> "ClipImageProcessor":
        """From ``preprocessor_config.json`` (the legacy `CLIPFeatureExtractor` layout with integer
        ``size``/``crop_size`` as well as the dict layout)."""
        size = d.get("size", 336)
        edge = size.get("shortest_edge", 336) if isinstance(size, dict) else int(size)
        crop = d.get("crop_size", 336)
        ch, cw = (crop.get("height", 336), crop.get("width", 336)) if isinstance(crop, dict) else (int(crop), int(crop))
        kw: dict[str, Any] = dict(shortest_edge=edge, crop_height=ch, crop_width=cw)
        for key in ("resample", "rescale_factor", "do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if key in d:
                kw[key] = d[key]
        for key in ("image_mean", "image_std"):
            if key in d:
                kw[key] = tuple(float(v) for v in d[key])
        if kw.get("resample", 3) not in _PIL_FILTERS:
            raise ShowoConfigError(f"unknown resample filter {kw['resample']} in preprocessor_config.json")
        return cls(**kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClipImageProcessor":
        d = dict(d)
        for key in ("image_mean", "image_std"):
            d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """transformers' `get_resize_output_image_size(default_to_square=False)`: the short side becomes
        `shortest_edge`, the long side ``int(edge · long / short)`` (truncated)."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)

    def crop(self, image: Image.Image) -> np.ndarray:
        """RGB conversion, resize and centre crop → (H, W, 3) uint8 (the processor's state before
        rescaling)."""
        image = image.convert("RGB")
        if self.do_resize:
            size = self.resized_size(image.width, image.height)
            image = image.resize(size, _PIL_FILTERS[self.resample], reducing_gap=None)
        x = np.asarray(image, dtype=np.uint8)
        if self.do_center_crop:
            x = _center_crop(x, self.crop_height, self.crop_width)
        return x

    def normalize(self, cropped: np.ndarray) -> np.ndarray:
        """(…, H, W, 3) uint8 → float32: ``f32(f64(x) · factor)``, then ``(x − mean) / std`` in float32."""
        x = cropped.astype(np.float32)
        if self.do_rescale:
            x = (cropped.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One PIL image → (1, H, W, 3) float32 pixel values (channels-last)."""
        return self.normalize(self.crop(image))[None]


def _center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' `center_crop`: offsets ``(size − crop) // 2`` (floor), zero padding if the image
    is smaller than the crop."""
    h, w = x.shape[:2]
    if h < height or w < width:
        ph, pw = max(height, h), max(width, w)
        padded = np.zeros((ph, pw, x.shape[2]), dtype=x.dtype)
        top, left = (ph - h) // 2, (pw - w) // 2
        padded[top : top + h, left : left + w] = x
        x, h, w = padded, ph, pw
    top, left = (h - height) // 2, (w - width) // 2
    return x[top : top + height, left : left + width]


# --------------------------------------------------------------------------------------------------
# The tower
# --------------------------------------------------------------------------------------------------


def quick_gelu(x: mx.array) -> mx.array:
    """CLIP's activation: x · sigmoid(1.702 · x)."""
    return x * mx.sigmoid(1.702 * x)


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = mx.zeros((d,))
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, d)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patch_embedding(pixels)  # (B, grid, grid, D), row-major like torch's flatten(2)
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        cls = mx.broadcast_to(self.class_embedding.astype(x.dtype), (b, 1, x.shape[-1]))
        return mx.concatenate([cls, x], axis=1) + self.position_embedding.weight.astype(x.dtype)


class ClipAttention(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def __call__(self, x: mx.array) -> mx.array:
        b, n, _ = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # no mask in CLIP's tower
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class ClipMLP(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(quick_gelu(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    """Pre-LN block: x += attn(LN1(x)); x += mlp(LN2(x))."""

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipVisionTower(nn.Module):
    """Pixels (B, H, W, 3) → patch features (B, grid², D) of hidden_states[select_layer], CLS dropped."""

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.config = cfg.validate()
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, transformers' name
        self.layers = [ClipEncoderLayer(cfg) for _ in range(cfg.layers_used)]

    def hidden_states(self, pixels: mx.array) -> list[mx.array]:
        """[after pre_layrnorm, after layer 0, …] for the built layers (transformers' tuple, cut)."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        out = [x]
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.pre_layrnorm(self.embeddings(pixels.astype(self.embeddings.class_embedding.dtype)))
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:]  # select_feature="patch": the class token is dropped


def sanitize_clip_weights(weights: Mapping[str, Any], cfg: ClipVisionConfig) -> dict[str, np.ndarray]:
    """Official `CLIPModel`/`CLIPVisionModel` state dict → `ClipVisionTower` weights (see the module
    docstring). Call once, on official weights."""
    out: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        if not key.startswith("vision_model."):
            continue  # text tower, projections, logit_scale
        name = key[len("vision_model."):]
        if name.startswith("post_layernorm.") or name == "embeddings.position_ids":
            continue  # unused by hidden_states[-2]; position_ids is arange(577), a buffer
        if name.startswith("encoder.layers."):
            index = int(name.split(".")[2])
            if index >= cfg.layers_used:
                continue
            name = name[len("encoder."):]
        arr = np.asarray(value)
        if name == "embeddings.patch_embedding.weight" and arr.ndim == 4:
            arr = np.ascontiguousarray(arr.transpose(0, 2, 3, 1))  # OIHW → OHWI
        out[name] = arr
    return out


# --------------------------------------------------------------------------------------------------
# The projector
# --------------------------------------------------------------------------------------------------


class MMProjector(nn.Module):
    """`Showo.mm_projector`: Linear → GELU (erf) → Linear."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(x)))  # nn.gelu is the exact erf form (torch.nn.GELU())


def projector_keys(weights: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in weights.items() if k.startswith(PROJECTOR + ".")}


def sanitize_projector_weights(weights: Mapping[str, Any]) -> dict[str, Any]:
    """Official ``mm_projector.0.*`` / ``mm_projector.2.*`` (indices of the torch Sequential; 1 is the
    parameter-free GELU) → ``mm_projector.fc1.*`` / ``mm_projector.fc2.*``."""
    names = {"0": "fc1", "2": "fc2"}
    out = {}
    for key, value in weights.items():
        _, index, leaf = key.split(".", 2)
        if index not in names:
            raise CheckpointError(f"unexpected projector tensor {key!r}; expected mm_projector.0.* and mm_projector.2.*")
        out[f"{PROJECTOR}.{names[index]}.{leaf}"] = value
    return out


def projector_shape(weights: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """(in, hidden, out) read from float ``mm_projector.fc1/fc2.weight`` ((out, in) like torch), or
    None when the weights hold no projector. Converted folders also record it in config.json
    (quantized weights are packed, so their shapes no longer give the input width)."""
    w1, w2 = weights.get(f"{PROJECTOR}.fc1.weight"), weights.get(f"{PROJECTOR}.fc2.weight")
    if w1 is None or w2 is None:
        return None
    if int(w2.shape[1]) != int(w1.shape[0]):
        raise CheckpointError(f"mm_projector shapes {tuple(w1.shape)} and {tuple(w2.shape)} do not chain; re-download the checkpoint")
    return int(w1.shape[1]), int(w1.shape[0]), int(w2.shape[0])


def attach_projector(model: nn.Module, shape: tuple[int, int, int] | None) -> None:
    """Give the transformer its `mm_projector` submodule (w_clip_vit models), before loading weights."""
    if shape is not None:
        model.mm_projector = MMProjector(*shape)


# --------------------------------------------------------------------------------------------------
# The whole understanding encoder
# --------------------------------------------------------------------------------------------------


class VisionEncoder:
    """Processor + tower of a converted folder: PIL image → CLIP patch features (1, 576, D)."""

    def __init__(self, tower: ClipVisionTower, processor: ClipImageProcessor):
        self.tower, self.processor = tower, processor

    def pixels(self, image: Image.Image) -> mx.array:
        return mx.array(self.processor(image))

    def __call__(self, image: Image.Image) -> mx.array:
        return self.tower(self.pixels(image))


def read_hub_vision(folder: Path) -> tuple[ClipVisionConfig, ClipImageProcessor]:
    """Config and processor of a downloaded vision tower (config.json + preprocessor_config.json)."""
    def load(name: str, required: bool) -> dict:
        path = folder / name
        if not path.exists():
            if required:
                raise ShowoConfigError(f"{path} not found; pass the folder of {DEFAULT_VISION_TOWER} to --vision-tower")
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ShowoConfigError(f"{path} is not valid JSON ({e.msg}); re-download the vision tower") from None

    cfg = ClipVisionConfig.from_hub_dict(load("config.json", True))
    processor = ClipImageProcessor.from_hub_dict(load("preprocessor_config.json", False))
    return cfg, processor


# --------------------------------------------------------------------------------------------------
# Conversion and loading (called by convert.py and loading.py)
# --------------------------------------------------------------------------------------------------


def resolve_vision_source(source: str | Path) -> Path:
    """A local folder holding the vision tower: `source` itself, or its Hub snapshot (safetensors
    preferred; the torch .bin only when the repository has no safetensors). A failure names the fix."""
    from .checkpoint_io import find_weight_files
    from .errors import ShowoError
    from .hub import download, resolve_source

    fix = (f"download {DEFAULT_VISION_TOWER} (or another CLIP ViT) and pass its folder with "
           "`showo convert SRC DST --vision-tower PATH`")
    try:
        folder = resolve_source(source, kind="vision")
        try:
            find_weight_files(folder)
        except CheckpointError:
            if Path(str(source)).expanduser().exists():
                raise
            folder = download(str(source), "vision_bin")
            find_weight_files(folder)
    except ShowoError as e:
        reason = str(e).split(";")[0]
        raise ShowoError(f"the CLIP vision tower {source} is not available ({reason}); this checkpoint "
                         f"answers through it: {fix}") from None
    return folder


def convert_vision_tower(folder: Path, *, dtype: mx.Dtype, quantize=None) -> tuple[dict[str, Any], dict[str, mx.array]]:
    """Official vision tower folder → (config block for config.json, weights to save)."""
    from mlx.utils import tree_flatten

    from .checkpoint_io import iter_checkpoint
    from .convert import check_complete, quantize_transformer

    cfg, processor = read_hub_vision(folder)
    keep = lambda k: k.startswith("vision_model.")  # noqa: E731 - the text tower is never read
    weights = sanitize_clip_weights(dict(iter_checkpoint(folder, select=keep)), cfg)
    tower = ClipVisionTower(cfg)
    check_complete(tower, weights, str(folder))
    tower.load_weights([(k, mx.array(v).astype(dtype)) for k, v in weights.items()])
    block: dict[str, Any] = {"model": cfg.to_dict(), "processor": processor.to_dict(),
                             "dtype": _dtype_name(dtype), "file": VISION_FILE}
    if quantize is not None:
        block["quantization"] = quantize_transformer(tower, quantize)
    return block, dict(tree_flatten(tower.parameters()))


def _dtype_name(dtype: mx.Dtype) -> str:
    return {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[dtype]


def projector_shape_of(config: Mapping[str, Any], weights: Mapping[str, Any]) -> tuple[int, int, int] | None:
    recorded = config.get("vision", {}).get("projector")
    return tuple(recorded) if recorded else projector_shape(weights)


def load_vision(folder: Path, config: Mapping[str, Any], *, dtype: str | None = None) -> VisionEncoder:
    """The CLIP tower and processor of a converted folder."""
    from .convert import DTYPES, apply_quantization_block

    block = config.get("vision")
    if not block:
        raise ShowoConfigError(
            f"{folder} is a w_clip_vit model without its CLIP vision tower; re-convert it with "
            f"`showo convert SRC DST --vision-tower {DEFAULT_VISION_TOWER}`"
        )
    path = Path(folder) / block.get("file", VISION_FILE)
    try:
        check_safetensors(path)  # a malformed header is refused before MLX reads it
        weights = mx.load(str(path))
    except CheckpointError:
        raise
    except Exception as e:  # missing or unreadable file: one line
        raise CheckpointError(f"{path} cannot be read ({' '.join(str(e).split())[:120]}); re-run `showo convert`") from None
    tower = ClipVisionTower(ClipVisionConfig.from_dict(block["model"]))
    if block.get("quantization"):
        apply_quantization_block(tower, block["quantization"], weights)
    if dtype is not None:
        weights = {k: (v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    try:
        tower.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: weights do not match the vision config ({str(e).splitlines()[0]}); re-convert") from None
    tower.eval()
    mx.eval(tower.parameters())
    return VisionEncoder(tower, ClipImageProcessor.from_dict(block["processor"]))
