"""`showo bench`: what the caches buy, measured in one run on this machine.

Three tasks, each the way the pipeline runs it and the way the reference runs it:

* t2i: MaskGIT steps (batch 1, CFG on) with the text prefixes cached (`CachedImageLogits`) vs the
  reference's full recompute of both rows over the whole vocabulary (`RecomputeImageLogits`);
* ask: answer tokens with the KV cache (`generate_tokens`) vs the reference's full forward of the
  whole sequence per token (`models/modeling_showo.py`, `Showo.mmu_generate`);
* MAGVIT-v2 encode and decode;
* with `--turbo`, Show-o Turbo's image (4 steps, no CFG, top-k) beside Show-o's default image (18
  steps at 256 px / 50 at 512 px, CFG): the user-visible speed-up of the Turbo checkpoints;
* `--only clip`: the CLIP path of the w_clip_vit checkpoints (preprocessing, the CLIP tower up to
  its penultimate layer, the projector, prefill over the ~640-position prompt, KV-cached tokens vs
  the reference's full recompute per token).

Without `--model` the full-size architecture is built with random weights (nothing is downloaded):
speed and memory depend on shapes, not on values; `--random small` builds a scaled-down one for a
check of the whole run in seconds. The defaults are sized to finish in a few minutes on a CPU: 3
timed MaskGIT steps per path (the 18-step image is extrapolated from them) and the reference's
per-token recompute timed at 5 evenly spaced answer positions; the log gives an ETA for each part.
Every timed call follows a warm-up call of the same shape and is fully evaluated; greedy decoding
makes both paths of a task comparable output for output, and the run reports whether they agree.
Peak memory is MLX's active-memory peak per phase (`mx.reset_peak_memory` before it), resident
weights included.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .attention import attention_mask
from .config import MagvitCoderConfig, MagvitConfig, ShowoConfig
from .convert import DTYPES, QuantizeSpec, quantize_transformer
from .errors import ShowoError
from .layout import mmu_layout
from .maskgit import GreedyRandomness, decode_image_tokens
from .memory import GB, LOW_RAM_HEADROOM, apply_low_ram, magvit_throttle, max_rss_bytes, peak_bytes, reset_peak
from .model import ShowoTransformer
from .prompting import Prompting, SpecialIds
from .t2i import CachedImageLogits, RecomputeImageLogits, UncondPrefixStore

PROMPT = "a red fox sitting in fresh snow at sunrise, highly detailed photograph"
QUESTION = "What is shown in this image? Describe it in detail."
PHASES = ("t2i", "ask", "magvit")
ALL_PHASES = PHASES + ("clip",)  # clip runs on request (--only clip) or for a w_clip_vit --model
TURBO_STEPS = 4


RANDOM_SIZES = ("256", "512", "small")
DEFAULT_STEPS = 3  # timed per path; the default-length image is extrapolated from them
DEFAULT_RECOMPUTE_TOKENS = 5  # recomputed answer positions, evenly spaced


@dataclass
class BenchOptions:
    model: str | None = None  # converted/official folder or Hub id; None = random weights
    resolution: int = 256  # random weights only: 256 (N = 256) or 512 (N = 1024)
    dtype: str | None = None  # None: float32 for random weights, the stored dtype for --model
    quantize: int | None = None
    group_size: int = 64
    head_bits: int | None = None
    vq_dtype: str | None = None  # None: float16 when quantized (as convert writes it), else dtype
    steps: int | None = DEFAULT_STEPS  # measured MaskGIT steps; None = the model's default
    tokens: int = 100  # answer length
    recompute_tokens: int | None = DEFAULT_RECOMPUTE_TOKENS  # recomputed answer positions; None = all
    recompute: bool = True
    phases: tuple[str, ...] = PHASES
    low_ram: bool = False
    warmup: bool = True  # False only for memory runs of very slow configurations
    tiny: bool = False  # a scaled-down architecture, for tests
    seed: int = 0
    sources: dict = field(default_factory=dict)  # --adapter-path/--adapter-scale/--vq/--tokenizer (with --model)
    turbo: bool = False  # also time Show-o Turbo's image (4 steps, no CFG, top-k) in the t2i phase

    def validate(self) -> "BenchOptions":
        if self.sources and self.model is None:
            raise ShowoError(f"--{next(iter(self.sources)).replace('_', '-')} needs --model (random weights have no adapters or sources)")
        if self.model is None and self.resolution not in (256, 512) and not self.tiny:
            raise ShowoError(f"--random takes 256 or 512, got {self.resolution}")
        for name, value in (("steps", self.steps), ("tokens", self.tokens), ("recompute tokens", self.recompute_tokens)):
            if value is not None and value < 1:
                raise ShowoError(f"--{name.replace(' ', '-')} must be >= 1, got {value}")
        if self.tokens < 2:
            raise ShowoError("--tokens must be >= 2 (the per-token time is measured after the first token)")
        bad = [p for p in self.phases if p not in ALL_PHASES]
        if bad:
            raise ShowoError(f"unknown phase {bad[0]!r}; choose from {', '.join(ALL_PHASES)}")
        for d in (self.dtype, self.vq_dtype):
            if d is not None and d not in DTYPES:
                raise ShowoError(f"unsupported dtype {d!r}; choose one of {list(DTYPES)}")
        if self.quantize is not None:
            QuantizeSpec(self.quantize, self.group_size, self.head_bits).validate()
        return self


# -- a tokenizer-free Prompting for random weights --------------------------------------------------
class SyntheticPrompting(Prompting):
    """The reference's sequence builders without tokenizer files: words and punctuation map to
    stable ids (≈ one BPE token per word), special ids follow the real layout after the LLM
    vocabulary ([PAD], then soi, eoi, sov, eov, t2i, mmu, …). Shapes and masks are the real ones,
    which is all a benchmark needs."""

    def __init__(self, config: ShowoConfig):
        self.tokenizer = None
        self.config = config
        self.max_text_len = config.max_seq_length + 1
        base = config.llm_vocab_size
        self.ids = SpecialIds(
            bos=base - 1, pad=base, soi=base + 1, eoi=base + 2, t2i=base + 5, mmu=base + 6,
            image_offset=config.image_token_offset, mask=config.mask_token_id,
        )

    def encode(self, text: str) -> list[int]:
        return [zlib.crc32(w.encode()) % (self.ids.bos - 1) for w in re.findall(r"\w+|[^\w\s]", text)]

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


# -- the model under test ----------------------------------------------------------------------------
@dataclass
class Components:
    model: ShowoTransformer
    prompting: Prompting
    make_vq: Callable[[bool], nn.Module]  # with_encoder → a MAGVIT-v2 ready to run
    name: str
    dtype: str
    vq_dtype: str
    disk_bytes: dict[str, int] | None = None


def tiny_configs() -> tuple[ShowoConfig, MagvitConfig]:
    """A scaled-down Show-o (2 layers, hidden 64, 8×8 tokens, 128 px) for tests of the machinery."""
    cfg = ShowoConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        vocab_size=499 + 10 + 64 + 1, llm_vocab_size=499, codebook_size=64, num_vq_tokens=64,
        mask_token_id=499 + 10 + 64, max_seq_length=32,
    ).validate()
    coder = MagvitCoderConfig(ch=32, ch_mult=(1, 1, 1, 1, 2), num_res_blocks=(1, 1, 1, 1, 1), z_channels=6)
    return cfg, MagvitConfig(encoder=coder, decoder=coder, codebook_bits=6)


def random_components(opts: BenchOptions) -> Components:
    """The full-size architecture (or the tiny one) with random weights, cast/quantized as asked."""
    if opts.tiny:
        cfg, vq_cfg = tiny_configs()
    else:
        cfg, vq_cfg = ShowoConfig(num_vq_tokens=(opts.resolution // 16) ** 2), MagvitConfig()
    dtype = opts.dtype or "float32"
    mx.random.seed(opts.seed)
    model = ShowoTransformer(cfg)
    if dtype != "float32":
        model.set_dtype(DTYPES[dtype])
    if opts.quantize is not None:
        quantize_transformer(model, QuantizeSpec(opts.quantize, opts.group_size, opts.head_bits))
    model.eval()
    mx.eval(model.parameters())
    vq_dtype = opts.vq_dtype or ("float16" if opts.quantize is not None else dtype)

    def make_vq(with_encoder: bool):
        from .magvit import MagvitV2

        vq = MagvitV2(vq_cfg, with_encoder=with_encoder)
        vq.set_dtype(DTYPES[vq_dtype])
        vq.eval()
        mx.eval(vq.parameters())
        return vq

    name = "small random architecture" if opts.tiny else f"random weights, {opts.resolution} px"
    return Components(model, SyntheticPrompting(cfg), make_vq, name, dtype, vq_dtype)


def folder_components(opts: BenchOptions) -> Components:
    """A real model (Hub id or folder), loaded as the pipeline loads it."""
    from .convert import folder_size
    from .loading import load_magvit, resolve_model
    from .pipeline import Pipeline

    spec = QuantizeSpec(opts.quantize, opts.group_size, opts.head_bits) if opts.quantize is not None else None
    sources = dict(opts.sources)
    folder = resolve_model(opts.model, vq=sources.pop("vq", None), tokenizer=sources.pop("tokenizer", None))
    pipe = Pipeline(folder, dtype=opts.dtype, quantize=spec, vq_dtype=opts.vq_dtype, name=opts.model, **sources)
    files = pipe.config.get("files", {})
    disk = {
        "transformer": sum((folder / f).stat().st_size for f in files.get("transformer", ["model.safetensors"])),
        # an understanding-only folder (--no-vq) has no MAGVIT file
        "magvit": (folder / files.get("magvit", "magvit.safetensors")).stat().st_size if "magvit" in pipe.config else 0,
        "folder": folder_size(folder),
    }
    vq_dtype = pipe.vq_dtype or pipe.config.get("magvit_dtype", "float32")

    def make_vq(with_encoder: bool):
        return load_magvit(folder, pipe.config, dtype=pipe.vq_dtype, with_encoder=with_encoder)

    dtype = pipe.compute_dtype  # float32 on the CPU backend for half/quantized folders (loading.compute_plan)
    return Components(pipe.model, pipe.prompting, make_vq, str(opts.model), dtype, vq_dtype, disk)


# -- sizes -------------------------------------------------------------------------------------------
def tree_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def param_count(module: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(module.parameters()))


def quantized_bytes(shape: tuple[int, ...], bits: int, group_size: int, scale_bytes: int) -> int:
    """A quantized (out, in) matrix in MLX's affine format: packed `bits`-wide codes, plus one
    scale and one bias per group of `group_size` inputs, in the model's float dtype."""
    out, inp = shape
    return out * inp * bits // 8 + 2 * out * (inp // group_size) * scale_bytes


