"""`showo`: the command line.

Conventions (the tools Mac users already know: mlx-lm, mlx-vlm, mflux):

* `-h/--help` and `showo --version`; usage lines name positionals in capitals; every option's help
  gives its default; every command's help ends with examples.
* Short options follow mlx-lm: `-p` prompt, `-m` max tokens (text commands), `-q` quantize (a switch,
  with `--q-bits/--q-group-size/--q-head-bits`). `--model` has no short form, so `-m` has one
  meaning everywhere. `--temp` = `--temperature` for text; `--prompt/-p`, `--image` (and `--mask`)
  can replace the positionals.
* `--seed 1 2 3` (mflux), `--seed 1 --seed 2` and `--seed 1,2` are all one image per seed; stray
  words after a switch or after the seeds are refused, never turned into prompts (cli_args.py).
* Outputs: `image.png`, then `image_1.png`, … (the default never overwrites); `{seed}`/`{i}` in
  `--output`; every path is checked before the model loads (cli_outputs.py); each image is saved
  as soon as it is done; PNGs record every setting (metadata.py, `showo info`).
* Bad input is one line on stderr with exit code 2 (never a traceback); Ctrl-C stops between steps
  with exit code 130, keeping the images already saved. `--quiet` leaves only results and errors;
  `--verbose/-v` adds debug notes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .cli_args import ShowoGroup
from .errors import ShowoError

app = typer.Typer(
    cls=ShowoGroup,
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Show-o on Apple silicon with MLX: generate, inpaint, extend, ask, convert, train.",
    pretty_exceptions_enable=False,
)

from .cli_common import (  # noqa: E402 - after `app`, which the registered modules extend
    MODEL_HELP,
    QBitsOption,
    QGroupSizeOption,
    QHeadBitsOption,
    QuantizeOption,
    closing_line,
    debug,
    handle_errors,
    quantize_spec,
    say,
    verbosity,
)
from .cli_sources import current_sources, model_sources  # noqa: E402

DEFAULT_MODEL = "showlab/show-o"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"showo-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Show-o on Apple silicon with MLX: generate, inpaint, extend, ask, convert, train."""


def examples(*lines: str) -> str:
    """A command's epilog: its examples, one per paragraph (rich help keeps paragraphs)."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


# -- arguments -----------------------------------------------------------------------------------
def parse_seeds(values: Optional[List[str]]) -> Optional[list[int]]:
    if not values:
        return None
    seeds = []
    for v in values:
        for part in str(v).split(","):
            if not part:
                continue
            try:
                seeds.append(int(part))
            except ValueError:
                raise ShowoError(f"--seed takes integers from 0 to 2**63 - 1, got {part!r}") from None
    return seeds


def fill_slots(slots: list[tuple[str, str, Optional[str]]], positionals: list[str]) -> list[str]:
    """Positional arguments fill the slots their option (--image, --prompt, …) left empty, in order.
    `slots` holds (NAME, --option, value from the option or None)."""
    rest, values = [p for p in positionals if p is not None], []
    for name, option, value in slots:
        if value is None:
            if not rest:
                raise ShowoError(f"missing {name}: give it as an argument or with {option}")
            value = rest.pop(0)
        values.append(value)
    if rest:
        raise ShowoError(f"unexpected extra argument {rest[0]!r} (its slot was given with an option; quote a text with spaces)")
    return values


def check_text_seed(seed: Optional[int]) -> Optional[int]:
    from .pipeline import check_seed

    return None if seed is None else check_seed(seed)


# -- model and progress ------------------------------------------------------------------------
def load_pipeline(model: Optional[str], dtype: Optional[str], quantize, low_ram: bool = False, sources: Optional[dict] = None):
    """Load the model for a command: Hub id or folder (default showlab/show-o), `quantize` a
    QuantizeSpec or None (cli_common.quantize_spec), with the command's --adapter-path,
    --adapter-scale, --vq and --tokenizer (cli_sources.model_sources)."""
    from .pipeline import load

    start = time.perf_counter()
    sources = current_sources() if sources is None else sources  # given explicitly off the command's thread
    pipe = load(model or DEFAULT_MODEL, dtype=dtype, quantize=quantize, low_ram=low_ram, log=say, **sources)
    debug(f"model {pipe.model_ref} from {pipe.folder} in {time.perf_counter() - start:.1f} s "
          f"(dtype {dtype or 'as stored'}, {'quantized at load' if quantize else 'no load-time quantization'})")
    return pipe


class StepProgress:
    """tqdm over MaskGIT steps (all batches and windows), used as the decode loop's callback."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False, disable=verbosity() == 0)

    def __call__(self, step, steps, tokens):
        self.bar.update(1)

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


