"""Image I/O and the reference-exact pixel transforms around MAGVIT-v2: the official
`training/utils.py`, `image_transform`, and `inference_t2i.py`'s post-processing and inpainting-mask
downsampling.

Conventions:
  * Arrays are numpy and channels-last: preprocessed pixels are ``(1, R, R, C)`` float32 (NHWC, one
    image; ``np.concatenate`` them for a batch), ready for ``MagvitV2.encode``.
  * ``load_image`` returns a PIL image in the requested mode ("RGB" for pictures, "L" for masks). What
    it had to change (alpha dropped, 16-bit reduced, EXIF rotation, ...) is logged on the
    ``showo_mlx.images`` logger and listed in ``image.info["showo_mlx.notes"]``.
  * Transparency: like the official scripts (``Image.open(p).convert("RGB")``) the alpha channel is
    **dropped** by default, so results match the reference bit for bit; ``alpha="white"`` composites
    on white instead.
  * Size: a file over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` x 2, 179 M
    pixels by default) is refused before decoding; between the limit and twice it the image is
    decoded with a note (Pillow's multi-line warning is not shown). A very elongated image is
    resized only inside the centre crop (:func:`resize_and_crop`), so a 1x50000 strip costs no more
    than a square.
"""

from __future__ import annotations

import logging
import math
import io
import os
import secrets
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import ImageInputError

__all__ = [
    "NOTES_KEY",
    "load_image",
    "load_mask",
    "fit_mask",
    "normalize_mode",
    "resize_and_crop",
    "preprocess_image",
    "preprocess_mask",
    "bicubic_resize",
    "mask_to_grid",
    "mask_tokens",
    "to_uint8",
    "save_png",
    "read_png_metadata",
]

log = logging.getLogger(__name__)

NOTES_KEY = "showo_mlx.notes"
_ALPHA_MODES = {"RGBA", "LA", "RGBa", "La", "PA"}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _reduce_high_bit_depth(im: Image.Image, notes: list[str]) -> Image.Image:
    """16-bit / 32-bit / float greyscale -> 8-bit "L". Pillow's own conversion clips at 255 instead
    of rescaling, which would turn almost every 16-bit image white.

    * 16-bit (``I;16*``, or ``I`` with values in [0, 65535] above 255): ``round(v * 255 / 65535)``.
    * ``I`` with values in [0, 255]: kept. Float in [0, 1]: ``round(v * 255)``; in [0, 255]: rounded.
    * Anything else (32-bit integers beyond 16 bits or negative, floats beyond [0, 255]): scaled
      from the image's own value range [min, max] to [0, 255], as image viewers show such data.
      NaN pixels become black, +inf white, -inf black (counted in the note)."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = (a.astype(np.uint32) * 255 + 32767) // 65535  # exact: max 16,744,192 fits 32 bits
        notes.append(f"{im.mode} image reduced from 16 to 8 bits per channel")
        return Image.fromarray(out.astype(np.uint8), mode="L")
    kind = "float" if im.mode == "F" else "32-bit integer"
    finite = np.isfinite(a) if im.mode == "F" else None
    values = a[finite] if finite is not None and not finite.all() else a
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    bad = 0 if finite is None else int(a.size - np.count_nonzero(finite))
    if im.mode == "I" and 0 <= lo and hi <= 255:
        out = a.astype(np.uint8)
    elif im.mode == "I" and 0 <= lo and hi <= 65535:
        out = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        notes.append("I image with values in [0, 65535] treated as 16-bit and reduced to 8 bits")
    else:
        if im.mode == "F" and 0 <= lo and hi <= 1.0:
            low, scale, what = 0.0, 255.0, "scaled from [0, 1] to 8 bits"
        elif im.mode == "F" and 0 <= lo and hi <= 255.0:
            low, scale, what = 0.0, 1.0, "with values in [0, 255] rounded to 8 bits"
        elif hi > lo:
            low, scale, what = lo, 255.0 / (hi - lo), f"scaled from its value range [{lo:g}, {hi:g}] to 8 bits"
        else:  # a single value outside [0, 255]: black below, white above
            low, scale, what = 0.0, 1.0, f"with the single value {lo:g} clipped to 8 bits"
        x = a.astype(np.float32)  # in place from here: 4 bytes per pixel however large the image
        if bad:
            np.nan_to_num(x, copy=False, nan=low, posinf=np.inf, neginf=-np.inf)
        x -= np.float32(low)
        x *= np.float32(scale)
        x += np.float32(0.5)
        np.clip(x, 0, 255, out=x)
        out = x.astype(np.uint8)
        note = f"{kind} image {what}"
        if bad:
            note += f"; {bad} NaN/infinite pixels (NaN and -inf as black, +inf as white)"
        notes.append(note)
    return Image.fromarray(out, mode="L")


def normalize_mode(image: Image.Image, mode: str = "RGB", alpha: str = "drop") -> Image.Image:
    """Bring any Pillow image to ``mode`` ("RGB" or "L") the way the reference does (``convert``),
    with fixes for what ``convert`` gets wrong (high bit depths) and an alpha policy.

    The notes describing each change are stored in ``image.info[NOTES_KEY]`` of the result."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    if alpha not in ("drop", "white"):
        raise ValueError(f"alpha must be 'drop' or 'white', not {alpha!r}")
    notes = list(image.info.get(NOTES_KEY, []))
    im = image
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _reduce_high_bit_depth(im, notes)
    if im.mode in _ALPHA_MODES:
        if alpha == "white":
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, rgba)
            notes.append("transparency composited on white")
        else:
            notes.append("alpha channel dropped (as the reference's convert('RGB') does)")
    elif im.mode == "P" and mode == "RGB":
        notes.append("palette image expanded to RGB")
    if im.mode != mode:
        if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "1"):
            notes.append(f"{im.mode} image converted to {mode}")
        try:
            im = im.convert(mode)
        except ValueError as e:  # exotic modes Pillow cannot convert directly (e.g. "La")
            raise ImageInputError(f"cannot convert a {im.mode} image to {mode} ({_one_line(e)})") from None
    else:
        im = im.copy()
    im.info[NOTES_KEY] = notes
    return im


