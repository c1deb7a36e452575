"""`showo`: the command line.

Every command reports bad input as one line on stderr with exit code 2 (never a traceback), and
Ctrl-C stops between steps with exit code 130. Image outputs are PNGs whose text chunks record the
prompt, seed, steps, guidance, schedule, model and version.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from .errors import ShowoError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Show-o on Apple silicon with MLX: generate, inpaint, extend, ask, convert, train.",
    pretty_exceptions_enable=False,
)

from .cli_common import MODEL_HELP, closing_line, handle_errors


def parse_seeds(values: Optional[List[str]]) -> Optional[list[int]]:
    if not values:
        return None
    seeds = []
    for v in values:
        for part in str(v).split(","):
            try:
                seeds.append(int(part))
            except ValueError:
                raise ShowoError(f"--seed takes integers, got {part!r}") from None
    return seeds


# -- outputs -------------------------------------------------------------------------------------
def output_paths(pattern: str, seeds: list, force: bool) -> list[Path]:
    """Expand {seed} and {i}; several images without a placeholder get _<i> before the suffix."""
    from .fsutil import ensure_parent

    n = len(seeds)
    if n > 1 and "{seed}" not in pattern and "{i}" not in pattern:
        p = Path(pattern)
        pattern = str(p.with_name(f"{p.stem}_{{i}}{p.suffix or '.png'}"))
    paths = []
    for i, seed in enumerate(seeds):
        try:
            paths.append(Path(pattern.format(seed=seed, i=i)))
        except (KeyError, IndexError, ValueError) as e:
            raise ShowoError(f"--output {pattern!r} has an unknown placeholder ({e}); use {{seed}} and {{i}}") from None
    if len(set(paths)) != len(paths):
        raise ShowoError(f"--output {pattern!r} gives the same file for several images; add {{i}} or {{seed}}")
    for p in paths:
        if p.suffix.lower() != ".png":
            raise ShowoError(f"output {p} must end in .png")
        if p.exists() and not force:
            raise ShowoError(f"{p} exists; choose another --output or pass --force to overwrite")
        ensure_parent(p)
        if not os.access(p.parent, os.W_OK):
            raise ShowoError(f"cannot write to {p.parent}; choose another --output folder")
    return paths


def save_images(results, paths: list[Path], model: str) -> None:
    from .images import save_png

    for r, p in zip(results, paths):
        save_png(r.image, p, r.metadata(model))
        typer.echo(f"saved {p} ({r.image.width}x{r.image.height}, seed {r.metadata(model)['seed']})")


class StepProgress:
    """tqdm over MaskGIT steps (all batches), used as the decode loop's callback."""

    def __init__(self, total: Optional[int], desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)

    def __call__(self, step, steps, tokens):
        self.bar.update(1)

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


class GenerationOptions:
    """The generation options shared by generate, inpaint and extend."""

    def __init__(self, steps, guidance, temperature, schedule, greedy):
        self.overrides = dict(steps=steps, guidance=guidance, temperature=temperature, schedule=schedule, greedy=greedy)
        precheck(steps, guidance, temperature, schedule)  # before loading gigabytes of weights

    def resolve(self, pipe, task: str) -> dict:
        """The model's defaults for `task` with the user's overrides, as keyword arguments."""
        s = pipe.settings(task, **self.overrides)
        typer.echo(f"{pipe.name}: {task}, {s.steps} steps, guidance {s.guidance}, schedule {s.schedule}, "
                   + ("greedy" if s.greedy else f"temperature {s.temperature}"), err=True)
        return dict(steps=s.steps, guidance=s.guidance, temperature=s.temperature, schedule=s.schedule, greedy=s.greedy)


def load_pipeline(model: str, dtype: Optional[str], quantize: Optional[int], low_ram: bool = False):
    from .pipeline import load

    return load(model, dtype=dtype, quantize=quantize, low_ram=low_ram, log=lambda m: typer.echo(m, err=True))


def precheck(steps, guidance, temperature, schedule) -> None:
    """Validate generation options before loading gigabytes of weights."""
    from .pipeline import GenerationSettings

    GenerationSettings(
        steps if steps is not None else 1,
        guidance if guidance is not None else 0.0,
        temperature if temperature is not None else 0.0,
        schedule or "cosine",
    ).validate()


