"""MAGVIT-v2 image tokenizer: encoder, lookup-free quantizer (LFQ) and decoder (official
`models/modeling_magvitv2.py`: `VQGANEncoder`, `LFQuantizer`, `VQGANDecoder`; blocks from
`models/common_modules.py`).

Layout: MLX convolutions are channels-last, so every image tensor here is **NHWC** -- pixels in are
``(B, H, W, 3)`` floats in [-1, 1], pixels out are ``(B, H, W, 3)`` (unclamped), latents are
``(B, h, w, bits)``. NCHW input is refused with an error rather than guessed.

Parameter names follow the official ``models/modeling_magvitv2.py`` state_dict one to one
(``encoder.down.1.block.0.nin_shortcut.weight`` ...), so :func:`sanitize_magvit_weights` only has to
transpose conv kernels (OIHW -> OHWI) and drop the quantizer's constant buffers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .checkpoint_io import check_safetensors
from .config import MagvitCoderConfig, MagvitConfig, read_json
from .errors import CheckpointError

__all__ = [
    "MagvitV2",
    "sanitize_magvit_weights",
    "load_magvit_folder",
    "load_magvit_weights",
]


# --------------------------------------------------------------------------------------------------
# Building blocks (common_modules.py)
# --------------------------------------------------------------------------------------------------


def _norm(channels: int, cfg: MagvitConfig) -> nn.GroupNorm:
    # pytorch_compatible: PyTorch groups *consecutive* channels; MLX's default grouping interleaves.
    return nn.GroupNorm(cfg.num_groups, channels, eps=cfg.norm_eps, pytorch_compatible=True)


class ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(swish(GN2(conv1(swish(GN1(x))))))``; 1x1 ``nin_shortcut`` if C changes."""

    def __init__(self, in_ch: int, out_ch: int, cfg: MagvitConfig):
        super().__init__()
        self.norm1 = _norm(in_ch, cfg)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, cfg)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "nin_shortcut" in self:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with 1x1-conv projections."""

    def __init__(self, channels: int, cfg: MagvitConfig):
        super().__init__()
        self.norm = _norm(channels, cfg)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = self.norm(x)
        # (B, 1 head, H*W, C): the reference's bmm/softmax/bmm is exactly one-head SDPA.
        q, k, v = (proj(y).reshape(b, 1, h * w, c) for proj in (self.q, self.k, self.v))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=c**-0.5)
        return x + self.proj_out(out.reshape(b, h, w, c))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then 3x3 stride-2 conv without padding (exact halving)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return self.conv(x.reshape(b, 2 * h, 2 * w, c))


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: MagvitConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg)
        self.attn_1 = AttnBlock(channels, cfg)
        self.block_2 = ResnetBlock(channels, channels, cfg)

    def __call__(self, x: mx.array) -> mx.array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block.{i}`` ResnetBlocks then an optional resampler.

    ``resample`` is stored under the official attribute name (``downsample`` / ``upsample``)."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, cfg: MagvitConfig, resample: str | None):
        super().__init__()
        self.block = [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, cfg) for i in range(n_blocks)]
        if resample == "down":
            self.downsample = Downsample(out_ch)
        elif resample == "up":
            self.upsample = Upsample(out_ch)

    def __call__(self, x: mx.array) -> mx.array:
        for blk in self.block:
            x = blk(x)
        if "downsample" in self:
            x = self.downsample(x)
        if "upsample" in self:
            x = self.upsample(x)
        return x


# --------------------------------------------------------------------------------------------------
# Encoder / decoder (modeling_magvitv2.py)
# --------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """conv_in -> levels (downsample after all but the last) -> mid -> GN, swish, conv_out -> quant_conv."""

    def __init__(self, c: MagvitCoderConfig, cfg: MagvitConfig):
        super().__init__()
        n = len(c.ch_mult)
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        in_mult = (1,) + tuple(c.ch_mult)
        self.down = [
            Level(c.ch * in_mult[i], c.ch * c.ch_mult[i], c.num_res_blocks[i], cfg, "down" if i < n - 1 else None)
            for i in range(n)
        ]
        top = c.ch * c.ch_mult[-1]
        self.mid = MidBlock(top, cfg)
        self.norm_out = _norm(top, cfg)
        self.conv_out = nn.Conv2d(top, c.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        x = self.conv_out(nn.silu(self.norm_out(x)))
        return self.quant_conv(x)


class Decoder(nn.Module):
    """post_quant_conv -> conv_in -> mid -> levels from the top (``up.{n-1}`` first; upsample after
    all but ``up.0``) -> GN, swish, conv_out. No tanh: the output is unbounded."""

    def __init__(self, c: MagvitCoderConfig, cfg: MagvitConfig):
        super().__init__()
        n = len(c.ch_mult)
        top = c.ch * c.ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)
        self.conv_in = nn.Conv2d(c.z_channels, top, 3, padding=1)
        self.mid = MidBlock(top, cfg)
        # Stored in level order (up.0 .. up.{n-1}) so parameter paths match the official names; each
        # level's input width is the output width of the level above it.
        out_ch = [c.ch * m for m in c.ch_mult]
        in_ch = out_ch[1:] + [top]
        self.up = [
            Level(in_ch[i], out_ch[i], c.num_res_blocks[i], cfg, "up" if i > 0 else None) for i in range(n)
        ]
        self.norm_out = _norm(out_ch[0], cfg)
        self.conv_out = nn.Conv2d(out_ch[0], c.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.conv_in(self.post_quant_conv(z))
        x = self.mid(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(nn.silu(self.norm_out(x)))


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------


class MagvitV2(nn.Module):
    """MAGVIT-v2: ``encode`` pixels -> LFQ codes, ``decode`` codes -> pixels (NHWC throughout).

    ``with_encoder=False`` builds the decoder only (all that text-to-image generation needs; saves
    about half the weights). ``dtype`` is the compute dtype: parameters are cast to it by the loader
    and inputs are cast to it here; outputs are returned as float32.
    """

    def __init__(self, config: MagvitConfig | None = None, with_encoder: bool = True):
        super().__init__()
        self.config = config = config or MagvitConfig()
        if config.encoder.z_channels != config.codebook_bits or config.decoder.z_channels != config.codebook_bits:
            raise ValueError(
                f"LFQ needs z_channels == codebook_bits ({config.codebook_bits}); got encoder "
                f"{config.encoder.z_channels}, decoder {config.decoder.z_channels}"
            )
        if with_encoder:
            self.encoder = Encoder(config.encoder, config)
        self.decoder = Decoder(config.decoder, config)

    # -- properties -------------------------------------------------------------------------------

    @property
    def has_encoder(self) -> bool:
        return "encoder" in self

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _bit_weights(self) -> mx.array:
        # Channel 0 is the most significant bit (power 2^(bits-1)), channel bits-1 the least.
        bits = self.config.codebook_bits
        return mx.array([1 << (bits - 1 - c) for c in range(bits)], dtype=mx.int32)

    # -- encoding ---------------------------------------------------------------------------------

    def encode_latents(self, pixels: mx.array) -> mx.array:
        """Continuous latent before LFQ: ``(B, H, W, 3)`` in [-1, 1] -> ``(B, H/16, W/16, bits)``
        float32 (the reference's ``encoder(x)``, NHWC)."""
        if not self.has_encoder:
            raise RuntimeError("this MagvitV2 was built decoder-only (with_encoder=False); it cannot encode")
        pixels = mx.array(pixels)
        c = self.config.encoder.in_channels
        if pixels.ndim != 4 or pixels.shape[-1] != c:
            raise ValueError(
                f"pixels must be NHWC (B, H, W, {c}); got shape {tuple(pixels.shape)}"
                + (" (looks like NCHW: transpose with (0, 2, 3, 1))" if pixels.ndim == 4 and pixels.shape[1] == c else "")
            )
        return self.encoder(pixels.astype(self.dtype)).astype(mx.float32)

    def quantize(self, latents: mx.array) -> mx.array:
        """LFQ on ``(B, h, w, bits)`` latents -> int32 codes ``(B, h*w)`` row-major.

        ``z > 0`` is bit 1 and ``z <= 0`` (exact zero included) is bit 0; channel 0 is the most
        significant bit (`models/modeling_magvitv2.py`, `LFQuantizer`)."""
        b, h, w, bits = latents.shape
        on = (latents > 0).astype(mx.int32)
        return mx.sum(on * self._bit_weights(), axis=-1).reshape(b, h * w)

    def encode(self, pixels: mx.array) -> mx.array:
        """``(B, H, W, 3)`` float pixels in [-1, 1] (NHWC) -> int32 codes ``(B, (H/16)*(W/16))``."""
        return self.quantize(self.encode_latents(pixels))

    # -- decoding ---------------------------------------------------------------------------------

    def _grid(self, n: int, shape: tuple[int, int] | None) -> tuple[int, int]:
        if shape is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"{n} codes do not form a square grid; pass shape=(h, w)")
            return side, side
        h, w = (int(s) for s in shape)
        if h * w != n:
            raise ValueError(f"shape {(h, w)} holds {h * w} codes, but {n} were given")
        return h, w

    def codebook_entry(self, codes: mx.array, shape: tuple[int, int] | None = None) -> mx.array:
        """Codes ``(B, N)`` -> ±1 latents ``(B, h, w, bits)`` float32 (no 1/sqrt(bits) scaling).

        ``shape=(h, w)`` gives the grid; ``None`` means square. Only the low ``bits`` bits of each
        code are read (the reference's bit-mask lookup)."""
        codes = mx.array(codes).astype(mx.int32)
        if codes.ndim == 1:
            codes = codes[None]
        b, n = codes.shape
        h, w = self._grid(n, shape)
        bits = self.config.codebook_bits
        shifts = mx.arange(bits - 1, -1, -1, dtype=mx.int32)
        on = mx.right_shift(codes[..., None], shifts) & 1
        return (on.astype(mx.float32) * 2 - 1).reshape(b, h, w, bits)

    def decode_latents(self, z: mx.array) -> mx.array:
        """``(B, h, w, bits)`` quantised latents -> pixels ``(B, 16h, 16w, 3)`` float32, unclamped."""
        return self.decoder(z.astype(self.dtype)).astype(mx.float32)

    def decode(self, codes: mx.array, shape: tuple[int, int] | None = None) -> mx.array:
        """Codes ``(B, N)`` (row-major over an ``(h, w)`` grid; square if ``shape`` is None) -> NHWC
        float32 pixels, nominally [-1, 1] but unclamped (use ``images.to_uint8``).

        Codes are clamped to ``[0, codebook_size - 1]`` first, as the official scripts do."""
        codes = mx.clip(mx.array(codes).astype(mx.int32), 0, self.config.codebook_size - 1)
        return self.decode_latents(self.codebook_entry(codes, shape))

    def __call__(self, pixels: mx.array) -> mx.array:
        """Reconstruction: encode, quantise, decode (square or not: the grid shape is kept)."""
        z = self.encode_latents(pixels)
        codes = self.quantize(z)
        return self.decode(codes, shape=z.shape[1:3])


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------