def _open(path: str | os.PathLike | bytes, notes: list[str] | None = None, name: str | None = None) -> Image.Image:
    """Open and fully decode ``path`` (a file, or the bytes of one named ``name``, e.g. a tar
    member); every failure becomes a one-line ImageInputError.

    The size is known from the header before anything is decoded: over twice
    ``PIL.Image.MAX_IMAGE_PIXELS`` Pillow refuses (an error naming the limit here); between the
    limit and twice it Pillow only warns, and that multi-line warning becomes one note."""
    in_memory = isinstance(path, (bytes, bytearray))
    p = Path(name or "image") if in_memory else Path(path)
    if not in_memory and not p.exists():
        raise ImageInputError(f"{p}: no such file")
    if not in_memory and p.is_dir():
        raise ImageInputError(f"{p} is a directory, not an image file")
    try:
        if (len(path) if in_memory else p.stat().st_size) == 0:
            raise ImageInputError(f"{p} is empty (0 bytes); not an image")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(path) if in_memory else p)  # reads the header only
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.width * im.height > limit and notes is not None:
                notes.append(
                    f"large image: {im.width}x{im.height} = {im.width * im.height:,} pixels, over Pillow's "
                    f"{limit:,}-pixel decompression-bomb warning limit (decoded anyway; the hard limit is {2 * limit:,})"
                )
            im.load()  # decode now: truncated data only shows up here
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError(f"{p} is not an image file Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ImageInputError(
            f"{p} is too large to decode safely ({_one_line(e).removesuffix(' could be decompression bomb DOS attack.').rstrip(',')}); "
            "downscale it first (the limit is twice PIL.Image.MAX_IMAGE_PIXELS)"
        ) from None
    except PermissionError:
        raise ImageInputError(f"{p}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageInputError(f"{p} is truncated or corrupt ({_one_line(e)})") from None
    if im.width == 0 or im.height == 0:
        raise ImageInputError(f"{p} has zero size ({im.width}x{im.height})")
    return im


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _apply_exif_orientation(im: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # malformed EXIF must not make the picture unreadable
        return im
    if orientation in (None, 1):
        return im
    try:
        out = ImageOps.exif_transpose(im)
    except Exception as e:
        notes.append(f"EXIF orientation {orientation} ignored ({_one_line(e)})")
        return im
    notes.append(f"EXIF orientation {orientation} applied")
    return out


def load_image(path: str | os.PathLike | bytes, mode: str = "RGB", alpha: str = "drop", *, name: str | None = None) -> Image.Image:
    """Read any Pillow-readable file (or its bytes, named ``name`` in messages) as a PIL image in
    ``mode`` ("RGB"; "L" for masks).

    Applies the EXIF orientation, expands palettes, reduces 16-bit to 8-bit, and handles alpha per
    ``alpha`` ("drop": keep the colour channels, as the reference; "white": composite on white).
    Raises :class:`ImageInputError` (one line) for a missing, empty, non-image or truncated file."""
    notes: list[str] = []
    im = _open(path, notes, name)
    path = name if isinstance(path, (bytes, bytearray)) else path  # for the notes below
    im = _apply_exif_orientation(im, notes)
    im.info[NOTES_KEY] = notes
    im = normalize_mode(im, mode, alpha)
    for note in im.info[NOTES_KEY]:
        log.info("%s: %s", path, note)
    return im


def load_mask(path: str | os.PathLike) -> Image.Image:
    """An inpainting mask as 8-bit "L" (white = regenerate), read like the reference's
    ``convert('L')`` (alpha is ignored)."""
    return load_image(path, mode="L", alpha="drop")


def fit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask at the image's ``size`` (width, height), resized with nearest neighbour (a binary
    mask stays binary) and noted when it had another size.

    The reference preprocesses image and mask independently (resize + centre crop each): a mask of
    another aspect ratio is then cropped differently from the image and repaints somewhere else.
    Bringing it to the image's size first makes both crops the same; a mask of the image's size is
    returned unchanged, so the reference's result is kept exactly."""
    if mask.size == tuple(size):
        return mask
    notes = list(mask.info.get(NOTES_KEY, []))
    out = mask.resize(tuple(size), Image.NEAREST)
    notes.append(f"mask {mask.width}x{mask.height} resized to the image's {size[0]}x{size[1]} (nearest neighbour)")
    out.info[NOTES_KEY] = notes
    return out


# --------------------------------------------------------------------------------------------------
# Preprocessing (training/utils.py image_transform)
# --------------------------------------------------------------------------------------------------


def _resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """torchvision ``Resize(int)``: short side -> resolution, long side -> int(res * long / short)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resolution * long / short)  # Python float division, then truncation
    return (resolution, new_long) if width <= height else (new_long, resolution)


# Pillow's full resize of the short side to R allocates the whole resized image: past this many
# pixels (64 MiB of RGB; a 64:1 image at R = 512, 256:1 at R = 256) only the crop is resized.
FULL_RESIZE_MAX_PIXELS = 2**24


def resize_and_crop(image: Image.Image, resolution: int, notes: list[str] | None = None) -> Image.Image:
    """PIL bicubic resize of the short side to ``resolution`` (antialiased, as PIL always is), then
    torchvision's centre crop (offsets rounded half-to-even by Python's ``round``).

    A very elongated image (resized size over ``FULL_RESIZE_MAX_PIXELS``) is not resized whole — a
    1x50000 strip would become 128x6400000, 3.3 GB — but only inside the crop's box (Pillow's
    ``resize(box=...)``), with a note: the same filter over the same source pixels, though not
    bit-identical to the full resize (Pillow's box is float32 and its passes may run in another
    order)."""
    if image.width == 0 or image.height == 0:
        raise ImageInputError(f"image has zero size ({image.width}x{image.height})")
    size = _resized_size(image.width, image.height, resolution)
    top = int(round((size[1] - resolution) / 2.0))
    left = int(round((size[0] - resolution) / 2.0))
    crop = (left, top, left + resolution, top + resolution)
    if size == image.size:  # torchvision returns the image untouched when the size already matches
        return image.crop(crop)
    if size[0] * size[1] <= FULL_RESIZE_MAX_PIXELS:
        return image.resize(size, Image.BICUBIC).crop(crop)
    sx, sy = image.width / size[0], image.height / size[1]
    box = (crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy)
    if notes is not None:
        notes.append(
            f"very elongated image ({image.width}x{image.height}): only its centre square was resized "
            f"(the full {size[0]}x{size[1]} resize is skipped; pixels may differ slightly from the reference's)"
        )
    return image.resize((resolution, resolution), Image.BICUBIC, box=box)


def preprocess_image(
    image: Image.Image | np.ndarray, resolution: int, normalize: bool = True, notes: list[str] | None = None
) -> np.ndarray:
    """The reference ``image_transform``: resize + centre crop, ``/255`` and (if ``normalize``)
    ``(x - 0.5) / 0.5``. Returns ``(1, R, R, C)`` float32 (NHWC; C = 3 for RGB, 1 for L).

    ``image`` is a PIL image in "RGB" or "L" (see :func:`load_image`) or a uint8 HxW[xC] array.
    What had to be done differently from the reference is appended to ``notes``."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageInputError(f"array images must be uint8, got {image.dtype}")
        image = Image.fromarray(image)
    if image.mode not in ("RGB", "L"):
        image = normalize_mode(image, "RGB")
    x = np.asarray(resize_and_crop(image, resolution, notes), dtype=np.uint8)
    if x.ndim == 2:
        x = x[..., None]
    # float32 throughout, same operation order as ToTensor + Normalize: bit-identical to torch.
    x = x.astype(np.float32) / np.float32(255.0)
    if normalize:
        x = (x - np.float32(0.5)) / np.float32(0.5)
    return x[None]


