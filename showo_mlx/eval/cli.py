"""`showo eval vqa` and `showo eval geneval`, registered on the main app by `register`.

Bad input is one line on stderr with exit code 2; Ctrl-C exits 130 with every answer or image
written so far kept (a rerun continues from there).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

import typer

from ..cli_common import (
    MODEL_HELP,
    QBitsOption,
    QGroupSizeOption,
    QHeadBitsOption,
    QuantizeOption,
    closing_line,
    handle_errors,
    quantize_spec,
)
from ..cli_sources import current_sources, model_sources

_errors = handle_errors(interrupted="interrupted; the answers/images written so far are kept (rerun to continue)")


def _echo(message: str) -> None:
    typer.echo(message, err=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_") or "model"


def _suffix(value: Optional[str]) -> str:
    from .benchmarks import DEFAULT_SUFFIX

    if value is None:
        return DEFAULT_SUFFIX
    return value.replace("\\n", "\n")  # a shell cannot easily pass a newline


def vqa_command(
    data: str = typer.Argument(..., help="Benchmark data: lmms-lab/POPE, lmms-lab/MME, lmms-lab/GQA (Hub dataset ids) or a local folder/file."),
    model: str = typer.Option("showlab/show-o", "--model", help=MODEL_HELP),
    benchmark: Optional[str] = typer.Option(None, "--benchmark", "-b", help="pope, mme or gqa (default: detected from DATA)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions; results are then indicative (default: all)."),
    prompt_suffix: Optional[str] = typer.Option(None, "--prompt-suffix", help="Appended to every question (default lmms-eval's \"\\nAnswer the question using a single word or phrase.\"; \\n is a newline, \"\" for none)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Longest answer (default lmms-eval's: POPE 128, MME and GQA 16)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for answers.jsonl and results.json (default eval/<benchmark>-<model>)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: float32, float16, bfloat16 (default: float32 on a CPU, the folder's on a GPU)."),
    quantize: bool = QuantizeOption,
    q_bits: Optional[int] = QBitsOption,
    q_group_size: Optional[int] = QGroupSizeOption,
    q_head_bits: Optional[int] = QHeadBitsOption,
    low_ram: bool = typer.Option(False, "--low-ram", help="Least memory (see showo ask --help); off by default."),
    force: bool = typer.Option(False, "--force", help="Discard the answers already in OUTPUT and start over; off by default."),
) -> None:
    """Answer POPE, MME or GQA and score it (greedy, KV-cached, resumable)."""
    from ..pipeline import load
    from .benchmarks import load_benchmark
    from .vqa import format_table, run_vqa

    start = time.perf_counter()
    bench, items = load_benchmark(data, benchmark, limit)
    suffix = _suffix(prompt_suffix)
    tokens = max_tokens if max_tokens is not None else bench.max_tokens
    out = output or Path("eval") / f"{bench.name}-{_slug(model)}"
    spec = quantize_spec(quantize, q_bits, q_group_size, q_head_bits)
    run = {"benchmark": bench.name, "data": data, "model": model, "prompt_suffix": suffix, "max_tokens": tokens,
           "dtype": dtype, "quantize": spec.bits if spec else None, "limit": limit,
           **{k: str(v) for k, v in current_sources().items()}}
    _echo(f"{bench.name}: {len(items)} questions from {data}; answers in {out}")
    pipe = load(model, dtype=dtype, quantize=spec, low_ram=low_ram, log=_echo, **current_sources())
    metrics = run_vqa(pipe, bench, items, out, run=run, suffix=suffix, max_tokens=tokens, force=force, log=_echo)
    typer.echo(format_table(metrics))
    typer.echo(f"results: {out / 'results.json'}")
    closing_line(start)


def geneval_command(
    prompts: Path = typer.Argument(..., help="GenEval's prompts/evaluation_metadata.jsonl."),
    out: Path = typer.Argument(..., help="Image folder for GenEval's evaluate_images.py."),
    model: str = typer.Option("showlab/show-o", "--model", help=MODEL_HELP),
    n: int = typer.Option(4, "--n", "-n", help="Images per prompt (GenEval uses 4)."),
    seed: int = typer.Option(0, "--seed", help="Base seed: sample k of prompt i uses seed + 10000·i + k."),
    batch_size: int = typer.Option(4, "--batch-size", help="Images decoded together."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N prompts (default: all)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Override the model's MaskGIT steps, not comparable with the paper (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Override the model's CFG scale, not comparable with the paper (default: the model's)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: float32, float16, bfloat16 (default: float32 on a CPU, the folder's on a GPU)."),
    quantize: bool = QuantizeOption,
    q_bits: Optional[int] = QBitsOption,
    q_group_size: Optional[int] = QGroupSizeOption,
    q_head_bits: Optional[int] = QHeadBitsOption,
    low_ram: bool = typer.Option(False, "--low-ram", help="Least memory (see showo ask --help); off by default."),
) -> None:
    """Generate GenEval's images (OUT/<index>/samples/<k>.png); score them with GenEval's own tool."""
    from ..pipeline import load
    from . import EvalError
    from .geneval import generate_geneval, read_prompts

    start = time.perf_counter()
    spec = quantize_spec(quantize, q_bits, q_group_size, q_head_bits)
    rows = read_prompts(prompts)
    if limit is not None:
        if limit < 1:
            raise EvalError(f"--limit must be >= 1, got {limit}")
        rows = rows[:limit]
    pipe = load(model, dtype=dtype, quantize=spec, low_ram=low_ram, log=_echo, **current_sources())
    done = generate_geneval(pipe, rows, out, n=n, seed=seed, batch_size=batch_size, steps=steps, guidance=guidance, log=_echo)
    typer.echo(f"{done['images']} images for {done['prompts']} prompts in {out} ({done['generated']} new); "
               f"score with GenEval: python evaluation/evaluate_images.py {out} --outfile results.jsonl --model-path <detector folder>")
    closing_line(start)


def register(app: typer.Typer) -> None:
    from ..cli_args import ShowoGroup

    group = typer.Typer(cls=ShowoGroup, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
                        help="Benchmarks: POPE / MME / GQA answers and scores; GenEval images.")
    group.command("vqa", epilog=(
        "Examples:\n\n"
        "  showo eval vqa lmms-lab/POPE --model showlab/show-o\n\n"
        "  showo eval vqa lmms-lab/MME --model showlab/show-o-512x512 --limit 200\n\n"
        "  showo eval vqa data/gqa --benchmark gqa --model ./show-o-4bit -o eval/gqa-4bit\n"
    ))(_errors(model_sources(vqa_command)))
    group.command("geneval", epilog=(
        "Examples:\n\n"
        "  showo eval geneval geneval/prompts/evaluation_metadata.jsonl out/geneval --model showlab/show-o\n\n"
        "  showo eval geneval prompts.jsonl out/geneval-512 --model showlab/show-o-512x512 -n 4 --limit 50\n"
    ))(_errors(model_sources(geneval_command)))
    app.add_typer(group, name="eval")
