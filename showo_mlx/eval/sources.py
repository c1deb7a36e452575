"""Where benchmark data comes from: a local folder or file, or a Hugging Face dataset id; parquet
tables read with pyarrow; image cells in any of the layouts those tables use.

A Hub dataset is fetched with `huggingface_hub.snapshot_download(repo_type="dataset")`, limited to
the files the benchmark needs (lmms-lab/GQA holds every GQA split, tens of GB; only testdev-balanced
is read). HF_HUB_OFFLINE=1 uses the local Hub cache.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from . import EvalError

# Files each benchmark needs from its lmms-lab dataset repo (the ones lmms-eval's task yaml reads).
HUB_FILES = {
    "pope": ["data/*.parquet"],  # config "default", split "test" (9000 questions)
    "mme": ["data/*.parquet"],  # split "test" (2374 questions)
    "gqa": ["testdev_balanced_instructions/*.parquet", "testdev_balanced_images/*.parquet"],
}


def looks_like_dataset_id(text: str) -> bool:
    from ..hub import looks_like_repo_id

    return looks_like_repo_id(text) and not Path(text).expanduser().exists()


def download_dataset(repo_id: str, benchmark: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of showo-mlx
        raise EvalError("huggingface_hub is not installed; pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=HUB_FILES[benchmark]))
    except Exception as e:  # network, auth (lmms-lab sets need a token), missing repo: one line
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise EvalError(
            f"could not fetch the dataset {repo_id} from the Hugging Face Hub ({type(e).__name__}: {reason}); "
            "check the name, your connection and `huggingface-cli login`, or pass a local folder"
        ) from None


# -- parquet -------------------------------------------------------------------------------------
def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalError('reading parquet benchmarks needs pyarrow: pip install "showo-mlx[eval]" (or pip install pyarrow)') from None
    return pq


def parquet_files(folder: Path, under: str | None = None) -> list[Path]:
    root = folder / under if under else folder
    return sorted(p for p in root.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(folder).parts))


def parquet_columns(path: Path) -> list[str]:
    try:
        return list(_pyarrow().read_schema(path).names)
    except EvalError:
        raise
    except Exception as e:
        raise EvalError(f"{path} is not a readable parquet file ({type(e).__name__}); re-download it") from None


def read_parquet(files: list[Path], columns: list[str]):
    """One pyarrow Table of `columns` over `files` (in order); the image bytes stay in Arrow memory."""
    import pyarrow as pa

    pq = _pyarrow()
    tables = []
    for path in files:
        names = parquet_columns(path)
        missing = [c for c in columns if c not in names]
        if missing:
            raise EvalError(f"{path} has no column {missing[0]!r} (it has {names}); is this the right benchmark?")
        try:
            tables.append(pq.read_table(path, columns=columns))
        except Exception as e:
            raise EvalError(f"{path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:120]}); re-download it") from None
    if not tables:
        raise EvalError("no parquet files found")
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


# -- images ---------------------------------------------------------------------------------------
def open_image_cell(value: Any, root: Path | None = None) -> Image.Image:
    """An image from a parquet cell: HF datasets' {"bytes", "path"} struct, raw bytes, or a path."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return _decode(io.BytesIO(data), path or "image bytes")
        if path:
            return open_image_file(Path(path) if root is None else root / path)
        raise EvalError("an image cell holds neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return _decode(io.BytesIO(value), "image bytes")
    if isinstance(value, str):
        return open_image_file(Path(value) if root is None else root / value)
    raise EvalError(f"unsupported image cell of type {type(value).__name__}")


def open_image_file(path: Path) -> Image.Image:
    if not path.is_file():
        raise EvalError(f"image {path} not found; check the dataset folder")
    return _decode(path, str(path))


def _decode(source, name: str) -> Image.Image:
    try:
        with Image.open(source) as im:
            return im.convert("RGB")
    except Exception as e:
        raise EvalError(f"cannot decode {name} ({type(e).__name__})") from None


def lazy_cell(column, index: int, root: Path | None = None) -> Callable[[], Image.Image]:
    """A loader for row `index` of an Arrow image column (decoded only when asked)."""
    return lambda: open_image_cell(column[index].as_py(), root)


def lazy_file(path: Path) -> Callable[[], Image.Image]:
    return lambda: open_image_file(path)


def find_image(folder: Path, stem: str) -> Path | None:
    """`folder/stem` with any common image extension (MME's txt files name the image by stem)."""
    for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG", ".webp"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name.startswith("__")