# Constant buffers of the official LFQuantizer; this port recomputes them from codebook_bits.
_DROPPED_PREFIXES = ("quantize.",)


def sanitize_magvit_weights(weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Official MAGVIT-v2 state_dict (numpy arrays, official key names) -> this module's weights.

    The parameter names are identical; the only changes are:
      * ``quantize.embedding`` / ``quantize.power_vals`` are dropped (constants, recomputed here);
      * every 4-D (conv) weight goes from PyTorch OIHW to MLX OHWI (transpose 0, 2, 3, 1).
    Call it exactly once, on official weights: converted (MLX) weights are already OHWI.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        if key.startswith(_DROPPED_PREFIXES):
            continue
        arr = np.asarray(value)
        if arr.ndim == 4:
            arr = np.ascontiguousarray(arr.transpose(0, 2, 3, 1))
        out[key] = arr
    return out


def load_magvit_weights(
    model: MagvitV2, weights: Mapping[str, Any], dtype: mx.Dtype = mx.float32
) -> MagvitV2:
    """Load already-sanitized weights (our names, OHWI convs) strictly, then cast to ``dtype``.

    For a decoder-only model the ``encoder.*`` entries are ignored; any other missing, unexpected or
    mis-shaped tensor raises :class:`CheckpointError`."""
    items = [
        (k, v if isinstance(v, mx.array) else mx.array(v))
        for k, v in weights.items()
        if model.has_encoder or not k.startswith("encoder.")
    ]
    try:
        model.load_weights(items, strict=True)
    except ValueError as e:
        msg = " ".join(str(e).split())
        raise CheckpointError(f"MAGVIT-v2 weights do not match the config: {msg[:300]}") from None
    model.set_dtype(dtype)  # floating-point parameters only
    mx.eval(model.parameters())
    return model


def load_magvit_folder(
    source: str | Path | Mapping[str, Any],
    config: MagvitConfig | None = None,
    dtype: mx.Dtype = mx.float32,
    with_encoder: bool = True,
) -> MagvitV2:
    """Build a :class:`MagvitV2` and load its weights.

    ``source`` is one of:
      * an **official** folder (``config.json`` with ``_class_name: MAGVITv2`` and
        ``pytorch_model.safetensors``): the weights go through :func:`sanitize_magvit_weights`;
      * a **converted** folder (``config.json`` = ``MagvitConfig.to_dict()`` and
        ``model.safetensors`` with our names and OHWI convs): loaded as is;
      * a dict of already-sanitized arrays (then ``config`` is required).
    The folder's config.json decides which format it is; nothing is guessed from tensor shapes.
    """
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("load_magvit_folder(weights_dict) needs config=")
        return load_magvit_weights(MagvitV2(config, with_encoder=with_encoder), source, dtype)

    folder = Path(source)
    raw = read_json(folder / "config.json")
    official = "_class_name" in raw
    if config is None:
        config = MagvitConfig.from_hub_dict(raw) if official else MagvitConfig.from_dict(raw)
    name = "pytorch_model.safetensors" if official else "model.safetensors"
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{path} not found; is {folder} a MAGVIT-v2 folder?")
    if not official:
        check_safetensors(path)  # mx.load itself accepts overlapping or out-of-range headers

    def wanted(key: str) -> bool:  # a decoder-only model never reads the encoder's tensors
        return with_encoder or not key.startswith("encoder.")

    try:
        if official:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                weights = sanitize_magvit_weights({k: f.get_tensor(k) for k in f.keys() if wanted(k)})
        else:
            weights = {k: v for k, v in mx.load(str(path)).items() if wanted(k)}
    except Exception as e:  # safetensors / mlx raise their own error types on corrupt files
        fix = "re-download it" if official else "re-convert the model"
        raise CheckpointError(f"cannot read {path}: {' '.join(str(e).split())}; {fix}") from None
    return load_magvit_weights(MagvitV2(config, with_encoder=with_encoder), weights, dtype)