# -- commands --------------------------------------------------------------------------------
Model = typer.Option("showlab/show-o", "--model", "-m", help=MODEL_HELP)
Steps = typer.Option(None, "--steps", help="MaskGIT steps (default: the model's, see README).")
Guidance = typer.Option(None, "--guidance", "-g", help="CFG scale s in (1+s)·cond − s·uncond; 0 = off.")
Temperature = typer.Option(None, "--temperature", help="Re-masking noise temperature (default 1.0).")
Schedule = typer.Option(None, "--schedule", help="Mask schedule: cosine, linear, powK (e.g. pow2), sigmoid.")
Greedy = typer.Option(False, "--greedy", help="Deterministic: argmax sampling, no re-masking noise.")
Seed = typer.Option(None, "--seed", "-s", help="Seed(s); one image per seed (repeat or comma-separate).")
Dtype = typer.Option(None, "--dtype", help="Compute dtype: float32, float16, bfloat16.")
Quantize = typer.Option(None, "--quantize", "-q", help="Quantize the transformer at load time to BITS.")
Force = typer.Option(False, "--force", help="Overwrite existing outputs.")
LowRam = typer.Option(False, "--low-ram", help="Least memory: cap MLX's buffer cache, run MAGVIT with minimal headroom, free its encoder after use.")