def expected_transformer_bytes(cfg: ShowoConfig, spec: QuantizeSpec | None, dtype: str = "float32") -> int:
    """Tensor bytes of the transformer as `convert` writes it (safetensors header excluded), from the
    shapes alone: the same layer choice as `quantize_transformer` (every Linear whose input width
    divides by the group; embedding and head only with head_bits), the rest in `dtype`."""
    item = DTYPES[dtype].size
    shapes = ShowoTransformer(cfg)  # lazy: random init is never evaluated, nothing is allocated
    total = 0
    for path, module in shapes.named_modules():
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % (spec.group_size if spec else 1):
            bits = None
        elif path in ("embed_tokens", "lm_head"):
            bits = spec.head_bits if spec else None
        else:
            bits = spec.bits if spec and isinstance(module, nn.Linear) else None
        for name, value in module.items():
            if not isinstance(value, mx.array):
                continue
            if name == "weight" and bits is not None:
                total += quantized_bytes(tuple(value.shape), bits, spec.group_size, item)
            else:
                total += value.size * item
    return total


def size_table(cfg: ShowoConfig | None = None, vq_cfg: MagvitConfig | None = None) -> list[dict]:
    """Expected 4-bit folder sizes (transformer + MAGVIT float16) for every group size, head width
    and dtype of the scales (= the dtype the transformer is quantized from)."""
    from .magvit import MagvitV2

    cfg = cfg or ShowoConfig()
    vq_bytes = param_count(MagvitV2(vq_cfg or MagvitConfig())) * 2
    rows = []
    for dtype in ("float16", "float32"):
        for group in (32, 64, 128):
            for head in (None, 8, 4):
                t = expected_transformer_bytes(cfg, QuantizeSpec(4, group, head), dtype)
                rows.append({"scales": dtype, "group_size": group, "head_bits": head, "transformer_bytes": t,
                             "magvit_bytes": vq_bytes, "folder_bytes": t + vq_bytes})
    return rows


