"""Raw training data, streamed one sample at a time (read by `showo prepare`).

Supported layouts (those of the official `training/data.py`, `training/imagenet_dataset.py` and
`llava/`, plus the simple ones a user has at hand):

* ``pairs``   a folder of ``name.png|jpg|jpeg|webp`` + ``name.txt`` (caption), recursively;
* ``jsonl``   a JSONL file of ``{"image": path, "caption": text}`` (paths relative to the file);
* ``classes`` an ImageNet-style folder of class folders; the prompt is the class name with
  underscores as spaces, or the value in an optional ``class_names.json`` ({folder: name});
* ``tar``     webdataset shards (``key.jpg|png|jpeg|webp`` + ``key.txt|text|caption``): a .tar file, a
  folder of them, a glob or a brace range ``shards-{000..009}.tar``; streamed, never unpacked;
* ``llava``   LLaVA JSON (a list) or JSONL of ``{"image", "conversations": [{"from", "value"}]}``.

Every sample carries a lazy image loader, so an unreadable image only costs a skip (counted by the
caller) and nothing is held in memory beyond the current sample.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from ..errors import ImageInputError, TrainingConfigError
from ..images import load_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_EXTS = (".txt", ".text", ".caption")
KINDS = ("pairs", "jsonl", "classes", "tar", "llava")


@dataclass
class RawSample:
    key: str
    load: Callable[[], Image.Image]  # raises ImageInputError for unreadable images
    caption: str | None = None  # None for an image without a caption (counted and skipped by prepare)
    conversations: list[dict] | None = None


def _from_path(path: Path) -> Callable[[], Image.Image]:
    return lambda: load_image(path, "RGB")


def _from_bytes(data: bytes, name: str) -> Callable[[], Image.Image]:
    # the same decoding as a file: size limits from the header, EXIF orientation, one-line errors
    return lambda: load_image(data, "RGB", name=name)


# -- layouts ---------------------------------------------------------------------------------------
def iter_pairs(folder: Path) -> Iterator[RawSample]:
    for img in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        txt = img.with_suffix(".txt")
        # An image without a caption is not a training pair: yielded with caption None so that
        # `prepare` counts and reports it instead of it vanishing silently.
        caption = _read_text(txt) if txt.is_file() else None
        yield RawSample(str(img.relative_to(folder)), _from_path(img), caption=caption)


def iter_jsonl(path: Path, image_root: Path | None = None) -> Iterator[RawSample]:
    root = image_root or path.parent
    for i, row in enumerate(_json_lines(path)):
        if "image" not in row or "caption" not in row:
            raise TrainingConfigError(f"{path} line {i + 1}: needs 'image' and 'caption' keys")
        yield RawSample(str(row["image"]), _from_path(root / row["image"]), caption=str(row["caption"]))


def iter_classes(folder: Path) -> Iterator[RawSample]:
    names_file = folder / "class_names.json"
    names = json.loads(names_file.read_text()) if names_file.exists() else {}
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        prompt = names.get(cls.name, cls.name.replace("_", " "))
        for img in sorted(p for p in cls.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
            yield RawSample(str(img.relative_to(folder)), _from_path(img), caption=prompt)


def iter_tar(spec: str) -> Iterator[RawSample]:
    for shard in expand_shards(spec):
        yield from _iter_one_tar(shard)


def _iter_one_tar(shard: Path) -> Iterator[RawSample]:
    # webdataset groups consecutive members by key = name up to the first dot of the basename.
    current, files = None, {}
    try:
        tar = tarfile.open(shard, mode="r|*")  # streaming mode: members are read in order
    except (tarfile.TarError, OSError) as e:
        raise TrainingConfigError(f"{shard} is not a readable tar shard ({e})") from None
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            dirname, _, base = member.name.rpartition("/")
            key = (dirname + "/" if dirname else "") + base.split(".", 1)[0]
            ext = "." + base.split(".", 1)[1].lower() if "." in base else ""
            if key != current:
                yield from _tar_sample(shard, current, files)
                current, files = key, {}
            f = tar.extractfile(member)
            if f is not None:
                files[ext] = f.read()
        yield from _tar_sample(shard, current, files)


def _tar_sample(shard: Path, key: str | None, files: dict[str, bytes]) -> Iterator[RawSample]:
    if key is None:
        return
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    caption = next((files[e] for e in CAPTION_EXTS if e in files), None)
    if image is None:
        return
    name = f"{shard.name}:{key}"
    text = caption.decode("utf-8", "replace").strip() if caption is not None else None  # None: counted by prepare
    yield RawSample(name, _from_bytes(image, name), caption=text)


def iter_llava(path: Path, image_root: Path | None = None) -> Iterator[RawSample]:
    root = image_root or path.parent
    rows = _json_lines(path) if path.suffix == ".jsonl" else _json_list(path)
    for i, row in enumerate(rows):
        conv = row.get("conversations")
        if not isinstance(conv, list):
            raise TrainingConfigError(f"{path} entry {i}: needs a 'conversations' list")
        image = row.get("image")
        key = str(row.get("id", i))
        if not image:  # text-only LLaVA entries have no place in an mmu row
            yield RawSample(key, _missing(f"{path} entry {i} has no image"), conversations=conv)
            continue
        yield RawSample(key, _from_path(root / image), conversations=conv)


def _missing(message: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        raise ImageInputError(message)

    return load


# -- detection -------------------------------------------------------------------------------------
def detect_kind(data: str) -> str:
    """Guess the layout of DATA; `--kind` overrides. Never guesses between two plausible ones."""
    if _is_shard_spec(data):
        return "tar"
    path = Path(data)
    if path.is_file():
        if path.suffix == ".jsonl":
            first = next(iter(_json_lines(path)), {})
            return "llava" if "conversations" in first else "jsonl"
        if path.suffix == ".json":
            return "llava"
        raise TrainingConfigError(f"{data}: unknown data file type; use .jsonl, .json or .tar (or pass --kind)")
    if not path.is_dir():
        raise TrainingConfigError(f"{data} does not exist; pass a data folder, JSONL/JSON file or tar shards")
    entries = list(path.iterdir())
    if any(p.suffix == ".tar" for p in entries):
        return "tar"
    if any(p.suffix.lower() in IMAGE_EXTS for p in entries):
        return "pairs"
    if any(p.is_dir() for p in entries):
        return "classes"
    raise TrainingConfigError(f"{data} holds no images, class folders or tar shards")


def iter_source(data: str, kind: str | None = None, image_root: str | None = None) -> tuple[str, Iterator[RawSample]]:
    kind = kind or detect_kind(data)
    if kind not in KINDS:
        raise TrainingConfigError(f"unknown data kind {kind!r}; choose one of {list(KINDS)}")
    root = Path(image_root) if image_root else None
    path = Path(data)
    if kind == "pairs":
        return kind, iter_pairs(path)
    if kind == "jsonl":
        return kind, iter_jsonl(path, root)
    if kind == "classes":
        return kind, iter_classes(path)
    if kind == "tar":
        return kind, iter_tar(data)
    return kind, iter_llava(path, root)


# -- helpers ---------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


def _json_lines(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainingConfigError(f"{path} line {i + 1} is not JSON ({e.msg})") from None


def _json_list(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TrainingConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(rows, list):
        raise TrainingConfigError(f"{path} must hold a JSON list of conversations")
    return rows


_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _is_shard_spec(data: str) -> bool:
    return data.endswith(".tar") or bool(_BRACE.search(data)) or any(c in data for c in "*?[")


def expand_shards(spec: str) -> list[Path]:
    """A .tar file, a folder of .tar files, a glob, or a brace range ``{000..099}``."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
    else:
        m = _BRACE.search(spec)
        if m:
            a, b = m.group(1), m.group(2)
            width = len(a)
            names = [spec[: m.start()] + str(i).zfill(width) + spec[m.end() :] for i in range(int(a), int(b) + 1)]
        else:
            names = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
        shards = [Path(n) for n in names]
    missing = [s for s in shards if not s.is_file()]
    if not shards or missing:
        raise TrainingConfigError(f"tar shard(s) not found: {missing[0] if missing else spec}")
    return shards