def preprocess_mask(mask: Image.Image, resolution: int, notes: list[str] | None = None) -> np.ndarray:
    """Inpainting mask -> ``(1, R, R, 1)`` float32 in [0, 1] (``image_transform(normalize=False)``)."""
    if mask.mode != "L":
        mask = normalize_mode(mask, "L")
    return preprocess_image(mask, resolution, normalize=False, notes=notes)


# --------------------------------------------------------------------------------------------------
# Mask -> token grid (torch F.interpolate(mode="bicubic"), align_corners=False, no antialias)
# --------------------------------------------------------------------------------------------------

_CUBIC_A = -0.75  # PyTorch's bicubic constant (PIL uses -0.5)


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
    """Keys' cubic convolution weights of the taps at offsets -1, 0, 1, 2 for fraction ``t``."""
    a = _CUBIC_A

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) interpolation matrix of torch's non-antialiased bicubic along one axis.

    Source coordinate ``(i + 0.5) * n_in / n_out - 0.5``; the 4 taps around it are clamped to the
    border. For an exact factor f the taps sit at the block centre (f = 16: rows 16i+6..16i+9 with
    weights -0.09375, 0.59375, 0.59375, -0.09375)."""
    scale = n_in / n_out
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        real = scale * (i + 0.5) - 0.5
        idx = min(math.floor(real), n_in - 1)
        t = min(max(real - idx, 0.0), 1.0)
        for k, w in enumerate(_cubic_weights(t)):
            m[i, min(max(idx - 1 + k, 0), n_in - 1)] += w
    return m


def bicubic_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch ``F.interpolate(x, size, mode="bicubic", align_corners=False)`` on the two leading
    spatial axes of ``(..., H, W)``, computed separably in float64 and returned as float32."""
    x = np.asarray(x, dtype=np.float64)
    rows = _bicubic_matrix(x.shape[-2], size[0])
    cols = _bicubic_matrix(x.shape[-1], size[1])
    return (rows @ x @ cols.T).astype(np.float32)