class GenerationOptions:
    """The generation options shared by generate, inpaint and extend."""

    def __init__(self, steps, guidance, temperature, schedule, greedy, force: bool = False, top_k=None):
        self.overrides = dict(steps=steps, guidance=guidance, temperature=temperature, schedule=schedule, greedy=greedy, top_k=top_k)
        self.allow_long = force  # --force also lifts the library's bounds on work (steps > 1000)
        precheck(steps, guidance, temperature, schedule, force, top_k)  # before loading gigabytes of weights

    def resolve(self, pipe, task: str) -> dict:
        """The model's defaults for `task` with the user's overrides, as keyword arguments."""
        s = pipe.settings(task, allow_long=self.allow_long, **self.overrides)
        say(f"{pipe.name}: {task}, {s.steps} steps, guidance {s.guidance}, schedule {s.schedule}, "
            + ("greedy" if s.greedy else f"temperature {s.temperature}")
            + (f", top-k {s.top_k}" if s.top_k else "") + f" ({pipe.family.name} defaults)")
        return dict(steps=s.steps, guidance=s.guidance, temperature=s.temperature, schedule=s.schedule, greedy=bool(s.greedy),
                    top_k=s.top_k, allow_long=self.allow_long)


def precheck(steps, guidance, temperature, schedule, allow_long: bool = False, top_k=None) -> None:
    """Validate generation options before loading gigabytes of weights."""
    from .pipeline import GenerationSettings

    GenerationSettings(
        steps if steps is not None else 1,
        guidance if guidance is not None else 0.0,
        temperature if temperature is not None else 0.0,
        schedule or "cosine",
        top_k=top_k,
    ).validate(allow_long)