# -- timing helpers ----------------------------------------------------------------------------------
def now() -> float:
    return time.perf_counter()


def default_steps(cfg: ShowoConfig) -> int:
    return 50 if cfg.num_vq_tokens >= 1024 else 18  # the pipeline's t2i defaults (the official README's commands)


def default_guidance(cfg: ShowoConfig) -> float:
    return 5.0 if cfg.num_vq_tokens >= 1024 else 1.75


def run_maskgit(c: Components, logits_fn, init: np.ndarray, steps: int) -> tuple[np.ndarray, list[float]]:
    """Greedy MaskGIT over `steps` steps → (codes, seconds of every step). The decode loop
    evaluates each step's tokens before its callback, so the stamps are step boundaries."""
    cfg, times, last = c.model.config, [], [now()]

    def tick(step, total, tokens):
        t = now()
        times.append(t - last[0])
        last[0] = t

    codes = decode_image_tokens(
        logits_fn, init, steps=steps, mask_token_id=cfg.mask_token_id,
        image_token_offset=c.prompting.ids.image_offset, codebook_size=cfg.codebook_size,
        randomness=GreedyRandomness(), callback=tick,
    )
    return np.array(codes), times


def eta(seconds: float | None) -> str:
    """` (ETA 40 s)` from a warm-up's timing; empty without one (--no-warmup)."""
    if seconds is None:
        return ""
    return f" (ETA {seconds:.0f} s)" if seconds < 90 else f" (ETA {seconds / 60:.1f} min)"