def mask_to_grid(mask_pixels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(B, H, W, 1)`` or ``(B, H, W)`` mask in [0, 1] -> ``(B, h, w)`` float32 interpolated values
    (before thresholding; the reference's ``mask_interp``)."""
    m = np.asarray(mask_pixels)
    if m.ndim == 4:
        if m.shape[-1] != 1:
            raise ImageInputError(f"mask must have one channel, got shape {m.shape}")
        m = m[..., 0]
    return bicubic_resize(m, grid)


def mask_tokens(mask_pixels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Mask pixels -> ``(B, h*w)`` bool, row-major, True = token to regenerate (``>= 0.5``)."""
    interp = mask_to_grid(mask_pixels, grid)
    return (interp >= 0.5).reshape(interp.shape[0], -1)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def to_uint8(pixels: Any) -> np.ndarray:
    """Decoder output (any layout; NHWC in this project) -> uint8: ``clamp((x+1)/2, 0, 1) * 255`` in
    float32, then **truncation** (``astype``), exactly the official post-processing."""
    x = np.asarray(pixels, dtype=np.float32)
    x = np.clip((x + np.float32(1.0)) / np.float32(2.0), 0.0, 1.0) * np.float32(255.0)
    return x.astype(np.uint8)


def _png_info(metadata: Mapping[str, Any]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        key = str(key)
        if not 1 <= len(key) <= 79 or not key.isprintable():
            raise ValueError(f"PNG text key {key!r} must be 1-79 printable characters")
        # add_text writes tEXt, or iTXt (UTF-8) when the value is not Latin-1.
        info.add_text(key, value if isinstance(value, str) else str(value))
    return info


def save_png(image: np.ndarray | Image.Image, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write an ``(H, W, 3)`` / ``(H, W)`` uint8 image (or a PIL image) as PNG with ``metadata`` as
    text chunks (non-string values are written with ``str``). Atomic: the file is written next to
    the destination and moved into place with ``os.replace``, so readers never see half a PNG.
    Missing parent folders are created."""
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ValueError(f"save_png needs an (H, W[, C]) uint8 array, got {arr.dtype} {arr.shape}")
        image = Image.fromarray(arr)
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 lets the umask decide the final permissions (mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=_png_info(metadata or {}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def read_png_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks (tEXt / zTXt / iTXt) of a PNG as ``{key: value}`` strings."""
    im = _open(path)
    return {str(k): str(v) for k, v in getattr(im, "text", {}).items()}
