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

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from . import __version__
from .attention import attention_mask
from .config import MagvitConfig, ShowoConfig
from .convert import QuantizeSpec
from .decoding import IncrementalText, SamplingOptions, generate_tokens
from .errors import GenerationInputError, ImageInputError
from .images import load_image, load_mask, mask_tokens, preprocess_image, preprocess_mask, to_uint8
from .layout import Layout
from .family import family_of
from .loading import DEFAULT_MODEL, load_magvit, load_transformer, read_model_config, resolve_model
from .maskgit import GreedyRandomness, KeyedRandomness, check_schedule, decode_image_tokens
from .memory import apply_low_ram, drop_encoder, magvit_throttle
from .prompting import Prompting
from .t2i import CachedImageLogits, UncondPrefixStore

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

    def validate(self) -> "GenerationSettings":
        if not isinstance(self.steps, int) or self.steps < 1:
            raise GenerationInputError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not np.isfinite(self.guidance) or self.guidance < 0:
            raise GenerationInputError(f"guidance must be >= 0, got {self.guidance}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationInputError(f"temperature must be >= 0, got {self.temperature}")
        check_schedule(self.schedule)
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise GenerationInputError(f"top-k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        return self


@dataclass
class GeneratedImage:
    image: Image.Image
    prompt: str
    seed: int | None
    settings: GenerationSettings
    codes: np.ndarray
    task: str = "generate"
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self, model: str) -> dict[str, str]:
        """PNG text chunks: enough to reproduce the image."""
        s = self.settings
        meta = {
            "prompt": self.prompt,
            "seed": "greedy" if s.greedy else str(self.seed),
            "steps": str(s.steps),
            "guidance": str(s.guidance),
            "temperature": str(s.temperature),
            "schedule": s.schedule,
            **({"top_k": str(s.top_k)} if s.top_k else {}),
            "task": self.task,
            "model": model,
            "software": f"showo-mlx {__version__}",
        }
        meta.update({k: str(v) for k, v in self.extra.items()})
        return meta


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str | None = None,
    quantize: int | QuantizeSpec | None = None,
    vq_dtype: str | None = None,
    low_ram: bool = False,
    log: Callable[[str], None] = print,
) -> "Pipeline":
    """Load a model (Hub id, official folder or converted folder) into a ready Pipeline.
    `low_ram` trades a little MAGVIT speed for memory (see memory.py)."""
    if isinstance(quantize, int):
        quantize = QuantizeSpec(bits=quantize)
    folder = resolve_model(model, log=log)
    return Pipeline(folder, dtype=dtype, quantize=quantize, vq_dtype=vq_dtype, low_ram=low_ram, name=str(model))


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
    ):
        self.folder = Path(folder)
        self.low_ram = low_ram
        if low_ram:
            apply_low_ram()
        self.name = name or str(folder)
        self.config = read_model_config(self.folder)
        self.model = load_transformer(self.folder, self.config, dtype=dtype, quantize=quantize)
        self.cfg: ShowoConfig = self.model.config
        self.prompting = Prompting(self.folder, self.cfg)
        self.family = family_of(self.config)
        # Understanding-only folders (--no-vq, CLIP models) carry no MAGVIT.
        self.vq_config = MagvitConfig.from_dict(self.config["magvit"]) if "magvit" in self.config else None
        self._vision = None  # the CLIP tower of w_clip_vit models, loaded on first use
        self.vq_dtype = vq_dtype
        self._vq = None  # the full tokenizer, loaded when an image must be encoded
        self._decoder = None  # decoder-only, enough for text-to-image
        self._uncond = UncondPrefixStore()

    # -- parts -------------------------------------------------------------------------------
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

    def settings(self, task: str, **overrides) -> GenerationSettings:
        if self.vq_config is None:
            load_magvit(self.folder, self.config)  # raises the one-line "converted without MAGVIT" error
        s = self.defaults(task)
        for key, value in overrides.items():
            if value is not None:
                setattr(s, key, value)
        if overrides.get("top_k") is None:  # the family's top-k follows the number of steps
            s.top_k = self.family.task(task).top_k(s.steps)
        return s.validate()

    # -- images in ---------------------------------------------------------------------------
    def _pil(self, image: ImageLike, mask: bool = False) -> Image.Image:
        if isinstance(image, (str, os.PathLike)):
            return load_mask(image) if mask else load_image(image)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise ImageInputError(f"array images must be uint8 (H, W[, C]), got {image.dtype}")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise ImageInputError(f"expected a path, PIL image or uint8 array, got {type(image).__name__}")
        return image.convert("L" if mask else "RGB")

    def encode_image(self, image: ImageLike) -> np.ndarray:
        """Image → (1, N) MAGVIT codes at the model's resolution (reference preprocessing)."""
        pixels = preprocess_image(self._pil(image), self.resolution)
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

    def _rows(self, prompts: str | Sequence[str], seed, n: int) -> list[tuple[str, int]]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise GenerationInputError("no prompt given; pass at least one (an empty string is the unconditional prompt)")
        if n < 1:
            raise GenerationInputError(f"number of images must be >= 1, got {n}")
        seeds = _seed_list(seed, n)
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
    ) -> list[GeneratedImage]:
        """Text-to-image. Each prompt gets one image per seed; with one seed s and n > 1 the seeds
        are s, s+1, …, s+n-1, so any image can be reproduced alone from its metadata."""
        s = self.settings("generate", steps=steps, guidance=guidance, temperature=temperature, schedule=schedule, greedy=greedy, top_k=top_k)
        rows = self._rows(prompts, seed, n)
        out: list[GeneratedImage] = []
        mask_row = np.full(self.cfg.num_vq_tokens, self.cfg.mask_token_id, dtype=np.int64)
        for chunk in _chunks(rows, batch_size):
            init = np.tile(mask_row, (len(chunk), 1))
            codes = self._decode_window([p for p, _ in chunk], init, [sd for _, sd in chunk], s, callback)
            for (p, sd), img, c in zip(chunk, self.decode_codes(codes), codes):
                out.append(GeneratedImage(img, p, sd, s, c))
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
    ) -> list[GeneratedImage]:
        """Repaint the white part of `mask` (spec §6.6) guided by `prompt`."""
        s = self.settings("inpaint", steps=steps, guidance=guidance, temperature=temperature, schedule=schedule, greedy=greedy, top_k=top_k)
        codes = self.encode_image(image)
        self._release_encoder(keep_decoder=True)
        region = mask_tokens(preprocess_mask(self._pil(mask, mask=True), self.resolution), self.grid)
        if not region.any():
            raise ImageInputError("the mask selects no token to repaint (it must be white where to repaint)")
        tokens = np.where(region, self.cfg.mask_token_id, self.prompting.image_ids(codes))
        rows = self._rows(prompt, seed, n)
        init = np.repeat(tokens, len(rows), axis=0)
        out_codes = self._decode_window([p for p, _ in rows], init, [sd for _, sd in rows], s, callback)
        return [
            GeneratedImage(img, p, sd, s, c, task="inpaint", extra={"repainted_tokens": int(region.sum())})
            for (p, sd), img, c in zip(rows, self.decode_codes(out_codes), out_codes)
        ]

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
    ) -> list[GeneratedImage]:
        """Outpaint step by step (spec §6.7): each direction adds half a window (plus `offset`)
        of new tokens on that side. "down" works (the reference crashes on it)."""
        s = self.settings("extend", steps=steps, guidance=guidance, temperature=temperature, schedule=schedule, greedy=greedy, top_k=top_k)
        directions = [d.lower() for d in directions]
        bad = [d for d in directions if d not in DIRECTIONS]
        if bad or not directions:
            raise GenerationInputError(f"unknown direction {bad[0] if bad else '(none)'}; choose from {', '.join(DIRECTIONS)}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) == 1:
            prompts = prompts * len(directions)
        if len(prompts) != len(directions):
            raise GenerationInputError(f"{len(prompts)} prompts for {len(directions)} directions; give one prompt or one per direction")
        w = self.grid[0]
        if not 0 <= offset < w // 2:
            raise GenerationInputError(f"offset must be in [0, {w // 2 - 1}], got {offset}")
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
        extra = {"directions": " ".join(directions), "offset": offset, "canvas_tokens": f"{h}x{wc}"}
        return [GeneratedImage(img, " *** ".join(prompts), seed, s, canvas.reshape(-1), task="extend", extra=extra)]

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
    ) -> Iterator[str]:
        """Answer a question about an image, yielding text as it is decoded (spec §4.4, §6.9).
        w_clip_vit models answer through their CLIP tower (`inference_mmu.py`, w_clip_vit branch)."""
        options = SamplingOptions(temperature, top_k, top_p, seed)
        if self.cfg.w_clip_vit:
            prompt, embeddings = self.vit_prompt(image, question)
            yield from self._stream(None, [prompt.layout], max_tokens, options, prompt_embeddings=embeddings)
            return
        codes = self.encode_image(image)
        self._release_encoder(keep_decoder=False)
        prompt = self.prompting.mmu_gen(self.prompting.image_ids(codes), question)
        yield from self._stream(prompt.ids, prompt.layouts, max_tokens, options)

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
    ) -> Iterator[str]:
        """Plain language modelling (Phi's text ability): [bos] + tokens, causal."""
        ids = np.asarray([self.prompting._with_bos(self.prompting.encode(text))])
        yield from self._stream(ids, [Layout(ids.shape[1])], max_tokens, SamplingOptions(temperature, top_k, top_p, seed))

    def complete(self, text: str, **kwargs) -> str:
        return "".join(self.stream_complete(text, **kwargs))

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

    def _stream(self, ids, layouts, max_tokens, options, prompt_embeddings=None) -> Iterator[str]:
        text = IncrementalText(self.prompting.decode)
        for token in self.answer_tokens(ids, layouts, max_tokens, options, prompt_embeddings):
            piece = text.add(token)
            if piece:
                yield piece
        rest = text.finish()
        if rest:
            yield rest


# -- helpers -----------------------------------------------------------------------------------
def _seed_list(seed, n: int) -> list[int]:
    """One seed per image: an explicit list, or s, s+1, …, s+n-1 from one seed (random if None)."""
    if seed is None:
        seed = int(time.time_ns() % 2**31)
    if isinstance(seed, (list, tuple)):
        seeds = [int(s) for s in seed]
        if not seeds:
            raise GenerationInputError("empty seed list")
        if n > 1 and len(seeds) > 1:
            raise GenerationInputError("several seeds and -n > 1 together are ambiguous; give one seed with -n, or list every seed")
        return [seeds[0] + i for i in range(n)] if n > 1 else seeds
    return [int(seed) + i for i in range(n)]


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
    """W×W windows covering the new border of a grown canvas of `shape` (spec §6.7).

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
