"""Pipeline: the user-facing tasks on one loaded model.

    pipe = showo_mlx.load("showlab/show-o")
    pipe.generate("a rally car race", seed=0, n=2)        → [GeneratedImage]
    pipe.inpaint(image, mask, "a red bus")                 → [GeneratedImage]
    pipe.extrapolate(image, ["a lake"], ["left", "right"]) → [GeneratedImage]
    pipe.ask(image, "what is this?") / pipe.stream_ask(...) / pipe.caption(image)
    pipe.complete("Once upon a time") / pipe.stream_complete(...)

Every image task runs the reference MaskGIT loop (maskgit.py) over the transformer with cached text
prefixes (t2i.py); answers decode with a KV cache (decoding.py).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from . import __version__
from .attention import attention_mask
from .config import MagvitConfig, ShowoConfig
from .convert import QuantizeSpec
from .decoding import GenerationResponse, IncrementalText, SamplingOptions, generate_tokens
from .errors import GenerationInputError, ImageInputError
from .images import NOTES_KEY, fit_mask, load_image, load_mask, mask_tokens, normalize_mode, preprocess_image, preprocess_mask, to_uint8
from .layout import Layout
from .family import family_of
from .limits import MAX_CANVAS_WINDOWS, MAX_IMAGES, MAX_STEPS, LONG_HINT, check_count, check_number, check_seed, check_text, is_integer
from .loading import DEFAULT_MODEL, compute_plan, load_for_inference, load_magvit, read_model_config, resolve_model
from .maskgit import GreedyRandomness, KeyedRandomness, check_schedule, decode_image_tokens
from .memory import apply_low_ram, drop_encoder, magvit_throttle
from .prompting import Prompting
from .t2i import CachedImageLogits, UncondPrefixStore
from .vision import ClipVisionConfig

log = logging.getLogger(__name__)

DIRECTIONS = ("left", "right", "up", "down")
CAPTION_QUESTION = "Please describe this image in detail."
ImageLike = str | os.PathLike | Image.Image | np.ndarray


@dataclass
class GenerationSettings:
    steps: int
    guidance: float
    temperature: float = 1.0
    schedule: str = "cosine"
    greedy: bool = False
    top_k: int | None = None  # sample each code among the k most probable (Show-o Turbo); None/0 = off

    def validate(self, allow_long: bool = False) -> "GenerationSettings":
        """Steps in [1, 1000] (more only with `allow_long`: the command line's --force), finite
        guidance and temperature >= 0, a known schedule."""
        self.steps = check_count(self.steps, "steps", MAX_STEPS, allow_long)
        check_number(self.guidance, "guidance")
        check_number(self.temperature, "temperature")
        check_schedule(self.schedule)
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise GenerationInputError(f"top-k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        return self


@dataclass(frozen=True)
class AnswerStats:
    """What a finished answer stream returns (`StopIteration.value`, or `x = yield from ...`):
    prompt length in tokens (image tokens included), tokens generated (a final eos included, as
    the reference returns it) and why it ended: "stop" (eos) or "length" (max_tokens)."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class GeneratedImage:
    """One generated image with what made it. `save(path)` writes the PNG with its metadata (see
    showo_mlx/metadata.py: `Software`, `Comment` and a JSON record of every setting)."""

    image: Image.Image
    prompt: str
    seed: int | None
    settings: GenerationSettings
    codes: np.ndarray
    task: str = "generate"
    extra: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # the model as resolved: Hub id (@revision) or absolute folder
    model_options: dict[str, Any] = field(default_factory=dict)  # load-time dtype / quantization

    def record(self, model: str | None = None) -> dict[str, Any]:
        """Every setting, as the JSON record stored in the PNG (`showo info` prints it)."""
        s = self.settings
        return {
            "format": 1,
            "software": f"showo-mlx {__version__}",
            "task": self.task,
            "prompt": self.prompt,
            "seed": self.seed,
            "greedy": bool(s.greedy),
            "steps": s.steps,
            "guidance": s.guidance,
            "temperature": s.temperature,
            "schedule": s.schedule,
            **({"top_k": s.top_k} if s.top_k else {}),
            "model": model or self.model,
            "dtype": self.model_options.get("dtype"),
            "quantize": self.model_options.get("quantize"),
            "width": self.image.width,
            "height": self.image.height,
            **self.extra,
        }

    def metadata(self, model: str | None = None) -> dict[str, str]:
        """PNG text chunks: enough to reproduce the image."""
        from .metadata import png_text

        return png_text(self.record(model))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the image as a PNG with its metadata (atomically: complete or absent)."""
        from .images import save_png

        return save_png(self.image, path, self.metadata())


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str | None = None,
    quantize: int | QuantizeSpec | None = None,
    vq_dtype: str | None = None,
    low_ram: bool = False,
    adapter_path: str | os.PathLike | None = None,
    adapter_scale: float = 1.0,
    vq: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> "Pipeline":
    """Load a model (Hub id, official folder or converted folder, local or on the Hub) into a
    ready Pipeline.

    `dtype` is the compute precision (default: as stored; float32 on MLX's CPU backend, see
    `loading.compute_plan`); `quantize` quantizes at load time; `low_ram` trades a little MAGVIT
    speed for memory (see memory.py). `adapter_path` applies LoRA adapters written by
    `showo train --lora` (mlx-lm's name), `adapter_scale` scales their effect (1 = as trained).
    `vq` and `tokenizer` say where an official checkpoint's MAGVIT-v2 and tokenizer come from."""
    import sys

    from .launcher import blas_hint_once

    if isinstance(quantize, int):
        quantize = QuantizeSpec(bits=quantize)
    # Notes about speed go to stderr unless the caller routes messages: a script's stdout is its output.
    note = log if log is not print else (lambda m: print(m, file=sys.stderr))
    folder = resolve_model(model, log=log, vq=vq, tokenizer=tokenizer)
    pipe = Pipeline(folder, dtype=dtype, quantize=quantize, vq_dtype=vq_dtype, low_ram=low_ram, name=str(model),
                    adapter_path=adapter_path, adapter_scale=adapter_scale, log=note)
    blas_hint_once(note)  # Linux CPU without OpenBLAS: say how to get ~100x faster matmuls, once
    return pipe


class Pipeline:
    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        dtype: str | None = None,
        quantize: QuantizeSpec | None = None,
        vq_dtype: str | None = None,
        low_ram: bool = False,
        name: str | None = None,
        model=None,
        adapter_path: str | os.PathLike | None = None,
        adapter_scale: float = 1.0,
        log: Callable[[str], None] | None = None,
    ):
        """`model`: an already loaded transformer of this folder (e.g. the one being trained) used
        instead of loading the folder's weights again."""
        self.folder = Path(folder)
        self.low_ram = low_ram
        if low_ram:
            apply_low_ram()
        self.name = name or str(folder)
        self.load_options = {"dtype": dtype, "quantize": asdict(quantize) if quantize is not None else None}
        self.config = read_model_config(self.folder)
        plan = compute_plan(self.config, dtype, vq_dtype, name=self.name)
        if plan.note and log is not None:
            log(plan.note)
        self.compute_dtype = plan.dtype or self.config.get("dtype", "float32")
        self.model = model if model is not None else load_for_inference(
            self.folder, self.config, plan=plan, quantize=quantize, adapter_path=adapter_path, adapter_scale=adapter_scale)
        self.adapters = None if adapter_path is None else {"adapters": str(adapter_path), "adapter_scale": float(adapter_scale)}
        self.cfg: ShowoConfig = self.model.config
        self.prompting = Prompting(self.folder, self.cfg)
        self.family = family_of(self.config)
        # Understanding-only folders (--no-vq, CLIP models) carry no MAGVIT.
        self.vq_config = MagvitConfig.from_dict(self.config["magvit"]) if "magvit" in self.config else None
        self._vision = None  # the CLIP tower of w_clip_vit models, loaded on first use
        self.vq_dtype = plan.vq_dtype
        self._vq = None  # the full tokenizer, loaded when an image must be encoded
        self._decoder = None  # decoder-only, enough for text-to-image
        self._uncond = UncondPrefixStore()
        # What the last task call changed about its inputs ("mask resized to the image", "max
        # tokens lowered", ...); each note is also logged at INFO on this module's logger.
        self.notes: list[str] = []

    # -- parts -------------------------------------------------------------------------------
    @property
    def model_ref(self) -> str:
        """The model as resolved, for metadata: an absolute folder, or the Hub id (with the revision
        when the loader records one in `name`)."""
        path = Path(self.name).expanduser()
        return str(path.resolve()) if path.exists() else self.name

    def _provenance(self) -> dict[str, Any]:
        return {"model": self.model_ref, "model_options": dict(self.load_options)}

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.image_grid

    @property
    def resolution(self) -> int:
        if self.vq_config is None:
            load_magvit(self.folder, self.config)  # raises the one-line "converted without MAGVIT" error
        return self.grid[0] * self.vq_config.downsample_factor

    @property
    def vq(self):
        """MAGVIT-v2 with its encoder (loaded on first use)."""
        if self._vq is None:
            self._vq = load_magvit(self.folder, self.config, dtype=self.vq_dtype, with_encoder=True)
            self._decoder = None
        return self._vq

    @property
    def decoder(self):
        """MAGVIT-v2 for decoding only; the encoder's weights are not loaded for generation."""
        if self._vq is not None:
            return self._vq
        if self._decoder is None:
            self._decoder = load_magvit(self.folder, self.config, dtype=self.vq_dtype, with_encoder=False)
        return self._decoder

    def defaults(self, task: str) -> GenerationSettings:
        """The model family's settings (family.py): Show-o 512 px 50 steps, guidance 5; 256 px 18
        steps for t2i and 16 for inpainting/extension, guidance 1.75; Turbo 4 steps, no guidance,
        top-k 200 (500 at 4 steps for 512 px)."""
        d = self.family.task(task)
        return GenerationSettings(steps=d.steps, guidance=d.guidance, temperature=d.temperature,
                                  schedule=d.schedule, top_k=d.top_k(d.steps))

    def settings(self, task: str, *, allow_long: bool = False, **overrides) -> GenerationSettings:
        if self.vq_config is None:
            load_magvit(self.folder, self.config)  # raises the one-line "converted without MAGVIT" error
        s = self.defaults(task)
        for key, value in overrides.items():
            if value is not None:
                setattr(s, key, value)
        if overrides.get("top_k") is None:  # the family's top-k follows the number of steps
            s.top_k = self.family.task(task).top_k(s.steps)
        return s.validate(allow_long)

    def _note(self, message: str) -> None:
        self.notes.append(message)
        log.info("%s", message)

    def _tags(self) -> dict[str, Any]:
        """What an image's metadata records beyond its settings: the LoRA adapters, if any."""
        return dict(self.adapters or {})

    # -- images in ---------------------------------------------------------------------------
    def _pil(self, image: ImageLike, mask: bool = False) -> Image.Image:
        if isinstance(image, (str, os.PathLike)):
            im = load_mask(image) if mask else load_image(image)  # logs its notes itself
            self.notes.extend(im.info.get(NOTES_KEY, []))
            return im
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise ImageInputError(f"array images must be uint8 (H, W[, C]), got {image.dtype}")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise ImageInputError(f"expected a path, PIL image or uint8 array, got {type(image).__name__}")
        # normalize_mode, not convert: convert clips 16/32-bit and float pixels (see images.py)
        seen = len(image.info.get(NOTES_KEY, []))
        im = normalize_mode(image, "L" if mask else "RGB")
        for note in im.info[NOTES_KEY][seen:]:
            self._note(note)
        return im

    def encode_image(self, image: ImageLike) -> np.ndarray:
        """Image → (1, N) MAGVIT codes at the model's resolution (reference preprocessing)."""
        image = self._pil(image)
        r = self.resolution
        if image.size != (r, r):
            shape = "centre-cropped to a square and resized" if image.width != image.height else "resized"
            self._note(f"image {image.width}x{image.height} {shape} to {r}x{r}, the model's input size")
        notes: list[str] = []
        pixels = preprocess_image(image, r, notes=notes)
        for note in notes:
            self._note(note)
        with magvit_throttle(self.low_ram):  # evaluated inside: the throttle only acts on work done there
            return np.array(self.vq.encode(mx.array(pixels)))

    def decode_codes(self, codes: np.ndarray, shape: tuple[int, int] | None = None) -> list[Image.Image]:
        with magvit_throttle(self.low_ram):
            pixels = np.array(self.decoder.decode(mx.array(np.asarray(codes)), shape=shape))
        return [Image.fromarray(a) for a in to_uint8(pixels)]

    def _release_encoder(self, keep_decoder: bool) -> None:
        """Low-RAM mode: free the MAGVIT encoder once the input image is encoded (and the whole
        MAGVIT when the task never decodes); it is reloaded from disk when needed again."""
        if not self.low_ram or self._vq is None:
            return
        self._decoder = drop_encoder(self._vq) if keep_decoder else None
        self._vq = None
        mx.clear_cache()

    # -- MaskGIT core --------------------------------------------------------------------------
    def _decode_window(
        self,
        prompts: Sequence[str],
        init_tokens: np.ndarray,
        seeds: Sequence[int],
        s: GenerationSettings,
        callback=None,
    ) -> np.ndarray:
        """Run MaskGIT for one batch of rows (prompt i with seed i) → codes (B, N)."""
        cond = self.prompting.t2i_gen(list(prompts), init_tokens)
        logits_fn = CachedImageLogits(self.model, self.prompting, cond, s.guidance, self._uncond)
        randomness = GreedyRandomness() if s.greedy else KeyedRandomness(list(seeds))
        codes = decode_image_tokens(
            logits_fn,
            init_tokens,
            steps=s.steps,
            mask_token_id=self.cfg.mask_token_id,
            image_token_offset=self.prompting.ids.image_offset,
            codebook_size=self.cfg.codebook_size,
            schedule=s.schedule,
            temperature=s.temperature,
            randomness=randomness,
            callback=callback,
            top_k=s.top_k or None,
        )
        return np.array(codes)

    def _rows(self, prompts: str | Sequence[str], seed, n: int, allow_long: bool = False) -> list[tuple[str, int]]:
        prompts = _prompt_list(prompts)
        if not prompts:
            raise GenerationInputError("no prompt given; pass at least one (an empty string is the unconditional prompt)")
        check_count(n, "number of images", MAX_IMAGES, allow_long)
        seeds = _seed_list(seed, n)
        check_count(len(prompts) * len(seeds), "number of images (prompts x seeds)", MAX_IMAGES, allow_long)
        for p in self.truncated(prompts):
            self._note(f"prompt truncated to the model's {self.prompting.max_text_len - 3} text tokens (as the reference does): {p[:40]!r}...")
        return [(p, sd) for p in prompts for sd in seeds]

    def truncated(self, prompts: Sequence[str]) -> list[str]:
        """Prompts longer than the 129-token text block (the reference keeps the first 126 tokens)."""
        return [p for p in prompts if self.prompting.t2i_text_block(p)[1]]

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        seed: int | Sequence[int] | None = None,
        n: int = 1,
        steps: int | None = None,
        guidance: float | None = None,
        temperature: float | None = None,
        schedule: str | None = None,
        greedy: bool = False,
        batch_size: int = 4,
        callback=None,
        top_k: int | None = None,
        allow_long: bool = False,
        on_image: Callable[["GeneratedImage"], None] | None = None,
    ) -> list[GeneratedImage]:
        """Text-to-image. Each prompt gets one image per seed; with one seed s and n > 1 the seeds
        are s, s+1, …, s+n-1, so any image can be reproduced alone from its metadata.
        More than 1000 steps or 1000 images need `allow_long=True`. `on_image` is called with
        each image as soon as its batch is decoded (e.g. to save it, so an interrupted run keeps
        the finished ones)."""
        self.notes = []
        s = self.settings("generate", allow_long=allow_long, steps=steps, guidance=guidance, temperature=temperature, schedule=schedule, greedy=greedy, top_k=top_k)
        rows = self._rows(prompts, seed, n, allow_long)
        check_count(batch_size, "batch size")
        out: list[GeneratedImage] = []
        mask_row = np.full(self.cfg.num_vq_tokens, self.cfg.mask_token_id, dtype=np.int64)
        for chunk in _chunks(rows, batch_size):
            start = time.perf_counter()
            init = np.tile(mask_row, (len(chunk), 1))
            codes = self._decode_window([p for p, _ in chunk], init, [sd for _, sd in chunk], s, callback)
            decoded = self.decode_codes(codes)
            log.debug("batch of %d: %d steps and the MAGVIT decode in %.2f s", len(chunk), s.steps, time.perf_counter() - start)
            for (p, sd), img, c in zip(chunk, decoded, codes):
                out.append(GeneratedImage(img, p, sd, s, c, extra=self._tags(), **self._provenance()))
                if on_image is not None:
                    on_image(out[-1])
        return out

    def inpaint(
        self,
        image: ImageLike,
        mask: ImageLike,
        prompt: str,
        *,
        seed: int | Sequence[int] | None = None,
        n: int = 1,
        steps: int | None = None,
        guidance: float | None = None,
        temperature: float | None = None,
        schedule: str | None = None,
        greedy: bool = False,
        callback=None,
        top_k: int | None = None,
        allow_long: bool = False,
    ) -> list[GeneratedImage]:
        """Repaint the white part of `mask` guided by `prompt` (the reference's inpainting,
        `inference_t2i.py`). A mask of another size than the image is first resized to the image
        (nearest neighbour, with a note), so the region repainted is the one painted."""
        self.notes = []
        s = self.settings("inpaint", allow_long=allow_long, steps=steps, guidance=guidance, temperature=temperature, schedule=schedule, greedy=greedy, top_k=top_k)
        rows = self._rows(prompt, seed, n, allow_long)
        image = self._pil(image)  # decoded once, used for the mask's size and the encoding
        region = self.mask_region(image, mask)
        codes = self.encode_image(image)
        self._release_encoder(keep_decoder=True)
        tokens = np.where(region, self.cfg.mask_token_id, self.prompting.image_ids(codes))
        init = np.repeat(tokens, len(rows), axis=0)
        out_codes = self._decode_window([p for p, _ in rows], init, [sd for _, sd in rows], s, callback)
        return [
            GeneratedImage(img, p, sd, s, c, task="inpaint", extra={"repainted_tokens": int(region.sum()), **self._tags()}, **self._provenance())
            for (p, sd), img, c in zip(rows, self.decode_codes(out_codes), out_codes)
        ]

    def mask_region(self, image: ImageLike, mask: ImageLike) -> np.ndarray:
        """(1, N) bool, True = token to repaint: the mask is brought to the image's size (nearest
        neighbour keeps a binary mask binary), then preprocessed exactly as the reference does
        (resize + centre crop, bicubic down to the token grid, >= 0.5). The reference preprocesses
        image and mask independently, so a mask of another aspect ratio would be cropped
        differently from the image and repaint somewhere else."""
        size = self._pil(image).size
        mask_image = self._pil(mask, mask=True)
        seen = len(mask_image.info[NOTES_KEY])
        fitted = fit_mask(mask_image, size)
        for note in fitted.info[NOTES_KEY][seen:]:
            self._note(note)
        notes: list[str] = []
        region = mask_tokens(preprocess_mask(fitted, self.resolution, notes), self.grid)
        for note in notes:
            self._note(f"mask: {note}")
        if not region.any():
            raise ImageInputError("the mask selects no token to repaint (it must be white where to repaint)")
        self._note(f"mask: {int(region.sum())} of {region.size} image tokens ({self.grid[0]}x{self.grid[1]} grid) will be repainted")
        return region

    def extrapolate(
        self,
        image: ImageLike,
        prompts: str | Sequence[str],
        directions: Sequence[str],
        *,
        offset: int = 0,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        temperature: float | None = None,
        schedule: str | None = None,
        greedy: bool = False,
        callback=None,
        top_k: int | None = None,
        allow_long: bool = False,
    ) -> list[GeneratedImage]:
        """Outpaint step by step (`inference_t2i.py`, extrapolation): each direction adds half a
        window (plus `offset`) of new tokens on that side. "down" works (the reference crashes on
        it). The final canvas may cover at most 16 windows unless `allow_long=True`."""
        self.notes = []
        s = self.settings("extend", allow_long=allow_long, steps=steps, guidance=guidance, temperature=temperature, schedule=schedule, greedy=greedy, top_k=top_k)
        directions = [str(d).lower() for d in directions] if not isinstance(directions, str) else [directions.lower()]
        bad = [d for d in directions if d not in DIRECTIONS]
        if bad or not directions:
            raise GenerationInputError(f"unknown direction {bad[0] if bad else '(none)'}; choose from {', '.join(DIRECTIONS)}")
        prompts = _prompt_list(prompts)
        if len(prompts) == 1:
            prompts = prompts * len(directions)
        if len(prompts) != len(directions):
            raise GenerationInputError(f"{len(prompts)} prompts for {len(directions)} directions; give one prompt or one per direction")
        w = self.grid[0]
        if not is_integer(offset) or not 0 <= offset < w // 2:
            raise GenerationInputError(f"offset must be an integer in [0, {w // 2 - 1}], got {offset!r}")
        h_end, w_end = extended_canvas_shape((w, w), directions, w // 2 + offset)
        if h_end * w_end > MAX_CANVAS_WINDOWS * w * w and not allow_long:
            raise GenerationInputError(
                f"{len(directions)} extension steps make a {h_end}x{w_end}-token canvas, over the limit of "
                f"{MAX_CANVAS_WINDOWS} model windows ({MAX_CANVAS_WINDOWS * w * w} tokens); {LONG_HINT}"
            )
        for p in self.truncated(prompts):
            self._note(f"prompt truncated to the model's {self.prompting.max_text_len - 3} text tokens (as the reference does): {p[:40]!r}...")
        seed = _seed_list(seed, 1)[0]
        unknown = -1  # marks not-yet-generated canvas cells (codes are >= 0)
        canvas = self.encode_image(image).reshape(1, w, w)
        self._release_encoder(keep_decoder=True)
        stream = 0
        for prompt, d in zip(prompts, directions):
            canvas = grow_canvas(canvas, d, w // 2 + offset, unknown)
            for rows, cols in extension_windows(canvas.shape[1:], d, w):
                window = canvas[:, rows, cols]
                tokens = np.where(window == unknown, self.cfg.mask_token_id, window + self.prompting.ids.image_offset)
                step_seed = (seed * 1_000_003 + stream) % 2**31  # a distinct, reproducible stream per window
                stream += 1
                codes = self._decode_window([prompt], tokens.reshape(1, -1), [step_seed], s, callback)
                canvas[:, rows, cols] = codes.reshape(1, w, w)
        h, wc = canvas.shape[1:]
        img = self.decode_codes(canvas.reshape(1, -1), shape=(h, wc))[0]
        extra = {"directions": " ".join(directions), "offset": offset, "canvas_tokens": f"{h}x{wc}", **self._tags()}
        return [GeneratedImage(img, " *** ".join(prompts), seed, s, canvas.reshape(-1), task="extend", extra=extra, **self._provenance())]

    def extension_window_count(self, directions: Sequence[str], offset: int = 0) -> int:
        """How many MaskGIT windows `extrapolate` runs for these directions (progress totals)."""
        w, shape, count = self.grid[0], (self.grid[0], self.grid[0]), 0
        for d in (d.lower() for d in directions):
            m = w // 2 + offset
            shape = (shape[0], shape[1] + m) if d in ("left", "right") else (shape[0] + m, shape[1])
            count += len(extension_windows(shape, d, w))
        return count

    # -- text out ------------------------------------------------------------------------------
    def stream_ask(
        self,
        image: ImageLike,
        question: str,
        *,
        max_tokens: int = 100,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        codes: np.ndarray | None = None,
    ) -> Generator[GenerationResponse, None, AnswerStats]:
        """Answer a question about an image, yielding the text as it is decoded (the reference's
        `inference_mmu.py` prompt and `Showo.mmu_generate` loop, with a KV cache).

        Each item is a `GenerationResponse`: a str (the new text, possibly empty) that also carries
        mlx-lm's fields `.text`, `.token`, `.prompt_tokens`, `.prompt_tps`, `.generation_tokens`,
        `.generation_tps`, `.peak_memory` and `.finish_reason`; `"".join(...)` is the answer. The
        generator returns the `AnswerStats` (`x = yield from pipe.stream_ask(...)`). `codes`: the
        image's `encode_image` result, to ask many questions about one image without encoding it
        each time (`image` is then not read). w_clip_vit models answer through their CLIP tower
        (`inference_mmu.py`, w_clip_vit branch).

        The prompt (image tokens + question) must leave room for an answer in the model's
        `max_position_embeddings` (2048) positions: a longer question is refused (the reference
        does not truncate questions), and `max_tokens` is lowered to the room left, with a note."""
        self.notes = []
        question = check_text(question, "question")
        options = SamplingOptions(temperature, top_k, top_p, seed).validate()
        length = self.answer_prompt_length(question=question)
        pictured = f"{self.cfg.num_vq_tokens} image tokens" if not self.cfg.w_clip_vit else "the CLIP image features"
        max_tokens = self._answer_budget(length, max_tokens, f"question's prompt ({pictured}, the question and its format)")
        if self.cfg.w_clip_vit:
            prompt, embeddings = self.vit_prompt(image, question)
            return (yield from self._stream(None, [prompt.layout], max_tokens, options, prompt_embeddings=embeddings))
        if codes is None:
            codes = self.encode_image(image)
            self._release_encoder(keep_decoder=False)
        prompt = self.prompting.mmu_gen(self.prompting.image_ids(codes), question)
        return (yield from self._stream(prompt.ids, prompt.layouts, max_tokens, options))

    @property
    def vision(self):
        """The CLIP tower and processor (w_clip_vit models; loaded on first use)."""
        if self._vision is None:
            from .vision import load_vision

            self._vision = load_vision(self.folder, self.config)
        return self._vision

    def vit_prompt(self, image: ImageLike, question: str):
        """The CLIP path's prompt: (VitPrompt, input embeddings (1, L, hidden)) — token embeddings
        with the projected CLIP features spliced in after <|soi|> (`inference_mmu.py`)."""
        features = self.vision(self._pil(image))
        prompt = self.prompting.mmu_vit_gen(question, num_image=features.shape[1])
        text = self.model.embed_tokens(mx.array(prompt.ids))
        return prompt, prompt.splice(text, self.model.mm_projector(features))

    def ask(self, image: ImageLike, question: str, **kwargs) -> str:
        return "".join(self.stream_ask(image, question, **kwargs))

    def caption(self, image: ImageLike, **kwargs) -> str:
        return self.ask(image, CAPTION_QUESTION, **kwargs)

    def stream_complete(
        self, text: str, *, max_tokens: int = 100, temperature: float = 0.0, top_k: int = 0, top_p: float = 0.0, seed: int | None = None
    ) -> Generator[GenerationResponse, None, AnswerStats]:
        """Plain language modelling (Phi's text ability): [bos] + tokens, causal. Yields
        `GenerationResponse` items, as `stream_ask`. A text that leaves no room in the model's
        positions is refused; `max_tokens` is lowered to the room left, with a note."""
        self.notes = []
        text = check_text(text, "text")
        options = SamplingOptions(temperature, top_k, top_p, seed).validate()
        ids = np.asarray([self.prompting._with_bos(self.prompting.encode(text))])
        max_tokens = self._answer_budget(ids.shape[1], max_tokens, f"text ({ids.shape[1]} tokens with the leading <|endoftext|>)")
        return (yield from self._stream(ids, [Layout(ids.shape[1])], max_tokens, options))

    def complete(self, text: str, **kwargs) -> str:
        return "".join(self.stream_complete(text, **kwargs))

    def answer_prompt_length(self, *, question: str | None = None, text: str | None = None) -> int:
        """Positions of the prompt `stream_ask(image, question)` or `stream_complete(text)` builds,
        known before any image is read (the image's share is fixed by the model)."""
        if question is None:
            return len(self.prompting._with_bos(self.prompting.encode(text)))
        if self.cfg.w_clip_vit:
            if "vision" not in self.config:
                self.vision  # noqa: B018 - raises the one-line "re-convert with --vision-tower" error
            patches = ClipVisionConfig.from_dict(self.config["vision"]["model"]).num_patches
            return self.prompting.mmu_vit_gen(question, num_image=patches).layout.length
        return self.prompting.mmu_length(question, self.cfg.num_vq_tokens)

    def _answer_budget(self, prompt_length: int, max_tokens: int, what: str) -> int:
        """`max_tokens` fitted into the positions left after the prompt (prompt + answer <=
        max_position_embeddings): lowered with a note; a prompt that leaves no room is refused."""
        if not is_integer(max_tokens) or max_tokens < 1:
            raise GenerationInputError(f"max tokens must be an integer >= 1, got {max_tokens!r}")
        limit = self.cfg.max_position_embeddings
        room = limit - prompt_length
        if room < 1:
            raise GenerationInputError(
                f"the {what} is {prompt_length} tokens, leaving no room for an answer in the model's {limit} "
                f"positions; shorten it by at least {1 - room} tokens"
            )
        if max_tokens > room:
            self._note(f"max tokens lowered from {max_tokens} to {room}: the prompt takes {prompt_length} of the model's {limit} positions")
            return room
        return int(max_tokens)

    def answer_tokens(
        self, ids: np.ndarray | None, layouts: Sequence[Layout], max_tokens: int, options: SamplingOptions,
        prompt_embeddings: mx.array | None = None,
    ) -> Iterator[int]:
        """Answer token ids, KV-cached, stopping after eos (the reference's eot); the prompt is
        token ids or, on the CLIP path, input embeddings."""
        mask = attention_mask(layouts)
        if mask is not None and len(layouts) == 1 and layouts[0] == Layout(layouts[0].length):
            mask = "causal"
        return generate_tokens(
            self.model, None if ids is None else mx.array(ids), mask=mask, max_tokens=max_tokens,
            stop_ids=[self.prompting.ids.eos], options=options, prompt_embeddings=prompt_embeddings,
        )

    def _stream(self, ids, layouts, max_tokens, options, prompt_embeddings=None) -> Generator[GenerationResponse, None, AnswerStats]:
        """One response per token, timed as mlx-lm times them: prompt tokens/s over the prefill (up
        to the first token), generation tokens/s from the first token on. Returns the `AnswerStats`."""
        text = IncrementalText(self.prompting.decode)
        eos = self.prompting.ids.eos
        prompt_tokens = int(prompt_embeddings.shape[1] if prompt_embeddings is not None else np.asarray(ids).shape[1])
        start = time.perf_counter()
        first = prompt_tps = None
        n, reason = 0, "length"
        for n, token in enumerate(self.answer_tokens(ids, layouts, max_tokens, options, prompt_embeddings), 1):
            now = time.perf_counter()
            if first is None:
                first, prompt_tps = now, prompt_tokens / max(now - start, 1e-9)
            reason = "stop" if token == eos else "length" if n == max_tokens else None
            piece = text.add(token) + (text.finish() if reason else "")
            yield GenerationResponse(
                piece, token=int(token), prompt_tokens=prompt_tokens, prompt_tps=prompt_tps, generation_tokens=n,
                generation_tps=n / max(now - first, 1e-9), peak_memory=mx.get_peak_memory() / 1e9, finish_reason=reason,
            )
        return AnswerStats(prompt_tokens, n, reason or "length")


# -- helpers -----------------------------------------------------------------------------------
def _seed_list(seed, n: int) -> list[int]:
    """One seed per image: an explicit list, or s, s+1, …, s+n-1 from one seed (random if None).
    Every seed, s+n-1 included, must be in [0, 2**63) (`check_seed`)."""
    if seed is None:
        seed = int(time.time_ns() % 2**31)
    if isinstance(seed, (list, tuple)):
        seeds = [check_seed(s) for s in seed]
        if not seeds:
            raise GenerationInputError("empty seed list")
        if n > 1 and len(seeds) > 1:
            raise GenerationInputError("several seeds and -n > 1 together are ambiguous; give one seed with -n, or list every seed")
        if n <= 1:
            return seeds
        seed = seeds[0]
    seed = check_seed(seed)
    if n > 1:
        check_seed(seed + n - 1, f"the last seed (seed + n - 1 = {seed} + {n - 1})")
    return [seed + i for i in range(n)]


def _prompt_list(prompts) -> list[str]:
    """One prompt or an iterable of them, each a valid Unicode string."""
    if isinstance(prompts, (str, bytes, bytearray)) or not isinstance(prompts, Iterable):
        prompts = [prompts]  # a lone non-string is refused by check_text with its type named
    return [check_text(p, "prompt") for p in prompts]


def extended_canvas_shape(shape: tuple[int, int], directions: Sequence[str], m: int) -> tuple[int, int]:
    """Canvas size in tokens after growing `shape` by m rows/columns per direction."""
    h, w = shape
    for d in directions:
        if d in ("left", "right"):
            w += m
        else:
            h += m
    return h, w


def _chunks(rows: list, size: int) -> Iterator[list]:
    size = max(1, size)
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def grow_canvas(canvas: np.ndarray, direction: str, m: int, mask_code: int) -> np.ndarray:
    """The canvas with m new rows/columns of `mask_code` on the `direction` side."""
    b, hc, wc = canvas.shape
    new = np.full((b, hc, m) if direction in ("left", "right") else (b, m, wc), mask_code, dtype=canvas.dtype)
    axis = 2 if direction in ("left", "right") else 1
    parts = (new, canvas) if direction in ("left", "up") else (canvas, new)
    return np.concatenate(parts, axis=axis)


def extension_windows(shape: tuple[int, int], direction: str, w: int) -> list[tuple[slice, slice]]:
    """W×W windows covering the new border of a grown canvas of `shape` (`inference_t2i.py`,
    extrapolation).

    Along the extension axis the window holds the m new and the k = W − m old rows/columns next to
    them, as in the reference. Along the other axis the reference needs the canvas to be exactly W
    (it cannot turn a corner); here windows tile it left to right / top to bottom, the last one
    aligned to the far edge, so left/right and up/down can be chained in any order. With a W-wide
    canvas there is one window and the step is the reference's."""
    h, wc = shape
    across = h if direction in ("left", "right") else wc
    starts = list(range(0, across - w + 1, w))
    if starts[-1] != across - w:
        starts.append(across - w)
    edge = {"left": 0, "up": 0, "right": wc - w, "down": h - w}[direction]
    if direction in ("left", "right"):
        return [(slice(a, a + w), slice(edge, edge + w)) for a in starts]
    return [(slice(edge, edge + w), slice(a, a + w)) for a in starts]
