"""Images for GenEval (djghosh13/geneval) in the layout its scorer reads:

    OUT/<index:05d>/metadata.jsonl     the prompt's line of evaluation_metadata.jsonl (one JSON object)
    OUT/<index:05d>/samples/<k:04d>.png

(GenEval's README, "Image generation"; `evaluation/evaluate_images.py` reads every `\\d+\\.png` in
`samples/` of every all-digit folder, so the hidden temporary files of an interrupted write are never
scored.) Sample k of prompt i uses seed `seed + 10000·i + k`, recorded in the PNG's metadata, so any
image can be regenerated alone and a rerun only makes the images that are missing. Sampling uses the
model's own settings (`Pipeline.settings("generate")`: the reference demo's steps, guidance and
schedule for its resolution) unless overridden.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from . import EvalError

SEED_STRIDE = 10_000  # seeds of different prompts never collide while n < SEED_STRIDE


def read_prompts(path: str | Path) -> list[dict]:
    """GenEval's `prompts/evaluation_metadata.jsonl`: one object with at least "prompt" per line."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path} not found; pass GenEval's prompts/evaluation_metadata.jsonl")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path} line {n} is not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise EvalError(f"{path} line {n} has no \"prompt\"; is this GenEval's evaluation_metadata.jsonl?")
        rows.append(row)
    if not rows:
        raise EvalError(f"{path} holds no prompts")
    return rows


def sample_seed(seed: int, index: int, k: int) -> int:
    return (seed + SEED_STRIDE * index + k) % 2**31


def generate_geneval(
    pipe,
    prompts: list[dict],
    out: str | Path,
    *,
    n: int = 4,
    seed: int = 0,
    batch_size: int = 4,
    steps: int | None = None,
    guidance: float | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Make every missing sample; returns counts {"prompts", "images", "generated", "settings"}."""
    from ..fsutil import atomic_write_bytes
    from ..images import save_png

    if n < 1 or n >= SEED_STRIDE:
        raise EvalError(f"--n must be in [1, {SEED_STRIDE - 1}], got {n}")
    settings = pipe.settings("generate", steps=steps, guidance=guidance)
    out = Path(out)
    todo: list[tuple[int, str, list[int]]] = []
    for index, meta in enumerate(prompts):
        folder = out / f"{index:05d}"
        line = json.dumps(meta, ensure_ascii=False)
        meta_path = folder / "metadata.jsonl"
        if meta_path.exists():
            try:
                written = json.loads(meta_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                written = None
            if written != meta:
                raise EvalError(f"{meta_path} holds another prompt; OUT belongs to another prompt list, choose another OUT")
        else:
            atomic_write_bytes(meta_path, (line + "\n").encode())
        missing = [k for k in range(n) if not (folder / "samples" / f"{k:04d}.png").exists()]
        if missing:
            todo.append((index, meta["prompt"], missing))
    total = sum(len(m) for _, _, m in todo)
    log(f"GenEval: {len(prompts)} prompts × {n} images, {total} to generate "
        f"({settings.steps} steps, guidance {settings.guidance}, schedule {settings.schedule})")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts) * n, initial=len(prompts) * n - total, desc="geneval", unit="img", file=sys.stderr)
    try:
        for index, prompt, missing in todo:
            seeds = [sample_seed(seed, index, k) for k in missing]
            results = pipe.generate(prompt, seed=seeds, batch_size=batch_size, steps=settings.steps, guidance=settings.guidance,
                                    temperature=settings.temperature, schedule=settings.schedule, greedy=settings.greedy)
            for k, result in zip(missing, results):
                meta = {**result.metadata(pipe.name), "geneval_index": str(index), "geneval_sample": str(k)}
                save_png(result.image, out / f"{index:05d}" / "samples" / f"{k:04d}.png", meta)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return {"prompts": len(prompts), "images": len(prompts) * n, "generated": total,
            "settings": {"steps": settings.steps, "guidance": settings.guidance, "schedule": settings.schedule,
                         "temperature": settings.temperature}}