@app.command()
@handle_errors
def generate(
    prompts: List[str] = typer.Argument(..., help="One or more prompts (\"\" is the unconditional prompt)."),
    model: str = Model,
    steps: Optional[int] = Steps,
    guidance: Optional[float] = Guidance,
    temperature: Optional[float] = Temperature,
    schedule: Optional[str] = Schedule,
    greedy: bool = Greedy,
    seed: Optional[List[str]] = Seed,
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images per prompt (seeds s, s+1, …)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="PNG path; {seed} and {i} are filled in (default showo_{seed}.png, or showo_{i}_{seed}.png for several prompts)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Images decoded together."),
    dtype: Optional[str] = Dtype,
    quantize: Optional[int] = Quantize,
    low_ram: bool = LowRam,
    force: bool = Force,
):
    """Text to image."""
    from .pipeline import _seed_list

    start = time.perf_counter()
    if num_images < 1:
        raise ShowoError(f"--num-images must be >= 1, got {num_images}")
    options = GenerationOptions(steps, guidance, temperature, schedule, greedy)
    seeds = _seed_list(parse_seeds(seed), num_images)
    rows = [(p, s) for p in prompts for s in seeds]
    if output is None:
        output = "showo_{seed}.png" if len(prompts) == 1 else "showo_{i}_{seed}.png"
    paths = output_paths(output, [s for _, s in rows], force)
    pipe = load_pipeline(model, dtype, quantize, low_ram)
    for p in pipe.truncated(prompts):
        typer.echo(f"note: prompt truncated to the model's 126-token limit: {p[:40]!r}…", err=True)
    settings = options.resolve(pipe, "generate")
    with StepProgress(settings["steps"] * -(-len(rows) // max(1, batch_size)), "generate") as progress:
        results = pipe.generate(prompts, seed=seeds, batch_size=batch_size, callback=progress, **settings)
    save_images(results, paths, pipe.name)
    closing_line(start)


@app.command()
@handle_errors
def inpaint(
    image: str = typer.Argument(..., help="Image to edit."),
    mask: str = typer.Argument(..., help="Mask image: white = repaint."),
    prompt: str = typer.Argument(..., help="What to paint in the white region."),
    model: str = Model,
    steps: Optional[int] = Steps,
    guidance: Optional[float] = Guidance,
    temperature: Optional[float] = Temperature,
    schedule: Optional[str] = Schedule,
    greedy: bool = Greedy,
    seed: Optional[List[str]] = Seed,
    num_images: int = typer.Option(1, "--num-images", "-n"),
    output: str = typer.Option("inpaint_{seed}.png", "--output", "-o"),
    dtype: Optional[str] = Dtype,
    quantize: Optional[int] = Quantize,
    low_ram: bool = LowRam,
    force: bool = Force,
):
    """Repaint the white part of MASK in IMAGE, guided by PROMPT."""
    from .images import load_image, load_mask
    from .pipeline import _seed_list

    start = time.perf_counter()
    options = GenerationOptions(steps, guidance, temperature, schedule, greedy)
    img, msk = load_image(image), load_mask(mask)  # bad files fail before the model loads
    seeds = _seed_list(parse_seeds(seed), num_images)
    paths = output_paths(output, seeds, force)
    pipe = load_pipeline(model, dtype, quantize, low_ram)
    settings = options.resolve(pipe, "inpaint")
    with StepProgress(settings["steps"], "inpaint") as progress:
        results = pipe.inpaint(img, msk, prompt, seed=seeds, callback=progress, **settings)
    save_images(results, paths, pipe.name)
    closing_line(start)


@app.command()
@handle_errors
def extend(
    image: str = typer.Argument(..., help="Image to extend."),
    prompts: List[str] = typer.Argument(..., help="One prompt, or one per --direction."),
    direction: List[str] = typer.Option(..., "--direction", "-d", help="left, right, up or down; repeat to chain."),
    offset: int = typer.Option(0, "--offset", help="Extra new token columns/rows per step (reference offset)."),
    model: str = Model,
    steps: Optional[int] = Steps,
    guidance: Optional[float] = Guidance,
    temperature: Optional[float] = Temperature,
    schedule: Optional[str] = Schedule,
    greedy: bool = Greedy,
    seed: Optional[List[str]] = Seed,
    output: str = typer.Option("extend_{seed}.png", "--output", "-o"),
    dtype: Optional[str] = Dtype,
    quantize: Optional[int] = Quantize,
    low_ram: bool = LowRam,
    force: bool = Force,
):
    """Outpaint IMAGE step by step in the given directions."""
    from .images import load_image
    from .pipeline import DIRECTIONS, _seed_list

    start = time.perf_counter()
    bad = [d for d in direction if d.lower() not in DIRECTIONS]
    if bad:
        raise ShowoError(f"unknown direction {bad[0]!r}; choose from {', '.join(DIRECTIONS)}")
    options = GenerationOptions(steps, guidance, temperature, schedule, greedy)
    img = load_image(image)
    seeds = _seed_list(parse_seeds(seed), 1)
    paths = output_paths(output, seeds, force)
    pipe = load_pipeline(model, dtype, quantize, low_ram)
    settings = options.resolve(pipe, "extend")
    results = []
    for sd in seeds:
        with StepProgress(None, "extend") as progress:  # windows per step depend on the canvas shape
            results += pipe.extrapolate(img, prompts, direction, offset=offset, seed=sd, callback=progress, **settings)
    save_images(results, paths, pipe.name)
    closing_line(start)


def _stream_out(pieces) -> str:
    text = []
    for piece in pieces:
        text.append(piece)
        typer.echo(piece, nl=False)
        sys.stdout.flush()
    typer.echo("")
    return "".join(text)


@app.command()
@handle_errors
def ask(
    image: str = typer.Argument(..., help="Image to ask about."),
    question: str = typer.Argument(..., help="The question."),
    model: str = Model,
    max_tokens: int = typer.Option(100, "--max-tokens", help="Longest answer in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (the reference's setting)."),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(0.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    dtype: Optional[str] = Dtype,
    quantize: Optional[int] = Quantize,
    low_ram: bool = LowRam,
):
    """Answer QUESTION about IMAGE (streamed)."""
    from .images import load_image

    start = time.perf_counter()
    img = load_image(image)
    pipe = load_pipeline(model, dtype, quantize, low_ram)
    _stream_out(pipe.stream_ask(img, question, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
    closing_line(start)


@app.command()
@handle_errors
def caption(
    image: str = typer.Argument(..., help="Image to describe."),
    model: str = Model,
    max_tokens: int = typer.Option(100, "--max-tokens"),
    dtype: Optional[str] = Dtype,
    quantize: Optional[int] = Quantize,
    low_ram: bool = LowRam,
):
    """Describe IMAGE."""
    from .images import load_image
    from .pipeline import CAPTION_QUESTION

    start = time.perf_counter()
    img = load_image(image)
    pipe = load_pipeline(model, dtype, quantize, low_ram)
    _stream_out(pipe.stream_ask(img, CAPTION_QUESTION, max_tokens=max_tokens))
    closing_line(start)


@app.command()
@handle_errors
def complete(
    text: str = typer.Argument(..., help="Text to continue."),
    model: str = Model,
    max_tokens: int = typer.Option(100, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(0.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    dtype: Optional[str] = Dtype,
    quantize: Optional[int] = Quantize,
    low_ram: bool = LowRam,
):
    """Continue TEXT (plain language modelling with the KV cache, streamed)."""
    start = time.perf_counter()
    pipe = load_pipeline(model, dtype, quantize, low_ram)
    typer.echo(text, nl=False)
    _stream_out(pipe.stream_complete(text, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
    closing_line(start)


@app.command()
@handle_errors
def convert(
    src: str = typer.Argument(..., help="Official checkpoint: Hub id or folder (pytorch_model.safetensors/.bin)."),
    dst: str = typer.Argument(..., help="Output folder."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default float32; float16 with --quantize)."),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the transformer's Linear layers."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits: 2, 3, 4, 5, 6 or 8."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Group size: 32, 64 or 128."),
    q_head_bits: Optional[int] = typer.Option(None, "--q-head-bits", help="Also quantize embedding and lm_head at this width."),
    vq: Optional[str] = typer.Option(None, "--vq", help="MAGVIT-v2 folder or Hub id (default showlab/magvitv2)."),
    vq_dtype: Optional[str] = typer.Option(None, "--vq-dtype", help="MAGVIT dtype (default float32, float16 when quantized)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: SRC's, else microsoft/phi-1_5)."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
):
    """Convert an official Show-o checkpoint into a showo-mlx folder."""
    from .convert import QuantizeSpec, check_dtype
    from .convert import convert as run

    start = time.perf_counter()
    if dtype is not None:
        check_dtype(dtype)
    spec = QuantizeSpec(q_bits, q_group_size, q_head_bits).validate() if quantize else None
    if not quantize and (q_head_bits is not None):
        raise ShowoError("--q-head-bits needs --quantize")
    run(src, dst, dtype=dtype, quantize=spec, vq=vq, vq_dtype=vq_dtype, tokenizer=tokenizer, force=force,
        log=lambda m: typer.echo(m, err=True))
    closing_line(start)


@app.command()
@handle_errors
def reconstruct(
    image: str = typer.Argument(..., help="Image to encode and decode."),
    output: str = typer.Argument(..., help="PNG to write."),
    model: str = Model,
    force: bool = Force,
):
    """Encode IMAGE with MAGVIT-v2 and decode it again; prints the code grid and PSNR."""
    import mlx.core as mx
    import numpy as np

    from .images import load_image, preprocess_image, save_png, to_uint8
    from .loading import load_magvit, read_model_config, resolve_model
    from .config import MagvitConfig, ShowoConfig

    start = time.perf_counter()
    img = load_image(image)
    paths = output_paths(output, [0], force)
    folder = resolve_model(model, log=lambda m: typer.echo(m, err=True))
    config = read_model_config(folder)
    grid = ShowoConfig.from_dict(config["showo"]).image_grid
    resolution = grid[0] * MagvitConfig.from_dict(config["magvit"]).downsample_factor
    vq = load_magvit(folder, config)
    pixels = preprocess_image(img, resolution)
    codes = vq.encode(mx.array(pixels))
    out = np.array(vq.decode(codes, shape=grid))
    original, rebuilt = to_uint8(pixels)[0].astype(np.float64), to_uint8(out)[0]
    mse = float(np.mean((original - rebuilt.astype(np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    save_png(rebuilt, paths[0], {"source": str(image), "model": model, "task": "reconstruct"})
    typer.echo(f"codes: {grid[0]}x{grid[1]} grid ({codes.shape[1]} tokens); PSNR {psnr:.2f} dB vs the preprocessed input; saved {paths[0]}")
    closing_line(start)


def _register_subcommands() -> None:
    """Commands that live in their own modules: prepare/train/fuse (train/cli.py), bench, doctor."""
    from .bench import register as register_bench
    from .doctor import register as register_doctor
    from .train.cli import register as register_training

    register_training(app)
    register_bench(app)
    register_doctor(app)


_register_subcommands()


def main() -> None:
    from .launcher import prepare_process

    prepare_process()  # --openblas / SHOWO_OPENBLAS=1: re-exec with OpenBLAS preloaded (Linux)
    app()


if __name__ == "__main__":
    main()
