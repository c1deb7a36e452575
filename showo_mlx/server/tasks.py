"""The work each request does on the worker thread, through `Pipeline` only.

Chat: `Pipeline.stream_ask` (with an image) or `Pipeline.stream_complete` (without), piece by
piece; the client's disconnect is checked before every piece. Images: `Pipeline.generate`,
`inpaint` or `extrapolate` with a MaskGIT step callback that stops a cancelled job at the next step
and, for streamed requests, decodes the current MaskGIT state as a partial image."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .chat import ChatPrompt
from .errors import APIError
from .outputs import b64, png_bytes, preview_image, save_output
from .work_queue import Job

DEFAULT_MAX_TOKENS = 100  # the CLI's `ask`/`complete` default


# -- chat ------------------------------------------------------------------------------------------
@dataclass
class ChatSettings:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int | None = None
    strict: bool = False


def chat_work(prompt: ChatPrompt, settings: ChatSettings):
    def work(pipe, job: Job) -> dict:
        max_tokens, warnings = _fit_context(pipe, prompt, settings)
        job.emit("start", {"warnings": warnings})
        sampling = dict(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed)
        if prompt.image is not None:
            pieces = pipe.stream_ask(prompt.image, prompt.text, max_tokens=max_tokens, **sampling)
        else:
            pieces = pipe.stream_complete(prompt.text, max_tokens=max_tokens, **sampling)
        try:
            while True:
                job.check()  # between answer tokens: a client that left stops the answer here
                try:
                    piece = next(pieces)
                except StopIteration as end:
                    return {"stats": end.value, "warnings": warnings}
                if piece:  # one item per token; tokens still held back by the detokenizer carry ""
                    job.emit("delta", str(piece))
        finally:
            pieces.close()

    return work


def _fit_context(pipe, prompt: ChatPrompt, s: ChatSettings) -> tuple[int, list[str]]:
    """The prompt plus the answer must fit the model's positions (2048 for Show-o). Tokenizing here,
    on the worker, keeps the tokenizer on one thread."""
    context = pipe.cfg.max_position_embeddings
    if prompt.image is not None:
        used = pipe.answer_prompt_length(question=prompt.text)
    else:
        used = pipe.answer_prompt_length(text=prompt.text)
    if used >= context:
        raise APIError(400, f"the prompt is {used} tokens; the model's context is {context}", param="messages", code="context_length_exceeded")
    if used + s.max_tokens <= context:
        return s.max_tokens, []
    room = context - used
    if s.strict:
        raise APIError(400, f"prompt ({used} tokens) + max_tokens ({s.max_tokens}) exceed the model's context of {context}; "
                       f"ask for at most {room} tokens", param="max_tokens", code="context_length_exceeded")
    return room, [f"max_tokens lowered from {s.max_tokens} to {room} to fit the model's context of {context} tokens"]


# -- images ----------------------------------------------------------------------------------------
@dataclass
class ImageJob:
    task: str  # "generate", "inpaint" or "extend"
    prompt: str
    n: int = 1
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    temperature: float | None = None
    schedule: str | None = None
    greedy: bool = False
    top_k: int | None = None
    strict: bool = False
    partial_images: int = 0
    save_to: Path | None = None  # response_format=url: write the PNGs here
    image: Image.Image | None = None
    mask: Image.Image | None = None
    directions: list[str] = field(default_factory=list)
    offset: int = 0


def image_work(spec: ImageJob, event_prefix: str):
    def work(pipe, job: Job) -> dict:
        s = pipe.settings(spec.task, steps=spec.steps, guidance=spec.guidance, temperature=spec.temperature,
                          schedule=spec.schedule, greedy=spec.greedy, top_k=spec.top_k)
        warnings = []
        if pipe.truncated([spec.prompt]):
            if spec.strict:
                raise APIError(400, "the prompt is longer than the model's 126-token limit (strict is set)", param="prompt", code="prompt_too_long")
            warnings.append("prompt truncated to the model's 126-token limit")
        options = dict(steps=s.steps, guidance=s.guidance, temperature=s.temperature, schedule=s.schedule, greedy=s.greedy,
                       top_k=s.top_k)  # the model family's top-k (Show-o Turbo) unless the request sets one
        options["callback"] = StepWatcher(pipe, job, spec.partial_images, s.steps, event_prefix)
        if spec.task == "generate":
            results = pipe.generate(spec.prompt, seed=spec.seed, n=spec.n, **options)
        elif spec.task == "inpaint":
            results = pipe.inpaint(spec.image, spec.mask, spec.prompt, seed=spec.seed, n=spec.n, **options)
        else:
            base = spec.seed if spec.seed is not None else secrets.randbelow(2**31 - 16)
            results = []
            for i in range(spec.n):  # one image per seed, as `showo extend` does
                results += pipe.extrapolate(spec.image, spec.prompt, spec.directions, offset=spec.offset, seed=base + i, **options)
        images = []
        for r in results:
            meta = r.metadata(pipe.name)
            item = {"png": png_bytes(r.image, meta), "seed": meta["seed"], "size": f"{r.image.width}x{r.image.height}"}
            if spec.save_to is not None:
                item["name"] = save_output(spec.save_to, r.image, meta)
            images.append(item)
        prompt_tokens = len(pipe.prompting.encode(spec.prompt))
        usage = {"input_tokens": prompt_tokens, "output_tokens": sum(int(np.size(r.codes)) for r in results)}
        return {"images": images, "warnings": warnings, "usage": usage}

    return work


class StepWatcher:
    """The MaskGIT step callback: False (stop) once the client has gone; at `count` evenly spread
    steps, the current state decoded as a partial image for every image of the batch."""

    def __init__(self, pipe, job: Job, count: int, steps: int, event_prefix: str):
        self.pipe, self.job, self.count = pipe, job, count
        self.at = {round((i + 1) * steps / (count + 1)) - 1 for i in range(count)} & set(range(steps - 1))
        self.sent = 0
        self.event = f"{event_prefix}.partial_image"

    def __call__(self, step: int, steps: int, tokens) -> bool | None:
        if self.job.cancelled:
            return False
        if self.sent >= self.count or step not in self.at:
            return None
        window = np.array(tokens)
        masked = window == self.pipe.cfg.mask_token_id
        codes = np.where(masked, 0, window - self.pipe.prompting.ids.image_offset)
        h, w = self.pipe.grid
        for b, decoded in enumerate(self.pipe.decode_codes(codes)):
            png = png_bytes(preview_image(decoded, masked[b].reshape(h, w)))
            self.job.emit("partial", {"type": self.event, "b64_json": b64(png), "partial_image_index": self.sent,
                                      "image_index": b, "step": step + 1, "steps": steps, "size": f"{decoded.width}x{decoded.height}"})
        self.sent += 1
        return None
