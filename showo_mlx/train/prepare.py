"""`showo prepare DATA OUT --model M`: encode every image to MAGVIT-v2 codes once.

Training then reads small integer arrays instead of decoding and encoding pictures at every step
(the MAGVIT encoder costs more than the tiny-batch transformer step on a laptop). Output:

    OUT/index.json          what was prepared (kind, resolution, tokens, counts, shards)
    OUT/codes-00000.npy     (n, N) uint16 codes of shard 0 (row-major code grid)
    OUT/meta-00000.jsonl    one line per row: {"key", "caption"} or {"key", "conversations"}

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
        self.meta: list[dict] = []
        self.shards: list[dict] = []

    def add(self, codes: np.ndarray, meta: list[dict]) -> None:
        self.codes.extend(codes)
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
        np.save(self.folder / codes_name, np.stack(self.codes[:n]).astype(self.dtype))
        with open(self.folder / meta_name, "w", encoding="utf-8") as f:
            for m in self.meta[:n]:
                f.write(json.dumps(m, ensure_ascii=False) + "\n")
        self.shards.append({"codes": codes_name, "meta": meta_name, "count": n})
        del self.codes[:n], self.meta[:n]


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
    vq = load_magvit(folder, config, with_encoder=True)
    factor = vq.downsample_factor
    resolution = resolution or cfg.image_grid[0] * factor
    if resolution % factor:
        raise TrainingConfigError(f"resolution {resolution} is not a multiple of MAGVIT's {factor}")
    num_tokens = (resolution // factor) ** 2
    if num_tokens != cfg.num_vq_tokens:
        log(f"warning: {resolution} px gives {num_tokens} tokens but the model uses {cfg.num_vq_tokens}; "
            "training this model on these codes will be refused")
    source_kind, samples = iter_source(data, kind, image_root)
    row_kind = "conversations" if source_kind == "llava" else "captions"
    dtype = np.uint16 if vq.config.codebook_size <= 65536 else np.int32

    count = skipped = uncaptioned = 0
    bar = _progress(progress)
    with atomic_output_dir(out, force=force) as tmp:
        writer = _ShardWriter(tmp, shard_size, dtype)
        pixels: list[np.ndarray] = []
        metas: list[dict] = []

        def flush() -> None:
            codes = vq.encode(mx.array(np.concatenate(pixels)))
            mx.eval(codes)
            writer.add(np.array(codes), list(metas))
            pixels.clear()
            metas.clear()

        for sample in samples:
            if row_kind == "captions" and sample.caption is None:
                uncaptioned += 1
                if uncaptioned <= MAX_SKIP_REPORTS:
                    log(f"skipping {sample.key}: no caption")
                continue
            try:
                pixels.append(preprocess_image(sample.load(), resolution))
            except ImageInputError as e:
                skipped += 1
                if skipped <= MAX_SKIP_REPORTS:
                    log(f"skipping {sample.key}: {e}")
                continue
            meta = {"key": sample.key}
            if row_kind == "captions":
                meta["caption"] = sample.caption or ""
            else:
                meta["conversations"] = sample.conversations
            metas.append(meta)
            count += 1
            if bar is not None:
                bar.update(1)
            if len(pixels) == batch_size:
                flush()
        if pixels:
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
            "codebook_size": vq.config.codebook_size,
            "magvit": magvit_fingerprint(config),
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
    log(f"prepared {count} {row_kind} rows ({num_tokens} tokens each) in {out}")
    return PrepareResult(Path(out), row_kind, count, skipped, num_tokens, resolution, uncaptioned)


def magvit_fingerprint(model_config: dict) -> str:
    """Which image tokenizer produced the codes (its config), so mismatches can be named."""
    blob = json.dumps(model_config.get("magvit", {}), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit="img", desc="encoding", leave=False)
