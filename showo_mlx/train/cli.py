"""`showo prepare`, `showo train`, `showo fuse` — registered on the main typer app by `register`.

Bad input surfaces as one line on stderr and exit code 2 (ShowoError), Ctrl-C as exit 130, the
same contract as the other showo commands.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from ..cli_common import MODEL_HELP, closing_line, handle_errors
from ..cli_sources import current_sources, model_sources

_errors = handle_errors(interrupted="interrupted; the last checkpoint is kept (resume with --resume)")


def _echo(message: str) -> None:
    typer.echo(message, err=True)


_done = closing_line


def prepare_command(
    data: str = typer.Argument(..., help="Image-caption folder, JSONL, class folders, .tar shards (glob or {000..009}), or LLaVA JSON."),
    out: Path = typer.Argument(..., help="Output folder for the prepared codes."),
    model: str = typer.Option("showlab/show-o", "--model", "-m", help=MODEL_HELP),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Image size in pixels (default: the model's)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="pairs, jsonl, classes, tar or llava (default: detected)."),
    image_root: Optional[str] = typer.Option(None, "--image-root", help="Folder that JSONL/LLaVA image paths are relative to."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images encoded at once."),
    shard_size: int = typer.Option(4096, "--shard-size", help="Rows per output shard."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Encode a dataset's images to MAGVIT-v2 codes once, for `showo train`."""
    from .prepare import prepare

    start = time.perf_counter()
    prepare(data, out, model=_with_sources(model), resolution=resolution, kind=kind, image_root=image_root,
            batch_size=batch_size, shard_size=shard_size, force=force, log=_echo)
    _done(start)


def train_command(
    config: Path = typer.Argument(..., help="Training YAML (keys in docs/TRAINING.md; `preset:` picks a reference stage)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    data: Optional[str] = typer.Option(None, "--data", help="Prepared image-caption data (t2i rows)."),
    mmu_data: Optional[str] = typer.Option(None, "--mmu-data", help="Prepared captions or LLaVA data (mmu rows)."),
    lm_data: Optional[str] = typer.Option(None, "--lm-data", help="Text .txt/.jsonl (lm rows)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run folder (checkpoints, logs, result)."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters instead of all weights."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last checkpoint."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config key: --set lr=5e-5 (repeatable)."),
) -> None:
    """Train or fine-tune Show-o (full or LoRA), on one Mac or several (mlx.launch)."""
    from .config import TrainConfig
    from .trainer import Trainer

    start = time.perf_counter()
    if model is None and current_sources(adapters=False):
        from ..errors import ShowoError

        raise ShowoError("--vq/--tokenizer need --model on the command line")
    overrides = {"model": _with_sources(model) if model else model, "data": data, "mmu_data": mmu_data, "lm_data": lm_data, "output": output,
                 "fine_tune": "lora" if lora else None}
    cfg = TrainConfig.load(config, overrides, set_ or [])
    for note in getattr(cfg, "notes", []):
        _echo(f"note: {note}")
    trainer = Trainer(cfg, resume=resume, log=_echo)
    result = trainer.run()
    if trainer.world.is_main:
        last = result.history[-1] if result.history else None
        if last is not None:
            losses = ", ".join(f"{k} {v:.4f}" for k, v in last.losses.items() if v is not None)
            _echo(f"step {result.steps}: {losses}")
        if result.output is not None:
            _echo(f"saved {result.output}")
        _done(start)


def fuse_command(
    model: Optional[str] = typer.Argument(None, metavar="MODEL", help="The base model the adapters were trained on. " + MODEL_HELP),
    adapters: Optional[Path] = typer.Argument(None, metavar="ADAPTERS", help="Adapters folder (RUN/adapters)."),
    out: Optional[Path] = typer.Argument(None, metavar="OUT", help="Output model folder."),
    model_opt: Optional[str] = typer.Option(None, "--model", help="The base model, as MODEL (mlx-lm's spelling)."),
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="The adapters folder, as ADAPTERS (mlx-lm's spelling)."),
    save_path: Optional[Path] = typer.Option(None, "--save-path", help="The output folder, as OUT (mlx-lm's spelling)."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Write float weights even if the base was quantized."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Merge LoRA adapters into the base weights (MODEL ADAPTERS OUT, or mlx-lm's --model/--adapter-path/--save-path); the result loads like any converted model."""
    from .lora import fuse

    model = _one_of("MODEL", model, "--model", model_opt)
    adapters = _one_of("ADAPTERS", adapters, "--adapter-path", adapter_path)
    out = _one_of("OUT", out, "--save-path", save_path)
    start = time.perf_counter()
    fuse(_with_sources(model), adapters, out, dequantize=dequantize, force=force, log=_echo)
    _done(start)


def _one_of(name: str, positional, option_name: str, option):
    """A value given as a positional or as its mlx-lm option (not two different ones)."""
    from ..errors import ShowoError

    if positional is not None and option is not None and str(positional) != str(option):
        raise ShowoError(f"{name} is given twice ({positional} and {option_name} {option}); give it once")
    value = positional if positional is not None else option
    if value is None:
        raise ShowoError(f"missing {name} (or {option_name}); see `showo fuse --help`")
    return value


def _with_sources(model: str) -> str:
    """With --vq/--tokenizer, the model is resolved (converted) here with them, and its converted
    folder passed on; without them, `model` as given."""
    sources = current_sources(adapters=False)
    if not sources:
        return model
    from ..loading import resolve_model

    return str(resolve_model(model, log=_echo, **sources))


def register(app: typer.Typer) -> None:
    app.command("prepare")(_errors(model_sources(prepare_command, adapters=False)))
    app.command("train")(_errors(model_sources(train_command, adapters=False)))
    app.command("fuse")(_errors(model_sources(fuse_command, adapters=False)))
