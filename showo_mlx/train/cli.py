"""`showo prepare`, `showo train`, `showo fuse` — registered on the main typer app by `register`.

Bad input surfaces as one line on stderr and exit code 2 (ShowoError), Ctrl-C as exit 130, the
same contract as the other showo commands. `showo train` adds: exit 3 when training stopped on
non-finite values (TrainingDivergedError), exit 4 when a data-parallel process stalled or died
(DistributedError; the collective watchdog exits with 4 by itself), exit 143 on SIGTERM. Whatever
the code, RUN/status.json says how the run ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import List, Optional

import typer

from ..cli_common import MODEL_HELP, closing_line, fail, handle_errors, say
from ..cli_sources import current_sources, model_sources

_errors = handle_errors(interrupted="interrupted; the last checkpoint is kept (resume with --resume)")


def _echo(message: str) -> None:
    say(message)  # stderr, silenced by --quiet


_done = closing_line


class Terminated(KeyboardInterrupt):
    """SIGTERM (a launcher stopping the job, `kill`): stops training like Ctrl-C, status "interrupted"."""

    exit_code = 143


@contextlib.contextmanager
def _sigterm_interrupts():
    """Turn SIGTERM into an exception in the main thread, so the trainer records it in status.json
    (the default action would end the process without a word). Yields the read end of the signal
    wake-up pipe (or None), for the collective watchdog of a data-parallel run (distributed.py)."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return

    def raise_terminated(signum, frame):
        raise Terminated("terminated by SIGTERM")

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield read_fd
    except Terminated:
        typer.echo("\nterminated; the last checkpoint is kept (resume with --resume)", err=True)
        raise typer.Exit(Terminated.exit_code) from None
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGTERM, previous)
        os.close(write_fd)
        os.close(read_fd)


def prepare_command(
    data: str = typer.Argument(..., help="Image-caption folder, JSONL, class folders, .tar shards (glob or {000..009}), or LLaVA JSON."),
    out: Path = typer.Argument(..., help="Output folder for the prepared codes."),
    model: str = typer.Option("showlab/show-o", "--model", help=MODEL_HELP),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Image size in pixels (default: the model's)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="pairs, jsonl, classes, tar or llava (default: detected)."),
    image_root: Optional[str] = typer.Option(None, "--image-root", help="Folder that JSONL/LLaVA image paths are relative to (default: the data file's folder)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images encoded at once."),
    shard_size: int = typer.Option(4096, "--shard-size", help="Rows per output shard."),
    force: bool = typer.Option(False, "--force", help="Replace OUT only if it is empty or a previous `showo prepare` output; off by default."),
) -> None:
    """Encode a dataset's images to MAGVIT-v2 codes once, for `showo train`."""
    from .prepare import prepare

    start = time.perf_counter()
    prepare(data, out, model=_with_sources(model), resolution=resolution, kind=kind, image_root=image_root,
            batch_size=batch_size, shard_size=shard_size, force=force, log=_echo)
    _done(start)


def train_command(
    config: Path = typer.Argument(..., help="Training YAML (keys in docs/TRAINING.md; `preset:` picks a reference stage)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP + " Default: the config's model."),
    data: Optional[str] = typer.Option(None, "--data", help="Prepared image-caption data, t2i rows (default: the config's data)."),
    mmu_data: Optional[str] = typer.Option(None, "--mmu-data", help="Prepared captions or LLaVA data, mmu rows (default: the config's mmu_data)."),
    lm_data: Optional[str] = typer.Option(None, "--lm-data", help="Text .txt/.jsonl, lm rows (default: the config's lm_data)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run folder: checkpoints, logs, result (default: the config's output)."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters instead of all weights; off by default."),
    resume: bool = typer.Option(False, "--resume", help="Continue this run folder's own run from its last checkpoint; off by default."),
    force: bool = typer.Option(False, "--force", help="Delete the run folder's previous run and start a new one; off by default."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config key: --set lr=5e-5 (repeatable; default: none)."),
) -> None:
    """Train or fine-tune Show-o (full or LoRA), on one Mac or several (mlx.launch)."""
    from .config import TrainConfig
    from .trainer import Trainer

    start = time.perf_counter()
    if resume and force:
        fail("--resume continues the folder's run and --force deletes it; pass one of them")
    if model is None and current_sources(adapters=False):
        fail("--vq/--tokenizer need --model on the command line")
    overrides = {"model": _with_sources(model) if model else model, "data": data, "mmu_data": mmu_data, "lm_data": lm_data,
                 "output": output, "fine_tune": "lora" if lora else None}
    cfg = TrainConfig.load(config, overrides, set_ or [])
    for note in getattr(cfg, "notes", []):
        _echo(f"note: {note}")
    with _sigterm_interrupts() as signal_fd:  # diverged (exit 3) / distributed (exit 4): handle_errors
        trainer = Trainer(cfg, resume=resume, force=force, log=_echo)
        if trainer.world.watchdog is not None and signal_fd is not None:
            trainer.world.watchdog.watch_signals(signal_fd)
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
    model_opt: Optional[str] = typer.Option(None, "--model", help="The base model, the same as MODEL (mlx-lm's spelling)."),
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="The adapters folder, the same as ADAPTERS (mlx-lm's spelling)."),
    save_path: Optional[Path] = typer.Option(None, "--save-path", help="The output folder, the same as OUT (mlx-lm's spelling)."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Write float weights even if the base was quantized; off by default."),
    force: bool = typer.Option(False, "--force", help="Replace OUT only if it is empty or a previous model folder; off by default."),
) -> None:
    """Merge LoRA adapters into the base weights (MODEL ADAPTERS OUT, or mlx-lm's --model/--adapter-path/--save-path); the result loads like any converted model."""
    from .lora import fuse

    model = _one_of("MODEL", model, "--model", model_opt)
    adapters = _one_of("ADAPTERS", adapters, "--adapter-path", adapter_path)
    out = _one_of("OUT", out, "--save-path", save_path)
    start = time.perf_counter()
    fuse(_with_sources(model), adapters, out, dequantize=dequantize, force=force, log=_echo)
    _done(start)


EXAMPLES = {  # shown at the end of each command's help
    "prepare": "Examples:\n\n  showo prepare my_pictures/ data/my_pictures --model showlab/show-o\n\n"
               "  showo prepare llava_v1_5_mix665k.json data/mix665k --image-root /data/llava_images",
    "train": "Examples:\n\n  showo train lora.yaml --model showlab/show-o --lora\n\n"
             "  showo train lora.yaml --resume --set lr=5e-5",
    "fuse": "Examples:\n\n  showo fuse showlab/show-o runs/my_lora/adapters models/my-showo\n\n"
            "  showo fuse ./show-o-4bit runs/my_lora/adapters models/my-showo --dequantize\n\n"
            "  showo fuse --model showlab/show-o --adapter-path runs/my_lora/adapters --save-path models/my-showo",
}


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
    app.command("prepare", epilog=EXAMPLES["prepare"])(_errors(model_sources(prepare_command, adapters=False)))
    app.command("train", epilog=EXAMPLES["train"])(_errors(model_sources(train_command, adapters=False)))
    app.command("fuse", epilog=EXAMPLES["fuse"])(_errors(model_sources(fuse_command, adapters=False)))