class Saver:
    """Saves each image the moment it is ready, to the next planned path."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        self.saved: list[Path] = []

    def __call__(self, result) -> None:
        path = self.paths[len(self.saved)]
        result.save(path)
        self.saved.append(path)
        typer.echo(f"saved {path} ({result.image.width}x{result.image.height}, "
                   + ("greedy" if result.settings.greedy else f"seed {result.seed}") + ")")


# -- shared options ------------------------------------------------------------------------------
Model = typer.Option(None, "--model", help=MODEL_HELP + " Default: showlab/show-o.")
Steps = typer.Option(None, "--steps", help="MaskGIT steps (default: the model's: 18 at 256 px, 16 for inpaint/extend, 50 at 512 px); at most 1000 without --force.")
Guidance = typer.Option(None, "--guidance", "-g", help="CFG scale s in (1+s)·cond − s·uncond; 0 = off (default: the model's: 1.75 at 256 px, 5 at 512 px).")
Temperature = typer.Option(None, "--temperature", help="Re-masking noise temperature (default 1.0).")
Schedule = typer.Option(None, "--schedule", help="Mask schedule: cosine, linear, powK (e.g. pow2), sigmoid (default cosine).")
Greedy = typer.Option(None, "--greedy", help="Deterministic: argmax sampling, no re-masking noise; off by default.")
Seed = typer.Option(None, "--seed", "-s", metavar="SEED", help="Seed(s) from 0 to 2**63 - 1, one image each: --seed 1 2 3, repeated or comma-separated (default: random).")
NumImages = typer.Option(None, "--num-images", "-n", help="Images per prompt, seeds s, s+1, … (default 1).")
Dtype = typer.Option(None, "--dtype", help="Compute dtype: float32, float16, bfloat16 (default: the folder's).")
Force = typer.Option(False, "--force", help="Overwrite existing outputs and allow --steps above 1000; off by default.")
LowRam = typer.Option(False, "--low-ram", help="Least memory: cap MLX's buffer cache, run MAGVIT with minimal headroom, free its encoder after use; off by default.")
ImageOpt = typer.Option(None, "--image", help="The input image (instead of the IMAGE argument).")
MaxTokens = typer.Option(100, "--max-tokens", "-m", help="Longest answer in tokens (mlx-lm's -m).")
TextTemperature = typer.Option(0.0, "--temperature", "--temp", help="Sampling temperature; 0 = greedy, the reference's setting.")
TopK = typer.Option(0, "--top-k", help="Sample among the k likeliest tokens; 0 = no limit.")
TopP = typer.Option(0.0, "--top-p", help="Nucleus sampling mass; 0 = off.")
TextSeed = typer.Option(None, "--seed", help="Sampling seed from 0 to 2**63 - 1 (default: random; unused when greedy).")
ImageTopK = typer.Option(None, "--top-k", help="Sample each image token among the K most probable codes (Show-o Turbo; default: the model family's, 0 = off).")


def output_option(default: str) -> typer.Option:
    return typer.Option(None, "--output", "-o", help=f"PNG path; {{seed}} and {{i}} are filled in (default {default}, then "
                        f"{Path(default).stem}_1.png, … never overwriting).")


# -- image commands --------------------------------------------------------------------------------
@app.command(epilog=examples(
    'showo generate "a rally car race" --seed 1 2 3',
    'showo generate "a corgi" -n 4 --steps 18 -o "corgi_{seed}.png"',
    'showo generate --config-from-metadata image.png --seed 7',
))
@handle_errors
@model_sources
def generate(
    prompts: Optional[List[str]] = typer.Argument(None, metavar="PROMPT", help="One or more prompts (\"\" is the unconditional prompt)."),
    prompt_opt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", metavar="TEXT", help="A prompt (repeatable), the same as a PROMPT argument."),
    model: Optional[str] = Model,
    steps: Optional[int] = Steps,
    guidance: Optional[float] = Guidance,
    temperature: Optional[float] = Temperature,
    schedule: Optional[str] = Schedule,
    greedy: Optional[bool] = Greedy,
    top_k: Optional[int] = ImageTopK,
    seed: Optional[List[str]] = Seed,
    num_images: Optional[int] = NumImages,
    output: Optional[str] = output_option("image.png"),
    batch_size: int = typer.Option(4, "--batch-size", help="Images decoded together."),
    config_from_metadata: Optional[str] = typer.Option(
        None, "--config-from-metadata", help="Re-run the settings a showo PNG records; options given here override them (default: none)."),
    dtype: Optional[str] = Dtype,
    quantize: bool = QuantizeOption,
    q_bits: Optional[int] = QBitsOption,
    q_group_size: Optional[int] = QGroupSizeOption,
    q_head_bits: Optional[int] = QHeadBitsOption,
    low_ram: bool = LowRam,
    force: bool = Force,
):
    """Text to image: one PNG per prompt and seed."""
    from .pipeline import _seed_list

    start = time.perf_counter()
    prompts = [*(prompts or []), *(prompt_opt or [])]
    seeds = parse_seeds(seed)
    spec = quantize_spec(quantize, q_bits, q_group_size, q_head_bits)
    if config_from_metadata:
        from .metadata import read_record

        record = read_record(config_from_metadata)
        if record.get("task") != "generate":
            raise ShowoError(f"{config_from_metadata} was made by `showo {record.get('task')}`; --config-from-metadata re-runs generate images")
        prompts = prompts or [record["prompt"]]
        seeds = seeds if seeds is not None else [record["seed"]]
        steps, guidance = steps if steps is not None else record["steps"], guidance if guidance is not None else record["guidance"]
        temperature = temperature if temperature is not None else record["temperature"]
        schedule, greedy = schedule or record["schedule"], greedy if greedy is not None else record["greedy"]
        top_k = top_k if top_k is not None else record.get("top_k")
        model, dtype = model or record["model"], dtype or record.get("dtype")
        if spec is None and record.get("quantize"):
            q = record["quantize"]
            spec = quantize_spec(True, q.get("bits"), q.get("group_size"), q.get("head_bits"))
    if not prompts:
        raise ShowoError("no prompt given: pass PROMPT or --prompt (a prompt that is a number goes after `--`, "
                         "e.g. showo generate --seed 1 -- 2)")
    n = 1 if num_images is None else num_images
    if n < 1:
        raise ShowoError(f"--num-images must be >= 1, got {n}")
    options = GenerationOptions(steps, guidance, temperature, schedule, greedy, force, top_k)
    seeds = _seed_list(seeds, n)
    rows = [(p, s) for p in prompts for s in seeds]
    save = Saver(_plan(output, "image.png", [s for _, s in rows], force))
    pipe = load_pipeline(model, dtype, spec, low_ram)
    for p in pipe.truncated(prompts):
        say(f"note: prompt truncated to the model's 126-token limit: {p[:40]!r}…")
    settings = options.resolve(pipe, "generate")
    with StepProgress(settings["steps"] * -(-len(rows) // max(1, batch_size)), "generate") as progress:
        pipe.generate(prompts, seed=seeds, batch_size=batch_size, callback=progress, on_image=save, **settings)
    closing_line(start)


def _plan(output: Optional[str], default: str, seeds: list, force: bool) -> list[Path]:
    from .cli_outputs import plan_outputs

    return plan_outputs(output, default, seeds, force)


@app.command(epilog=examples(
    'showo inpaint photo.png mask.png "a red double-decker bus"',
    'showo inpaint --image photo.png --mask mask.png -p "a red bus" --seed 1 2 -o "bus_{seed}.png"',
))
@handle_errors
@model_sources
def inpaint(
    image: Optional[str] = typer.Argument(None, metavar="IMAGE", help="Image to edit."),
    mask: Optional[str] = typer.Argument(None, metavar="MASK", help="Mask image: white = repaint."),
    prompt: Optional[str] = typer.Argument(None, metavar="PROMPT", help="What to paint in the white region."),
    image_opt: Optional[str] = ImageOpt,
    mask_opt: Optional[str] = typer.Option(None, "--mask", help="The mask image (instead of the MASK argument)."),
    prompt_opt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt (instead of the PROMPT argument)."),
    model: Optional[str] = Model,
    steps: Optional[int] = Steps,
    guidance: Optional[float] = Guidance,
    temperature: Optional[float] = Temperature,
    schedule: Optional[str] = Schedule,
    greedy: Optional[bool] = Greedy,
    top_k: Optional[int] = ImageTopK,
    seed: Optional[List[str]] = Seed,
    num_images: Optional[int] = NumImages,
    output: Optional[str] = output_option("inpaint.png"),
    dtype: Optional[str] = Dtype,
    quantize: bool = QuantizeOption,
    q_bits: Optional[int] = QBitsOption,
    q_group_size: Optional[int] = QGroupSizeOption,
    q_head_bits: Optional[int] = QHeadBitsOption,
    low_ram: bool = LowRam,
    force: bool = Force,
):
    """Repaint the white part of MASK in IMAGE, guided by PROMPT."""
    from .images import load_image, load_mask
    from .pipeline import _seed_list

    start = time.perf_counter()
    image, mask, prompt = fill_slots([("IMAGE", "--image", image_opt), ("MASK", "--mask", mask_opt), ("PROMPT", "--prompt", prompt_opt)],
                                     [image, mask, prompt])
    spec = quantize_spec(quantize, q_bits, q_group_size, q_head_bits)
    options = GenerationOptions(steps, guidance, temperature, schedule, greedy, force, top_k)
    img, msk = load_image(image), load_mask(mask)  # bad files fail before the model loads
    seeds = _seed_list(parse_seeds(seed), num_images or 1)
    save = Saver(_plan(output, "inpaint.png", seeds, force))
    pipe = load_pipeline(model, dtype, spec, low_ram)
    settings = options.resolve(pipe, "inpaint")
    with StepProgress(settings["steps"], "inpaint") as progress:
        results = pipe.inpaint(img, msk, prompt, seed=seeds, callback=progress, **settings)
    for r in results:
        save(r)
    closing_line(start)


@app.command(epilog=examples(
    'showo extend photo.png "a lake" "a forest" -d left -d right',
    'showo extend photo.png "a wide beach" -d left -d right -n 2 --seed 5',
    'showo extend --image photo.png -p "the sky" -d up --offset 2',
))
@handle_errors
@model_sources
def extend(
    image: Optional[str] = typer.Argument(None, metavar="IMAGE", help="Image to extend."),
    prompts: Optional[List[str]] = typer.Argument(None, metavar="PROMPT", help="One prompt, or one per --direction."),
    image_opt: Optional[str] = ImageOpt,
    prompt_opt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", metavar="TEXT", help="A prompt (repeatable), the same as a PROMPT argument."),
    direction: List[str] = typer.Option(..., "--direction", "-d", metavar="DIRECTION", help="left, right, up or down; repeat to chain (required)."),
    offset: int = typer.Option(0, "--offset", help="Extra new token columns/rows per step (the reference's offset)."),
    model: Optional[str] = Model,
    steps: Optional[int] = Steps,
    guidance: Optional[float] = Guidance,
    temperature: Optional[float] = Temperature,
    schedule: Optional[str] = Schedule,
    greedy: Optional[bool] = Greedy,
    top_k: Optional[int] = ImageTopK,
    seed: Optional[List[str]] = Seed,
    num_images: Optional[int] = NumImages,
    output: Optional[str] = output_option("extend.png"),
    dtype: Optional[str] = Dtype,
    quantize: bool = QuantizeOption,
    q_bits: Optional[int] = QBitsOption,
    q_group_size: Optional[int] = QGroupSizeOption,
    q_head_bits: Optional[int] = QHeadBitsOption,
    low_ram: bool = LowRam,
    force: bool = Force,
):
    """Outpaint IMAGE step by step in the given directions."""
    from .images import load_image
    from .pipeline import DIRECTIONS, _seed_list

    start = time.perf_counter()
    positionals = [p for p in [image, *(prompts or [])] if p is not None]
    if image_opt is None:
        if not positionals:
            raise ShowoError("missing IMAGE: give it as an argument or with --image")
        image_opt, positionals = positionals[0], positionals[1:]
    prompts = [*positionals, *(prompt_opt or [])]
    if not prompts:
        raise ShowoError("missing PROMPT: give one prompt, or one per --direction")
    bad = [d for d in direction if d.lower() not in DIRECTIONS]
    if bad:
        raise ShowoError(f"unknown direction {bad[0]!r}; choose from {', '.join(DIRECTIONS)}")
    spec = quantize_spec(quantize, q_bits, q_group_size, q_head_bits)
    options = GenerationOptions(steps, guidance, temperature, schedule, greedy, force, top_k)
    img = load_image(image_opt)
    seeds = _seed_list(parse_seeds(seed), num_images or 1)
    save = Saver(_plan(output, "extend.png", seeds, force))
    pipe = load_pipeline(model, dtype, spec, low_ram)
    settings = options.resolve(pipe, "extend")
    total = settings["steps"] * pipe.extension_window_count(direction, offset) * len(seeds)
    with StepProgress(total, "extend") as progress:
        for sd in seeds:
            for r in pipe.extrapolate(img, prompts, direction, offset=offset, seed=sd, callback=progress, **settings):
                save(r)
    closing_line(start)


# -- text commands ---------------------------------------------------------------------------------
def _stream_out(responses):
    """Print the streamed text on stdout; return the last response (its statistics)."""
    last = None
    for last in responses:
        typer.echo(last, nl=False)
        sys.stdout.flush()
    typer.echo("")
    return last


def _summary(last) -> None:
    """mlx-lm's closing lines (on stderr, so stdout holds only the text)."""
    if last is None:
        say("No text generated")
        return
    say(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
    say(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
    say(f"Peak memory: {last.peak_memory:.3f} GB")


@app.command(epilog=examples(
    'showo ask photo.png "What is in this image?"',
    'showo ask --image photo.png --prompt "How many people?" -m 30',
    'showo ask photo.png "Describe it." --temp 0.7 --top-p 0.9 --seed 3',
))
@handle_errors
@model_sources
def ask(
    image: Optional[str] = typer.Argument(None, metavar="IMAGE", help="Image to ask about."),
    question: Optional[str] = typer.Argument(None, metavar="QUESTION", help="The question."),
    image_opt: Optional[str] = ImageOpt,
    prompt_opt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The question (instead of the QUESTION argument)."),
    model: Optional[str] = Model,
    max_tokens: int = MaxTokens,
    temperature: float = TextTemperature,
    top_k: int = TopK,
    top_p: float = TopP,
    seed: Optional[int] = TextSeed,
    dtype: Optional[str] = Dtype,
    quantize: bool = QuantizeOption,
    q_bits: Optional[int] = QBitsOption,
    q_group_size: Optional[int] = QGroupSizeOption,
    q_head_bits: Optional[int] = QHeadBitsOption,
    low_ram: bool = LowRam,
):
    """Answer QUESTION about IMAGE (streamed)."""
    from .images import load_image

    start = time.perf_counter()
    image, question = fill_slots([("IMAGE", "--image", image_opt), ("QUESTION", "--prompt", prompt_opt)], [image, question])
    spec, seed = quantize_spec(quantize, q_bits, q_group_size, q_head_bits), check_text_seed(seed)
    img = load_image(image)
    pipe = load_pipeline(model, dtype, spec, low_ram)
    _summary(_stream_out(pipe.stream_ask(img, question, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)))
    closing_line(start)


@app.command(epilog=examples(
    'showo caption photo.png',
    'showo caption --image photo.png --max-tokens 60 --temp 0.7 --seed 1',
))
@handle_errors
@model_sources
def caption(
    image: Optional[str] = typer.Argument(None, metavar="IMAGE", help="Image to describe."),
    image_opt: Optional[str] = ImageOpt,
    model: Optional[str] = Model,
    max_tokens: int = MaxTokens,
    temperature: float = TextTemperature,
    top_k: int = TopK,
    top_p: float = TopP,
    seed: Optional[int] = TextSeed,
    dtype: Optional[str] = Dtype,
    quantize: bool = QuantizeOption,
    q_bits: Optional[int] = QBitsOption,
    q_group_size: Optional[int] = QGroupSizeOption,
    q_head_bits: Optional[int] = QHeadBitsOption,
    low_ram: bool = LowRam,
):
    """Describe IMAGE (streamed)."""
    from .images import load_image
    from .pipeline import CAPTION_QUESTION

    start = time.perf_counter()
    (image,) = fill_slots([("IMAGE", "--image", image_opt)], [image])
    spec, seed = quantize_spec(quantize, q_bits, q_group_size, q_head_bits), check_text_seed(seed)
    img = load_image(image)
    pipe = load_pipeline(model, dtype, spec, low_ram)
    _summary(_stream_out(pipe.stream_ask(img, CAPTION_QUESTION, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)))
    closing_line(start)


@app.command(epilog=examples(
    'showo complete "Once upon a time" --max-tokens 60',
    'showo complete -p "The recipe:" -m 40 --temp 0.8 --seed 2',
))
@handle_errors
@model_sources
def complete(
    text: Optional[str] = typer.Argument(None, metavar="TEXT", help="Text to continue."),
    prompt_opt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The text (instead of the TEXT argument)."),
    model: Optional[str] = Model,
    max_tokens: int = MaxTokens,
    temperature: float = TextTemperature,
    top_k: int = TopK,
    top_p: float = TopP,
    seed: Optional[int] = TextSeed,
    dtype: Optional[str] = Dtype,
    quantize: bool = QuantizeOption,
    q_bits: Optional[int] = QBitsOption,
    q_group_size: Optional[int] = QGroupSizeOption,
    q_head_bits: Optional[int] = QHeadBitsOption,
    low_ram: bool = LowRam,
):
    """Continue TEXT (plain language modelling with the KV cache, streamed)."""
    start = time.perf_counter()
    (text,) = fill_slots([("TEXT", "--prompt", prompt_opt)], [text])
    spec, seed = quantize_spec(quantize, q_bits, q_group_size, q_head_bits), check_text_seed(seed)
    pipe = load_pipeline(model, dtype, spec, low_ram)
    typer.echo(text, nl=False)
    _summary(_stream_out(pipe.stream_complete(text, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)))
    closing_line(start)


# -- models ---------------------------------------------------------------------------------------
@app.command(epilog=examples(
    'showo convert showlab/show-o ./show-o-mlx',
    'showo convert showlab/show-o ./show-o-4bit -q --q-bits 4 --q-group-size 128 --q-head-bits 4',
))
@handle_errors
def convert(
    src: str = typer.Argument(..., metavar="SRC", help="Official checkpoint: Hub id or folder (pytorch_model.safetensors/.bin)."),
    dst: str = typer.Argument(..., metavar="DST", help="Output folder."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default float32; float16 with -q)."),
    quantize: bool = QuantizeOption,
    q_bits: Optional[int] = QBitsOption,
    q_group_size: Optional[int] = QGroupSizeOption,
    q_head_bits: Optional[int] = QHeadBitsOption,
    vq: Optional[str] = typer.Option(None, "--vq", help="MAGVIT-v2 folder or Hub id (default showlab/magvitv2)."),
    vq_dtype: Optional[str] = typer.Option(None, "--vq-dtype", help="MAGVIT dtype (default float32, float16 when quantized)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: SRC's, else microsoft/phi-1_5)."),
    force: bool = typer.Option(False, "--force", help="Replace DST only if it is empty or a previous showo-mlx model folder; off by default."),
    upload_repo: Optional[str] = typer.Option(None, "--upload-repo", help="Then publish the folder as this Hub repo (owner/name), which `--model owner/name` loads (default: no upload)."),
    vision_tower: Optional[str] = typer.Option(None, "--vision-tower", help="CLIP tower folder or Hub id for w_clip_vit checkpoints (default openai/clip-vit-large-patch14-336)."),
    vision_dtype: Optional[str] = typer.Option(None, "--vision-dtype", help="CLIP tower dtype (default like MAGVIT's)."),
    q_vision: bool = typer.Option(False, "--q-vision", help="With -q: quantize the CLIP tower's Linear layers too; off by default."),
    no_vq: bool = typer.Option(False, "--no-vq", help="Leave MAGVIT out: an understanding-only folder (w_clip_vit checkpoints); off by default."),
    family: Optional[str] = typer.Option(None, "--family", help="Model family when SRC's name does not tell it, e.g. turbo-512 for a local Show-o Turbo copy (default: from SRC's name and config)."),
):
    """Convert an official Show-o checkpoint into a showo-mlx folder."""
    from .convert import check_dtype
    from .convert import convert as run

    start = time.perf_counter()
    if dtype is not None:
        check_dtype(dtype)
    spec = quantize_spec(quantize, q_bits, q_group_size, q_head_bits)
    if upload_repo:
        from .convert import check_upload_repo

        check_upload_repo(upload_repo)  # before converting gigabytes
    out = run(src, dst, dtype=dtype, quantize=spec, vq=vq, vq_dtype=vq_dtype, tokenizer=tokenizer, force=force, log=say,
              vision_tower=vision_tower, vision_dtype=vision_dtype, quantize_vision=q_vision, no_vq=no_vq, family=family)
    if upload_repo:
        from .convert import upload_folder_to_hub

        upload_folder_to_hub(out, upload_repo, log=say)
    closing_line(start)


@app.command(epilog=examples(
    'showo reconstruct photo.png rebuilt.png',
    'showo reconstruct photo.png rebuilt.png --model ./show-o-mlx --force',
))
@handle_errors
@model_sources(adapters=False)
def reconstruct(
    image: str = typer.Argument(..., metavar="IMAGE", help="Image to encode and decode."),
    output: str = typer.Argument(..., metavar="OUTPUT", help="PNG to write."),
    model: Optional[str] = Model,
    force: bool = Force,
):
    """Encode IMAGE with MAGVIT-v2 and decode it again; prints the code grid and PSNR."""
    import mlx.core as mx
    import numpy as np

    from .config import MagvitConfig, ShowoConfig
    from .images import load_image, preprocess_image, save_png, to_uint8
    from .loading import load_magvit, read_model_config, resolve_model

    start = time.perf_counter()
    model = model or DEFAULT_MODEL
    img = load_image(image)
    paths = _plan(output, output, [0], force)
    folder = resolve_model(model, log=say, **current_sources(adapters=False))
    config = read_model_config(folder)
    grid = ShowoConfig.from_dict(config["showo"]).image_grid
    vq = load_magvit(folder, config)  # first: a folder without MAGVIT (--no-vq) fails in one line
    resolution = grid[0] * MagvitConfig.from_dict(config["magvit"]).downsample_factor
    pixels = preprocess_image(img, resolution)
    codes = vq.encode(mx.array(pixels))
    out = np.array(vq.decode(codes, shape=grid))
    original, rebuilt = to_uint8(pixels)[0].astype(np.float64), to_uint8(out)[0]
    mse = float(np.mean((original - rebuilt.astype(np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    save_png(rebuilt, paths[0], {"source": str(image), "model": model, "task": "reconstruct", "Software": f"showo-mlx {__version__}"})
    typer.echo(f"codes: {grid[0]}x{grid[1]} grid ({codes.shape[1]} tokens); PSNR {psnr:.2f} dB vs the preprocessed input; saved {paths[0]}")
    closing_line(start)


def _register_subcommands() -> None:
    """Commands that live in their own modules: prepare/train/fuse/init (train/), bench, doctor, info,
    serve (server/) and eval (eval/); the last two are separable packages."""
    from .bench import register as register_bench
    from .doctor import register as register_doctor
    from .metadata import register as register_info
    from .train.cli import register as register_training

    register_training(app)
    register_bench(app)
    register_info(app)
    register_doctor(app)
    try:
        from .server.cli import register as register_server
    except ModuleNotFoundError as e:  # showo_mlx/server/ left out: no `showo serve`
        if e.name != f"{__package__}.server":
            raise
    else:
        register_server(app)
    from .train.init import register as register_init

    register_init(app)
    try:  # showo_mlx/eval is a separable package: the other commands work without it
        from .eval.cli import register as register_eval
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("showo_mlx.eval"):
            raise
    else:
        register_eval(app)


_register_subcommands()


def main() -> None:
    from .launcher import prepare_process

    prepare_process()  # --openblas / SHOWO_OPENBLAS=1: re-exec with OpenBLAS preloaded (Linux)
    app()


if __name__ == "__main__":
    main()