def with_clock(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` with the elapsed time in front: `[1:05] ask: KV cache, 100 tokens (ETA 29 s)`."""
    start = now()

    def stamped(message: str) -> None:
        m, sec = divmod(int(now() - start), 60)
        log(f"[{m}:{sec:02d}] {message}")

    return stamped


def timed_call(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds for `fn()` with its result fully evaluated (arrays, or a logits function's caches)."""
    start = now()
    out = fn()
    mx.eval([pc.state for pc in out.cache] if isinstance(out, CachedImageLogits) else out)
    return now() - start, out


# -- phases ------------------------------------------------------------------------------------------
def bench_t2i(c: Components, opts: BenchOptions, log) -> dict:
    """Cached vs recompute MaskGIT steps (greedy, CFG, batch 1) and the image decode; the peak of
    `generate` is the larger of the steps' peak and the decode's."""
    cfg = c.model.config
    n, steps, guidance = cfg.num_vq_tokens, opts.steps or default_steps(cfg), default_guidance(cfg)
    init = np.full((1, n), cfg.mask_token_id, dtype=np.int64)
    cond = c.prompting.t2i_gen([PROMPT], init)
    vq = c.make_vq(False)  # generation needs the decoder only
    out: dict = {"tokens": n, "steps": steps, "default_steps": default_steps(cfg), "guidance": guidance,
                 "sequence": int(cond.ids.shape[1])}

    def cached() -> CachedImageLogits:  # a fresh uncond store: the first image of a process
        return CachedImageLogits(c.model, c.prompting, cond, guidance, UncondPrefixStore())

    step_s = decode_s = None  # warm-up timings, for the ETAs
    if opts.warmup:
        log("t2i: warm-up (1 cached step, 1 decode)")
        start = now()
        codes, _ = run_maskgit(c, cached(), init, 1)
        step_s = now() - start
        decode_s, _ = timed_call(functools.partial(vq.decode, mx.array(codes)))
    log(f"t2i: cached, {steps} steps" + eta(None if step_s is None else steps * step_s + decode_s))
    reset_peak()
    setup, fn = timed_call(cached)  # the cond and uncond text prefixes
    cached_codes, times = run_maskgit(c, fn, init, steps)
    out["cached"] = {"setup_s": setup, "step_s": float(np.mean(times)), "steps_s": times, "peak_bytes": peak_bytes()}
    del fn
    reset_peak()
    with magvit_throttle(opts.low_ram):
        out["decode_s"], _ = timed_call(functools.partial(vq.decode, mx.array(cached_codes)))
    out["decode_peak_bytes"] = peak_bytes()
    out["generate_peak_bytes"] = max(out["cached"]["peak_bytes"], out["decode_peak_bytes"])
    out["cached"]["image_s"] = setup + out["default_steps"] * out["cached"]["step_s"] + out["decode_s"]
    if opts.turbo:
        out["turbo"] = bench_turbo(c, opts, cond, init, out, log)
    del vq
    if opts.recompute:
        step_s = None
        if opts.warmup:
            log("t2i: warm-up (1 recompute step)")
            start = now()
            run_maskgit(c, RecomputeImageLogits(c.model, c.prompting, cond, guidance), init, 1)
            step_s = now() - start
        log(f"t2i: recompute, {steps} steps" + eta(None if step_s is None else steps * step_s))
        reset_peak()
        codes, times = run_maskgit(c, RecomputeImageLogits(c.model, c.prompting, cond, guidance), init, steps)
        step_s = float(np.mean(times))
        out["recompute"] = {"step_s": step_s, "steps_s": times, "peak_bytes": peak_bytes(),
                            "image_s": out["default_steps"] * step_s + out["decode_s"]}
        out["step_ratio"] = step_s / out["cached"]["step_s"]
        out["image_ratio"] = out["recompute"]["image_s"] / out["cached"]["image_s"]
        out["codes_identical"] = bool(np.array_equal(codes, cached_codes))
        out["codes_differing"] = int((codes != cached_codes).sum())
    return out


def bench_turbo(c: Components, opts: BenchOptions, cond, init: np.ndarray, shown: dict, log) -> dict:
    """Show-o Turbo's image: 4 steps without CFG (one row per step, only the cond prefix), top-k as
    its family sets it (family.py), beside Show-o's default image measured just before."""
    from .family import family_named

    cfg = c.model.config
    fam = family_named("turbo-512" if cfg.num_vq_tokens >= 1024 else "turbo-256")
    steps, top_k = TURBO_STEPS, fam.generate.top_k(TURBO_STEPS)
    measured = min(opts.steps or steps, steps)

    def turbo_fn() -> CachedImageLogits:
        return CachedImageLogits(c.model, c.prompting, cond, 0.0, UncondPrefixStore())

    def run(fn, n):
        times, last = [], [now()]

        def tick(step, total, tokens):
            t = now()
            times.append(t - last[0])
            last[0] = t

        decode_image_tokens(fn, init, steps=n, mask_token_id=cfg.mask_token_id,
                            image_token_offset=c.prompting.ids.image_offset, codebook_size=cfg.codebook_size,
                            randomness=GreedyRandomness(), callback=tick, top_k=top_k)
        return times

    if opts.warmup:
        log("t2i: Turbo warm-up (1 step, no CFG)")
        run(turbo_fn(), 1)
    log(f"t2i: Turbo, {measured} of {steps} steps, no CFG, top-k {top_k}")
    reset_peak()
    setup, fn = timed_call(turbo_fn)
    times = run(fn, measured)
    step_s = float(np.mean(times))
    image_s = setup + steps * step_s + shown["decode_s"]
    return {"family": fam.name, "steps": steps, "measured_steps": measured, "top_k": top_k, "setup_s": setup,
            "step_s": step_s, "steps_s": times, "image_s": image_s, "peak_bytes": peak_bytes(),
            "speedup": shown["cached"]["image_s"] / image_s}


def reference_next_token(model: ShowoTransformer, ids: mx.array, eoi: int) -> int:
    """One answer token the reference's way (`Showo.mmu_generate`): the whole sequence through the model with
    the grown prefix-LM mask, logits for every position over the full vocabulary, argmax of the last."""
    mask = attention_mask([mmu_layout(ids.shape[1], eoi)])
    logits = model(ids, mask=mask)[:, -1, :]
    return int(mx.argmax(logits, axis=-1).item())


def recompute_positions(tokens: int, measured: int | None) -> list[int]:
    """Answer positions the recompute path is timed at: all, or `measured` evenly spaced ones (the
    recompute cost grows with the position, so an even spread estimates the mean without bias)."""
    if measured is None or measured >= tokens:
        return list(range(tokens))
    return sorted(set(np.linspace(0, tokens - 1, measured).round().astype(int).tolist()))


def bench_ask(c: Components, opts: BenchOptions, log) -> dict:
    from .decoding import generate_tokens  # imports mlx-lm (and transformers): ~1 s, only when used

    cfg, t = c.model.config, opts.tokens
    side = int(round(cfg.num_vq_tokens**0.5)) * 16
    vq = c.make_vq(True)
    pixels = mx.random.uniform(-1, 1, (1, side, side, 3), key=mx.random.key(opts.seed))
    log("ask: image encode")
    reset_peak()
    out: dict = {"tokens": t}
    with magvit_throttle(opts.low_ram):
        out["encode_s"], codes = timed_call(functools.partial(vq.encode, pixels))
    out["encode_peak_bytes"] = peak_bytes()
    # The pipeline keeps its MAGVIT after encoding; with --low-ram it drops it (ask never decodes).
    keep = None if opts.low_ram else vq
    del vq
    mx.clear_cache()
    prompt = c.prompting.mmu_gen(c.prompting.image_ids(np.array(codes)), QUESTION)
    ids, eoi = mx.array(prompt.ids), prompt.layouts[0].prefix_len - 1
    mask = attention_mask(prompt.layouts)
    out["prompt_tokens"] = int(ids.shape[1])

    def answer(max_tokens: int) -> tuple[list[int], list[float]]:
        stamps, tokens, start = [], [], now()
        for token in generate_tokens(c.model, ids, mask=mask, max_tokens=max_tokens, stop_ids=()):
            tokens.append(token)
            stamps.append(now() - start)
        return tokens, stamps

    estimate = None
    if opts.warmup:
        log("ask: warm-up (prefill + 1 token)")
        _, warm = answer(2)
        estimate = warm[0] + (t - 1) * (warm[1] - warm[0])
    log(f"ask: KV cache, {t} tokens" + eta(estimate))
    reset_peak()
    tokens, stamps = answer(t)
    per_token = (stamps[-1] - stamps[0]) / (t - 1) if t > 1 else float("nan")
    out["cached"] = {"prefill_s": stamps[0], "token_s": per_token, "peak_bytes": peak_bytes()}
    out["ask_peak_bytes"] = max(out["encode_peak_bytes"], out["cached"]["peak_bytes"])
    if opts.recompute:
        positions = recompute_positions(t, opts.recompute_tokens)
        forward_s = None
        if opts.warmup:
            log("ask: warm-up (1 full forward)")
            start = now()
            reference_next_token(c.model, ids, eoi)
            forward_s = now() - start
        reset_peak()
        log(f"ask: reference recompute at {len(positions)} of {t} answer positions"
            + eta(None if forward_s is None else len(positions) * forward_s))
        times, agree = [], 0
        for p in positions:
            seq = mx.concatenate([ids, mx.array([tokens[:p]], dtype=ids.dtype)], axis=1) if p else ids
            start = now()
            token = reference_next_token(c.model, seq, eoi)
            times.append(now() - start)
            agree += int(token == tokens[p])
        out["recompute"] = {"token_s": float(np.mean(times)), "positions": positions, "times_s": times,
                            "measured_tokens": len(positions), "peak_bytes": peak_bytes()}
        out["token_ratio"] = out["recompute"]["token_s"] / per_token
        out["tokens_agree"] = agree
        out["tokens_identical"] = agree == len(positions)
    del keep
    return out


def clip_components(c: Components, opts: BenchOptions):
    """(VisionEncoder, projector) of a w_clip_vit --model, or random full-size ones (ViT-L/14-336 up
    to its penultimate layer; 1024 → 2048 projector), tiny ones for tests."""
    from .vision import ClipImageProcessor, ClipVisionConfig, ClipVisionTower, MMProjector, VisionEncoder

    if opts.model is not None:  # the transformer loaded by folder_components carries the projector
        from .loading import read_model_config, resolve_model
        from .vision import load_vision

        if not c.model.config.w_clip_vit:
            raise ShowoError(f"{opts.model} is not a w_clip_vit model; the clip phase needs one (or random weights)")
        folder = resolve_model(opts.model)
        return load_vision(folder, read_model_config(folder)), c.model.mm_projector
    if opts.tiny:
        vcfg = ClipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=56, patch_size=14)
        processor = ClipImageProcessor(shortest_edge=56, crop_height=56, crop_width=56)
    else:
        vcfg = ClipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, image_size=336, patch_size=14)
        processor = ClipImageProcessor()
    dt = DTYPES[opts.dtype or "float32"]
    tower, projector = ClipVisionTower(vcfg), MMProjector(vcfg.hidden_size, c.model.config.hidden_size, c.model.config.hidden_size)
    tower.set_dtype(dt)
    projector.set_dtype(dt)
    mx.eval(tower.parameters(), projector.parameters())
    return VisionEncoder(tower, processor), projector


def bench_clip(c: Components, opts: BenchOptions, log) -> dict:
    """The CLIP understanding path: preprocessing, tower, projector, prefill, KV-cached tokens, and
    the reference's full recompute per token (`Showo.mmu_generate` with input embeddings)."""
    from PIL import Image

    from .decoding import generate_tokens
    from .layout import mmu_vit_layout

    vision, projector = clip_components(c, opts)
    rng = np.random.default_rng(opts.seed)
    picture = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    out: dict = {"tower_layers": len(vision.tower.layers), "tower_params": param_count(vision.tower),
                 "tokens": opts.tokens}
    start = now()
    pixels = mx.array(vision.processor(picture))
    out["preprocess_s"] = now() - start
    if opts.warmup:
        mx.eval(projector(vision.tower(pixels)))
    reset_peak()
    out["tower_s"], features = timed_call(functools.partial(vision.tower, pixels))
    out["projector_s"], image = timed_call(functools.partial(projector, features))
    # The prompt: [mmu] + system (28 tokens with phi-1.5) + [soi] + image + [eoi] + question.
    system = c.prompting.encode("A chat between a curious user and an artificial intelligence assistant. "
                                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    ids = [c.prompting.ids.mmu, *system, c.prompting.ids.soi, c.prompting.ids.eoi,
           *c.prompting.encode(f"USER: {QUESTION} ASSISTANT:")]
    start_img = 2 + len(system)
    text = c.model.embed_tokens(mx.array([ids]))
    emb = mx.concatenate([text[:, :start_img], image.astype(text.dtype), text[:, start_img:]], axis=1)
    mx.eval(emb)
    layout = mmu_vit_layout(emb.shape[1], len(system), image.shape[1])
    mask = attention_mask([layout])
    out["prompt_positions"] = int(emb.shape[1])

    def answer(n):
        stamps, tokens, t0 = [], [], now()
        for token in generate_tokens(c.model, None, mask=mask, max_tokens=n, stop_ids=(), prompt_embeddings=emb):
            tokens.append(token)
            stamps.append(now() - t0)
        return tokens, stamps

    if opts.warmup:
        answer(2)
    tokens, stamps = answer(opts.tokens)
    out["cached"] = {"prefill_s": stamps[0], "token_s": (stamps[-1] - stamps[0]) / (opts.tokens - 1),
                     "peak_bytes": peak_bytes()}
    if opts.recompute:
        positions = recompute_positions(opts.tokens, opts.recompute_tokens)
        times, agree = [], 0
        for p in positions:
            seq = emb if not p else mx.concatenate([emb, c.model.embed_tokens(mx.array([tokens[:p]]))], axis=1)
            grown = attention_mask([mmu_vit_layout(seq.shape[1], len(system), image.shape[1])])
            t0 = now()
            logits = c.model(None, input_embeddings=seq, mask=grown)[:, -1, :]  # every position, full vocabulary
            token = int(mx.argmax(logits, axis=-1).item())
            times.append(now() - t0)
            agree += int(token == tokens[p])
        out["recompute"] = {"token_s": float(np.mean(times)), "positions": positions, "measured_tokens": len(positions)}
        out["token_ratio"] = out["recompute"]["token_s"] / out["cached"]["token_s"]
        out["tokens_agree"] = agree
    return out


def bench_magvit(c: Components, opts: BenchOptions, log) -> dict:
    cfg = c.model.config
    grid = int(round(cfg.num_vq_tokens**0.5))
    vq = c.make_vq(True)
    pixels = mx.random.uniform(-1, 1, (1, grid * 16, grid * 16, 3), key=mx.random.key(opts.seed))
    estimate = None
    if opts.warmup:
        log("magvit: warm-up (encode + decode)")
        estimate, _ = timed_call(lambda: vq.decode(vq.encode(pixels)))
    log("magvit: encode + decode" + eta(estimate))
    out: dict = {"resolution": grid * 16, "params": param_count(vq), "bytes": tree_bytes(vq)}
    reset_peak()
    with magvit_throttle(opts.low_ram):
        out["encode_s"], codes = timed_call(functools.partial(vq.encode, pixels))
    out["encode_peak_bytes"] = peak_bytes()
    reset_peak()
    with magvit_throttle(opts.low_ram):
        out["decode_s"], _ = timed_call(functools.partial(vq.decode, codes))
    out["decode_peak_bytes"] = peak_bytes()
    return out


# -- the run -----------------------------------------------------------------------------------------
def run_bench(opts: BenchOptions, log: Callable[[str], None] = lambda m: None) -> dict:
    """Build (or load) the model, run the selected phases, return every number as a dict."""
    from . import __version__
    from .launcher import blas_status

    opts.validate()
    log = with_clock(log)
    log("building the model" if opts.model is None else f"loading {opts.model}")
    start = now()
    c = random_components(opts) if opts.model is None else folder_components(opts)
    cfg = c.model.config
    load_s = now() - start
    low_ram = asdict(apply_low_ram()) if opts.low_ram else None
    result: dict = {
        "meta": {
            "date": time.strftime("%Y-%m-%d"), "showo_mlx": __version__, "mlx": mx.__version__,
            "platform": f"{platform.system()} {platform.machine()}", "device": str(mx.default_device()),
            "blas": blas_status(), "options": asdict(opts), "low_ram": low_ram,
            "load_average": {"start": _loadavg()},
        },
        "model": {
            "name": c.name, "dtype": c.dtype, "vq_dtype": c.vq_dtype, "quantize": opts.quantize,
            "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "image_tokens": cfg.num_vq_tokens,
            "transformer_params": param_count(ShowoTransformer(cfg)),  # logical count (lazy, unallocated)
            "transformer_bytes": tree_bytes(c.model), "load_s": load_s, "disk_bytes": c.disk_bytes,
        },
    }
    phases = {"t2i": bench_t2i, "ask": bench_ask, "magvit": bench_magvit, "clip": bench_clip}
    for name in ALL_PHASES:
        if name in opts.phases:
            result[name] = phases[name](c, opts, log)
            result["meta"]["load_average"][name] = _loadavg()
            mx.clear_cache()
    result["meta"]["max_rss_bytes"] = max_rss_bytes()
    return result


def _loadavg() -> float | None:
    """1-minute load average: other processes on the machine skew the timings (notably on a
    shared 2-core VM), so every phase records how busy the machine was when it ended."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


# -- the table ---------------------------------------------------------------------------------------
def _s(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _gb(b: int | None) -> str:
    if b is None:
        return "-"
    return f"{b / GB:.2f} GB" if b >= 0.1 * GB else f"{b / 1e6:.1f} MB"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _pair(a: int | None, b: int | None) -> str:
    return _gb(a) + (f" / {_gb(b)}" if b is not None else "")


def table_rows(r: dict) -> list[tuple[str, str, str, str, str]]:
    """(measure, cached, recompute, ratio, peak memory) rows of the report."""
    rows = []
    if "t2i" in r:
        t = r["t2i"]
        c, f = t["cached"], t.get("recompute", {})
        est = "" if t["steps"] == t["default_steps"] else ", est."
        rows += [
            ("t2i text prefixes (cond + uncond)", _s(c["setup_s"]), "-", "", ""),
            (f"t2i step, N={t['tokens']}, CFG ({t['steps']} measured)", _s(c["step_s"]), _s(f.get("step_s")),
             _ratio(t.get("step_ratio")), _pair(c["peak_bytes"], f.get("peak_bytes"))),
            ("t2i image decode (MAGVIT)", _s(t["decode_s"]), "", "", _gb(t["decode_peak_bytes"])),
            (f"t2i image, {t['default_steps']} steps + decode{est}", _s(c["image_s"]), _s(f.get("image_s")),
             _ratio(t.get("image_ratio")), _gb(t["generate_peak_bytes"])),
        ]
        if f:
            same = "yes" if t["codes_identical"] else f"no ({t['codes_differing']} differ)"
            rows.append(("t2i greedy codes identical", same, "", "", ""))
        if "turbo" in t:
            u = t["turbo"]
            est = "" if u["measured_steps"] == u["steps"] else f", {u['measured_steps']} measured, est."
            rows += [
                (f"Turbo step, N={t['tokens']}, no CFG, top-k {u['top_k']}", _s(u["step_s"]), "", "", _gb(u["peak_bytes"])),
                (f"Turbo image, {u['steps']} steps + decode{est}", _s(u["image_s"]), "", "", ""),
                (f"Turbo speed-up vs Show-o's {t['default_steps']}-step CFG image", _ratio(u["speedup"]), "", "", ""),
            ]
    if "ask" in r:
        a = r["ask"]
        c, f = a["cached"], a.get("recompute", {})
        measured = "" if not f else (
            f"; recompute all {a['tokens']}" if f["measured_tokens"] == a["tokens"]
            else f"; recompute at {f['measured_tokens']} of {a['tokens']}, evenly spaced"
        )
        rows += [
            ("ask image encode (MAGVIT)", _s(a["encode_s"]), "", "", _gb(a["encode_peak_bytes"])),
            (f"ask prefill ({a['prompt_tokens']} prompt tokens)", _s(c["prefill_s"]), "-", "", ""),
            (f"ask per token ({a['tokens']} tokens{measured})", _s(c["token_s"]), _s(f.get("token_s")),
             _ratio(a.get("token_ratio")), _pair(c["peak_bytes"], f.get("peak_bytes"))),
            ("ask total (encode + answer)", "", "", "", _gb(a["ask_peak_bytes"])),
        ]
        if f:
            rows.append(("ask greedy tokens identical", f"{a['tokens_agree']}/{f['measured_tokens']}", "", "", ""))
    if "clip" in r:
        v = r["clip"]
        f = v.get("recompute", {})
        rows += [
            ("CLIP preprocess (CLIPImageProcessor)", _s(v["preprocess_s"]), "", "", ""),
            (f"CLIP tower ({v['tower_layers']} layers) + projector", _s(v["tower_s"] + v["projector_s"]), "", "", ""),
            (f"CLIP prefill ({v['prompt_positions']} positions)", _s(v["cached"]["prefill_s"]), "-", "", ""),
            (f"CLIP per token ({v['tokens']} tokens" + (f"; recompute at {f['measured_tokens']}" if f else "") + ")",
             _s(v["cached"]["token_s"]), _s(f.get("token_s")), _ratio(v.get("token_ratio")), _gb(v["cached"]["peak_bytes"])),
        ]
        if f:
            rows.append(("CLIP greedy tokens identical", f"{v['tokens_agree']}/{f['measured_tokens']}", "", "", ""))
    if "magvit" in r:
        m = r["magvit"]
        rows += [
            (f"MAGVIT encode {m['resolution']} px", _s(m["encode_s"]), "", "", _gb(m["encode_peak_bytes"])),
            (f"MAGVIT decode {m['resolution']} px", _s(m["decode_s"]), "", "", _gb(m["decode_peak_bytes"])),
        ]
    return rows


def format_table(r: dict) -> str:
    meta, model = r["meta"], r["model"]
    head = [
        f"showo bench {meta['date']}: {model['name']}, {model['dtype']}"
        + (f", {model['quantize']}-bit" if model["quantize"] else "") + f", MAGVIT {model['vq_dtype']}",
        f"mlx {meta['mlx']} on {meta['platform']}, {meta['blas']}",
        f"transformer: {model['transformer_params'] / 1e6:,.1f} M params, {_gb(model['transformer_bytes'])} in memory"
        + (f"; on disk {model['disk_bytes']['transformer'] / GB:.2f} GB + MAGVIT {model['disk_bytes']['magvit'] / GB:.2f} GB"
           if model["disk_bytes"] else ""),
    ]
    if "magvit" in r:
        head.append(f"MAGVIT-v2: {r['magvit']['params'] / 1e6:.1f} M params, {_gb(r['magvit']['bytes'])} in memory")
    if meta.get("low_ram"):
        head.append(f"low RAM: cache limit {meta['low_ram']['cache_limit'] / 1e6:.0f} MB, "
                    f"MAGVIT headroom {LOW_RAM_HEADROOM >> 20} MB, "
                    "no encoder kept after encoding")
    loads = {k: v for k, v in meta.get("load_average", {}).items() if v is not None}
    if loads:
        head.append("load average (1 min) " + ", ".join(f"{k} {v:.1f}" for k, v in loads.items())
                    + f"; {os.cpu_count()} cores (timings are skewed when the load exceeds the cores)")
    cols = ("measure", "cached", "recompute", "ratio", "peak memory")
    rows = [cols] + table_rows(r)
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = ["ratio = recompute / cached; peak memory = MLX active-memory peak of that part, resident weights "
             "included (cached / recompute); image and total rows: the larger of their parts"]
    return "\n".join(head + [""] + lines + [""] + notes)


def format_sizes(rows: list[dict]) -> str:
    out = ["expected 4-bit folder sizes (transformer + MAGVIT float16), GB = 1e9 bytes",
           f"{'scales':>8} {'group':>5} {'embed/head':>10} {'transformer':>12} {'folder':>8}"]
    for row in rows:
        head = f"{row['head_bits']}-bit" if row["head_bits"] else "float"
        out.append(f"{row['scales']:>8} {row['group_size']:>5} {head:>10} {row['transformer_bytes'] / GB:>12.3f} "
                   f"{row['folder_bytes'] / GB:>8.3f}")
    return "\n".join(out)


# -- the command -------------------------------------------------------------------------------------
def register(app) -> None:
    """Add `showo bench` to a typer app."""
    import typer

    from .cli_args import ShowoCommand
    from .cli_common import QBitsOption, QGroupSizeOption, QHeadBitsOption, QuantizeOption, handle_errors, quantize_spec, say
    from .cli_sources import current_sources, model_sources

    @app.command(cls=ShowoCommand, epilog=(
        "Examples:\n\n"
        "  showo bench\n\n"
        "  showo bench --random small --steps 1 --tokens 8\n\n"
        "  showo bench -q --q-bits 4 --q-group-size 128 --q-head-bits 4 --only t2i --only ask\n\n"
        "  showo bench --model ./show-o-mlx --json bench.json"
    ))
    @handle_errors(interrupted="interrupted")
    @model_sources
    def bench(
        model: Optional[str] = typer.Option(None, "--model", help="Model folder or Hub id (default: random weights)."),
        random_size: str = typer.Option("256", "--random", help="Random-weight architecture: 256 or 512 px, or small (2 layers, 128 px: seconds, for a quick check)."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16, bfloat16 (default float32, or the folder's)."),
        quantize: bool = QuantizeOption,
        q_bits: Optional[int] = QBitsOption,
        q_group_size: Optional[int] = QGroupSizeOption,
        q_head_bits: Optional[int] = QHeadBitsOption,
        vq_dtype: Optional[str] = typer.Option(None, "--vq-dtype", help="MAGVIT dtype (default: float16 if quantized, else --dtype)."),
        steps: int = typer.Option(DEFAULT_STEPS, "--steps", help="MaskGIT steps timed per path; the image row extrapolates to the model's default."),
        tokens: int = typer.Option(100, "--tokens", help="Answer length for ask."),
        recompute_tokens: int = typer.Option(
            DEFAULT_RECOMPUTE_TOKENS, "--recompute-tokens", help="Time the reference's recompute at this many evenly spaced answer positions (>= --tokens: all)."),
        no_recompute: bool = typer.Option(False, "--no-recompute", help="Skip the reference-style paths; off by default."),
        only: Optional[List[str]] = typer.Option(None, "--only", help="Phases to run: t2i, ask, magvit, clip (repeat; default t2i, ask, magvit)."),
        turbo: bool = typer.Option(False, "--turbo", help="Also time Show-o Turbo's image (4 steps, no CFG, top-k) beside Show-o's default; off by default."),
        low_ram: bool = typer.Option(False, "--low-ram", help="Cap MLX's buffer cache, throttle MAGVIT, drop its encoder early; off by default."),
        no_warmup: bool = typer.Option(False, "--no-warmup", help="Skip warm-ups, and so the ETAs (memory-only runs of slow configs); off by default."),
        json_out: Optional[str] = typer.Option(None, "--json", help="Write every number to this JSON file (default: none)."),
        sizes: bool = typer.Option(False, "--sizes", help="Print expected 4-bit folder sizes and exit; off by default."),
        tiny: bool = typer.Option(False, "--tiny", hidden=True),  # = --random small (the tests' spelling)
    ):
        """Speed and memory: cached vs reference recompute for t2i and ask, MAGVIT, model size."""
        if sizes:
            typer.echo(format_sizes(size_table()))
            return
        from .launcher import slow_blas_hint

        if random_size not in RANDOM_SIZES:
            raise ShowoError(f"--random takes {', '.join(RANDOM_SIZES)}, got {random_size!r}")
        spec = quantize_spec(quantize, q_bits, q_group_size, q_head_bits)
        small = tiny or random_size == "small"
        opts = BenchOptions(
            model=model, resolution=256 if small else int(random_size), dtype=dtype,
            quantize=spec.bits if spec else None, group_size=spec.group_size if spec else 64,
            head_bits=spec.head_bits if spec else None, vq_dtype=vq_dtype, steps=steps, tokens=tokens,
            recompute_tokens=recompute_tokens, recompute=not no_recompute, phases=tuple(only) if only else PHASES,
            low_ram=low_ram, warmup=not no_warmup, tiny=small,
            sources=current_sources(),
            turbo=turbo,
        ).validate()
        hint = slow_blas_hint()
        if hint:
            say(hint)
        result = run_bench(opts, log=say)
        typer.echo(format_table(result))
        if json_out:
            Path(json_out).write_text(json.dumps(result, indent=2, default=str))
            say(f"wrote {json_out}")
        sys.stdout.flush()


def main(preset: Sequence[str] = ()) -> None:
    """`python -m showo_mlx.bench [options]`: the same command without the `showo` entry point.
    The scripts in benchmarks/ pass a `preset` of options (e.g. `--only ask`) before the user's."""
    import typer

    from .launcher import prepare_process

    prepare_process()  # --openblas / SHOWO_OPENBLAS=1 on Linux
    from .cli_args import ShowoGroup

    app = typer.Typer(cls=ShowoGroup, add_completion=False, pretty_exceptions_enable=False,
                      context_settings={"help_option_names": ["-h", "--help"]})
    register(app)
    app(args=[*preset, *sys.argv[1:]])


if __name__ == "__main__":
    main()
