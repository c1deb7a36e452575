"""`showo prepare DATA OUT --model M`: encode every image to MAGVIT-v2 codes once.

Training then reads small integer arrays instead of decoding and encoding pictures at every step
(the MAGVIT encoder costs more than the tiny-batch transformer step on a laptop). Output:

    OUT/index.json          what was prepared (kind, resolution, tokens, counts, shards)
    OUT/codes-00000.npy     (n, N) uint16 codes of shard 0 (row-major code grid)
    OUT/meta-00000.jsonl    one line per row: {"key", "caption"} or {"key", "conversations"}
    OUT/clip-00000.npy      (n, 336, 336, 3) uint8: CLIPImageProcessor's resize + crop, for the mmu rows
                            of w_clip_vit models (their tower is frozen and runs at training time, as in
                            the official training/train_w_clip_vit.py); no codes without MAGVIT (--no-vq)

Streaming: images are read, encoded and written `batch_size` at a time and a shard is flushed every
`shard_size` rows, so memory does not grow with the dataset. The folder is built under a temporary
name and renamed into place at the end (fsutil.atomic_output_dir). Unreadable images, and images
without a caption, are skipped, counted and reported; captions are stored whole (the prompt builders
truncate them exactly like the reference). Training validates this output when it opens it (data.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..errors import ImageInputError, TrainingConfigError
from ..fsutil import atomic_output_dir, check_output_folder, has_json_marker
from ..images import preprocess_image
from .sources import iter_source

log_ = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "showo-prepared"
VERSION = 1
MAX_SKIP_REPORTS = 5
# MAGVIT's encoder memory grows with the pixel count; Show-o models use 256 or 512 px, and codes at
# any other size than the model's are refused by training anyway.
MAX_RESOLUTION = 1024


@dataclass
class PrepareResult:
    out: Path
    kind: str  # "captions" or "conversations"
    count: int
    skipped: int
    num_tokens: int
    resolution: int
    uncaptioned: int = 0  # images skipped because they have no caption


class _ShardWriter:
    """Accumulates rows and writes one (codes .npy, meta .jsonl) pair per `shard_size` rows."""

    def __init__(self, folder: Path, shard_size: int, dtype):
        self.folder, self.shard_size, self.dtype = folder, shard_size, dtype
        self.codes: list[np.ndarray] = []
        self.clip: list[np.ndarray] = []
        self.meta: list[dict] = []
        self.shards: list[dict] = []

    def add(self, codes: np.ndarray | None, meta: list[dict], clip: list[np.ndarray] | None = None) -> None:
        if codes is not None:
            self.codes.extend(codes)
        if clip is not None:
            self.clip.extend(clip)
        self.meta.extend(meta)
        while len(self.meta) >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> list[dict]:
        if self.meta:
            self._flush(len(self.meta))
        return self.shards

    def _flush(self, n: int) -> None:
        i = len(self.shards)
        codes_name, meta_name = f"codes-{i:05d}.npy", f"meta-{i:05d}.jsonl"
        shard = {"meta": meta_name, "count": n}
        if self.codes:
            np.save(self.folder / codes_name, np.stack(self.codes[:n]).astype(self.dtype))
            shard["codes"] = codes_name
        if self.clip:
            shard["clip"] = f"clip-{i:05d}.npy"
            np.save(self.folder / shard["clip"], np.stack(self.clip[:n]).astype(np.uint8))
        with open(self.folder / meta_name, "w", encoding="utf-8") as f:
            for m in self.meta[:n]:
                f.write(json.dumps(m, ensure_ascii=False) + "\n")
        self.shards.append(shard)
        del self.codes[:n], self.clip[:n], self.meta[:n]


def prepare(
    data: str,
    out: str | Path,
    *,
    model: str,
    resolution: int | None = None,
    kind: str | None = None,
    image_root: str | None = None,
    batch_size: int = 8,
    shard_size: int = 4096,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> PrepareResult:
    from ..config import ShowoConfig
    from ..loading import load_magvit, read_model_config, resolve_model

    if batch_size < 1 or shard_size < 1:
        raise TrainingConfigError("batch size and shard size must be at least 1")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or not 1 <= resolution <= MAX_RESOLUTION):
        raise TrainingConfigError(f"--resolution must be between 1 and {MAX_RESOLUTION} pixels, got {resolution!r}")
    folder = resolve_model(model, log=log)
    check_output_folder(out, force=force, inputs=(data, image_root, model, folder), command="`showo prepare`",
                        is_previous_output=lambda p: has_json_marker(p, INDEX, "format", FORMAT))
    config = read_model_config(folder)
    cfg = ShowoConfig.from_dict(config["showo"])
    # w_clip_vit models also keep CLIP's crop of every image; a folder without MAGVIT keeps only that.
    clip = None
    if cfg.w_clip_vit:
        from ..vision import ClipImageProcessor

        if "vision" not in config:
            raise TrainingConfigError(f"{folder} is a w_clip_vit model without its vision tower; re-convert it with --vision-tower")
        clip = ClipImageProcessor.from_dict(config["vision"]["processor"])
    vq = load_magvit(folder, config, with_encoder=True) if (clip is None or "magvit" in config) else None
    num_tokens, codebook, dtype = 0, 0, np.uint16
    if vq is not None:
        factor = vq.downsample_factor
        resolution = resolution or cfg.image_grid[0] * factor
        if resolution % factor:
            raise TrainingConfigError(f"resolution {resolution} is not a multiple of MAGVIT's {factor}")
        num_tokens, codebook = (resolution // factor) ** 2, vq.config.codebook_size
        if num_tokens != cfg.num_vq_tokens:
            log(f"warning: {resolution} px gives {num_tokens} tokens but the model uses {cfg.num_vq_tokens}; "
                "training this model on these codes will be refused")
        dtype = np.uint16 if codebook <= 65536 else np.int32
    source_kind, samples = iter_source(data, kind, image_root)
    row_kind = "conversations" if source_kind == "llava" else "captions"

    count = skipped = uncaptioned = 0
    bar = _progress(progress)
    with atomic_output_dir(out, force=force) as tmp:
        writer = _ShardWriter(tmp, shard_size, dtype)
        pixels: list[np.ndarray] = []
        crops: list[np.ndarray] = []
        metas: list[dict] = []

        def flush() -> None:
            codes = None
            if vq is not None:
                codes = vq.encode(mx.array(np.concatenate(pixels)))
                mx.eval(codes)
                codes = np.array(codes)
            writer.add(codes, list(metas), list(crops) if clip is not None else None)
            pixels.clear()
            crops.clear()
            metas.clear()

        for sample in samples:
            if row_kind == "captions" and sample.caption is None:
                uncaptioned += 1
                if uncaptioned <= MAX_SKIP_REPORTS:
                    log(f"skipping {sample.key}: no caption")
                continue
            try:
                img = sample.load()
                px = preprocess_image(img, resolution) if vq is not None else None
                crop = clip.crop(img) if clip is not None else None
            except ImageInputError as e:
                skipped += 1
                if skipped <= MAX_SKIP_REPORTS:
                    log(f"skipping {sample.key}: {e}")
                continue
            if px is not None:
                pixels.append(px)
            if crop is not None:
                crops.append(crop)
            meta = {"key": sample.key}
            if row_kind == "captions":
                meta["caption"] = sample.caption or ""
            else:
                meta["conversations"] = sample.conversations
            metas.append(meta)
            count += 1
            if bar is not None:
                bar.update(1)
            if len(metas) == batch_size:
                flush()
        if metas:
            flush()
        if bar is not None:
            bar.close()
        if count == 0:
            raise TrainingConfigError(f"no usable samples in {data} ({skipped} unreadable, {uncaptioned} without a caption); "
                                      "check the data layout")
        index = {
            "format": FORMAT,
            "version": VERSION,
            "kind": row_kind,
            "source": str(data),
            "source_kind": source_kind,
            "resolution": resolution,
            "num_tokens": num_tokens,
            "codebook_size": codebook,
            "magvit": magvit_fingerprint(config) if vq is not None else None,
            "clip": None if clip is None else {"processor": clip.to_dict()},
            "model": str(folder),
            "count": count,
            "skipped": skipped,
            "uncaptioned": uncaptioned,
            "shards": writer.close(),
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=2))
    if skipped:
        log(f"warning: skipped {skipped} unreadable image(s) of {count + skipped + uncaptioned}")
    if uncaptioned:
        log(f"warning: skipped {uncaptioned} image(s) without a caption of {count + skipped + uncaptioned}")
    log(f"prepared {count} {row_kind} rows ({num_tokens} tokens each"
        + (", CLIP crops" if clip is not None else "") + f") in {out}")
    return PrepareResult(Path(out), row_kind, count, skipped, num_tokens, resolution or 0, uncaptioned)


def magvit_fingerprint(model_config: dict) -> str:
    """Which image tokenizer produced the codes (its config), so mismatches can be named."""
    blob = json.dumps(model_config.get("magvit", {}), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit="img", desc="encoding", leave=False)
