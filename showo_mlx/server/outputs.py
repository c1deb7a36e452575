"""PNG bytes for responses (with the CLI's metadata) and the output folder behind `url` responses."""

from __future__ import annotations

import base64
import io
import re
import secrets
import time
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ..images import save_png

OUTPUT_NAME = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{12}\.png$")  # what save_output creates


def png_bytes(image: Image.Image, metadata: dict[str, str] | None = None) -> bytes:
    """The image as PNG with `metadata` as text chunks, as `images.save_png` writes them."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def save_output(folder: Path, image: Image.Image, metadata: dict[str, str]) -> str:
    """Write the PNG atomically into `folder` under a fresh unguessable name; returns the name."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(6)}.png"
    save_png(image, folder / name, metadata)
    return name


def preview_image(decoded: Image.Image, masked: np.ndarray) -> Image.Image:
    """A MaskGIT state made visible: the decoded window with still-masked token cells greyed,
    so a preview shows which part of the picture is settled."""
    pixels = np.asarray(decoded, dtype=np.float32)
    gh, gw = masked.shape
    cell_h, cell_w = pixels.shape[0] // gh, pixels.shape[1] // gw
    grey = np.kron(masked.astype(np.float32), np.ones((cell_h, cell_w), np.float32))[..., None]
    out = pixels * (1 - 0.75 * grey) + 128 * 0.75 * grey
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
