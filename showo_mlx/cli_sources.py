"""Where a command's model parts come from: `--adapter-path`, `--adapter-scale`, `--vq`, `--tokenizer`.

Every command that takes `--model` gets these options from one decorator instead of four more
parameters in each signature:

    @app.command()
    @handle_errors
    @model_sources                      # or @model_sources(adapters=False) for prepare/train/fuse
    def generate(prompts, model=..., ...):
        pipe = load_pipeline(model, ...)   # reads them through `current_sources()`

The decorator appends the options to the signature typer reads, takes their values out of the
call, and makes them visible to `current_sources()` for the duration of the command.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from typing import Any, Callable, Optional

import typer

_SOURCES: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("showo_model_sources", default={})

ADAPTER_HELP = "LoRA adapters folder written by `showo train --lora` (RUN/adapters), applied at load time (default: none)."
SCALE_HELP = "Strength of the adapters: 1 = as trained, 0 = the base model (default 1)."
VQ_HELP = "MAGVIT-v2 folder or Hub id for an official checkpoint (default: showlab/magvitv2)."
TOKENIZER_HELP = "Tokenizer folder or Hub id for an official checkpoint (default: its own, else microsoft/phi-1_5)."


def _options(adapters: bool) -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    params = []
    if adapters:
        params += [
            inspect.Parameter("adapter_path", kw, annotation=Optional[str],
                              default=typer.Option(None, "--adapter-path", metavar="DIR", help=ADAPTER_HELP)),
            inspect.Parameter("adapter_scale", kw, annotation=float,
                              default=typer.Option(1.0, "--adapter-scale", metavar="SCALE", help=SCALE_HELP)),
        ]
    params += [
        inspect.Parameter("vq", kw, annotation=Optional[str], default=typer.Option(None, "--vq", metavar="DIR|REPO", help=VQ_HELP)),
        inspect.Parameter("tokenizer", kw, annotation=Optional[str],
                          default=typer.Option(None, "--tokenizer", metavar="DIR|REPO", help=TOKENIZER_HELP)),
    ]
    return params


def model_sources(fn: Callable | None = None, *, adapters: bool = True) -> Callable:
    """Add the model-source options to a typer command (see the module docstring)."""

    def decorate(fn: Callable) -> Callable:
        extra = _options(adapters)
        names = [p.name for p in extra]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = {n: kwargs.pop(n, None) for n in names}
            if adapters and values.get("adapter_scale") is None:
                values["adapter_scale"] = 1.0
            token = _SOURCES.set(values)
            try:
                return fn(*args, **kwargs)
            finally:
                _SOURCES.reset(token)

        sig = inspect.signature(fn, eval_str=True)
        wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
        wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), **{p.name: p.annotation for p in extra}}
        return wrapper

    return decorate(fn) if fn is not None else decorate


def current_sources(*, adapters: bool = True) -> dict[str, Any]:
    """The running command's source options as keyword arguments for `load()` (adapter_path,
    adapter_scale, vq, tokenizer) or, with adapters=False, for `resolve_model()` (vq, tokenizer)."""
    values = dict(_SOURCES.get())
    if not adapters:
        values = {k: values.get(k) for k in ("vq", "tokenizer")}
    if values.get("adapter_path") is None and values.get("adapter_scale") == 1.0:
        values.pop("adapter_scale")  # the default scale of no adapters says nothing
    return {k: v for k, v in values.items() if v is not None}
