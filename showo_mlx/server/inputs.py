"""Images that arrive with requests: data: URIs, local paths, http(s) URLs (opt-in) and multipart
uploads, read exactly as the CLI reads a file (`images.load_image`: EXIF orientation, alpha dropped
as the reference does, 16-bit reduced) after a size check that happens before any pixel is decoded.

Masks follow OpenAI's convention when they have an alpha channel (transparent = repaint) and the
CLI's otherwise (white = repaint)."""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageInputError
from ..images import load_image, load_mask
from .errors import APIError, bad_request

REMOTE_TIMEOUT = 10.0  # seconds for one http(s) image download


class ImageReader:
    def __init__(self, max_pixels: int, max_bytes: int, allow_remote: bool = False, allow_local: bool = True):
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.allow_remote = allow_remote
        self.allow_local = allow_local

    # -- sources -------------------------------------------------------------------------------
    def from_url(self, url: str, param: str) -> Image.Image:
        """An `image_url` of a chat message: data: URI, local path (or file:// URL), http(s) URL."""
        if not isinstance(url, str) or not url.strip():
            raise bad_request("image_url.url is empty; send a data: URI, a local path or an http(s) URL", param)
        url = url.strip()
        if url.startswith("data:"):
            return self.from_bytes(_data_uri_bytes(url, param), param)
        if url.startswith(("http://", "https://")):
            if not self.allow_remote:
                raise bad_request(
                    "remote image URLs are off; send the image as a data: URI or start the server with --allow-remote-images",
                    param, "remote_images_disabled")
            return self.from_bytes(self._download(url, param), param)
        path = url[len("file://"):] if url.startswith("file://") else url
        if "://" in path:
            raise bad_request(f"unsupported image URL scheme in {url[:40]!r}; use data:, a path or http(s)", param)
        if not self.allow_local:
            raise bad_request("local image paths are off on this server; send a data: URI", param)
        return self.from_path(Path(os.path.expanduser(path)), param)

    def from_path(self, path: Path, param: str) -> Image.Image:
        self._check_pixels(lambda: Image.open(path), param, missing_ok=True)
        return _read_as_cli(lambda: load_image(path), param, str(path))

    def from_bytes(self, data: bytes, param: str, mask: bool = False) -> Image.Image:
        """Uploaded bytes → an RGB image as the CLI would read the same file (or, with `mask`, an
        "L" mask with white = repaint)."""
        if not data:
            raise bad_request(f"{param} is empty", param, "invalid_image")
        if len(data) > self.max_bytes:
            raise APIError(413, f"{param} is {len(data)} bytes; the limit is {self.max_bytes}", param=param, code="image_too_large")
        self._check_pixels(lambda: Image.open(io.BytesIO(data)), param)
        if mask:
            alpha = _alpha_mask(data)
            if alpha is not None:
                return alpha
        # load_image reads files: the bytes go to a private temporary file so that the CLI's exact
        # reading (EXIF, alpha, bit depth) applies.
        with tempfile.TemporaryDirectory(prefix="showo-upload-") as folder:
            path = Path(folder) / "upload"
            path.write_bytes(data)
            return _read_as_cli(lambda: (load_mask if mask else load_image)(path), param, str(path))

    # -- helpers -------------------------------------------------------------------------------
    def _check_pixels(self, opener, param: str, missing_ok: bool = False) -> None:
        """Reject oversized images from their header, before decoding a single pixel."""
        try:
            with opener() as im:
                w, h = im.size
        except FileNotFoundError:
            if missing_ok:
                return  # load_image reports it in the CLI's words
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
            return  # not readable: load_image gives the precise one-line reason
        except Image.DecompressionBombError:
            w = h = self.max_pixels + 1
        if w * h > self.max_pixels:
            raise bad_request(
                f"{param} is {w}x{h} = {w * h} pixels; this server accepts at most {self.max_pixels} (--max-image-pixels)",
                param, "image_too_large")

    def _download(self, url: str, param: str) -> bytes:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "showo-mlx"}), timeout=REMOTE_TIMEOUT) as r:
                data = r.read(self.max_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise bad_request(f"could not download {url[:80]}: {getattr(e, 'reason', e)}", param, "image_download_failed") from None
        if len(data) > self.max_bytes:
            raise APIError(413, f"{url[:80]} is over {self.max_bytes} bytes", param=param, code="image_too_large")
        return data


def _data_uri_bytes(url: str, param: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or ";base64" not in head:
        raise bad_request("image data: URIs must be base64 (data:image/png;base64,...)", param, "invalid_image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the image data: URI is not valid base64", param, "invalid_image") from None


def _read_as_cli(read, param: str, shown_path: str) -> Image.Image:
    try:
        return read()
    except ImageInputError as e:
        message = str(e).replace(shown_path, param)
        raise bad_request(message, param, "invalid_image") from None


def _alpha_mask(data: bytes) -> Image.Image | None:
    """OpenAI's mask convention: fully or mostly transparent pixels (alpha < 128) are repainted.
    Returns the mask as the CLI's "L" convention (255 = repaint), or None without an alpha channel."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in im.info:
                return None
            alpha = np.asarray(im.convert("RGBA").getchannel("A"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return None  # the CLI's reader reports it
    return Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8), mode="L")
