"""Autoregressive text decoding with a KV cache (answers and plain completion).

The reference re-runs the whole sequence for every new token (`models/modeling_showo.py`,
`Showo.mmu_generate`); its grown mask is
equivalent to ordinary causal decoding after a prefix computed with the MMU mask, so here the
prefix is computed once and each token costs one position. Sampling uses mlx-lm's samplers;
temperature 0 is argmax, the reference's greedy `top_k=1` demo setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import make_sampler

from .errors import GenerationInputError
from .limits import check_number, check_seed, is_integer
from .model import ShowoTransformer


@dataclass
class SamplingOptions:
    temperature: float = 0.0  # 0 = greedy, as the reference demo
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None

    def validate(self) -> "SamplingOptions":
        """Refuse what would decode garbage silently: NaN/inf temperature (every logit becomes NaN
        and the first sampled id is an end token: an empty answer), non-integer top-k, a seed
        outside [0, 2**63). Values are normalised to plain Python numbers for mlx-lm's samplers."""
        self.temperature = check_number(self.temperature, "temperature")
        if not is_integer(self.top_k) or self.top_k < 0:
            raise GenerationInputError(f"top-k must be an integer >= 0, got {self.top_k!r}")
        self.top_k = int(self.top_k)
        self.top_p = check_number(self.top_p, "top-p", 0.0, 1.0)
        if self.seed is not None:
            self.seed = check_seed(self.seed)
        return self

    def sampler(self) -> Callable[[mx.array], mx.array]:
        return make_sampler(temp=self.temperature, top_p=self.top_p, top_k=self.top_k)


def generate_tokens(
    model: ShowoTransformer,
    prompt_ids: mx.array,
    *,
    mask=None,
    max_tokens: int,
    stop_ids: Sequence[int],
    options: SamplingOptions | None = None,
    prompt_embeddings: mx.array | None = None,
) -> Iterator[int]:
    """Yield new token ids (batch 1); a stop token is yielded, then generation ends (as reference).
    The prompt is `prompt_ids` or, when given, `prompt_embeddings` (the CLIP path's spliced input;
    generated tokens are then fed back as token embeddings, as `Showo.mmu_generate` does).

    Pipelined as mlx-lm does: the graph of token t+1 is built and queued (`mx.async_eval`) before
    token t is read back to Python, so building the graph overlaps the computation instead of
    waiting for it. The price is one token computed and discarded after a stop token."""
    options = (options or SamplingOptions()).validate()
    if not is_integer(max_tokens) or max_tokens < 1:
        raise GenerationInputError(f"max tokens must be an integer >= 1, got {max_tokens!r}")
    if options.top_k >= model.config.vocab_size:  # keeping every token = no top-k (mlx-lm refuses k >= vocab)
        options.top_k = 0
    if options.seed is not None:
        mx.random.seed(options.seed)
    sampler = options.sampler()
    cache = [KVCache() for _ in model.layers]
    stop = set(int(s) for s in stop_ids)

    def sample(logits: mx.array) -> mx.array:
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    y = sample(last_logits(model, prompt_ids, mask=mask, cache=cache, input_embeddings=prompt_embeddings))
    mx.async_eval(y)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            next_y = sample(last_logits(model, y.reshape(1, 1), cache=cache))
            mx.async_eval(next_y)
        token = int(y.item())
        yield token
        if token in stop or n + 1 == max_tokens:  # no next token was queued after the last one
            return
        y = next_y


def last_logits(model: ShowoTransformer, ids: mx.array, **kwargs) -> mx.array:
    """Logits (B, vocab) of the last position only: over every position the head would add ~9% to
    a prefill's FLOPs (58498 × 2048 weights vs 1.21 B in the layers), and only the last is sampled."""
    return model.lm_head(model.hidden_states(ids, **kwargs)[:, -1, :])


class GenerationResponse(str):
    """One step of a streamed answer, like mlx-lm's `GenerationResponse`: the new text (possibly
    empty) with the token and running statistics. It *is* that text (a str), so code that prints
    the pieces or `"".join`s them works unchanged; `.text` gives it as a plain str.

    Fields: `token`, `prompt_tokens`, `prompt_tps` (prefill tokens per second), `generation_tokens`
    (tokens so far), `generation_tps` (tokens per second since the first one), `peak_memory` (GB,
    MLX's peak so far), `finish_reason` ("stop" at the end-of-text token, "length" at max_tokens,
    else None)."""

    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None

    def __new__(cls, text: str = "", *, token: int = -1, prompt_tokens: int = 0, prompt_tps: float = 0.0,
                generation_tokens: int = 0, generation_tps: float = 0.0, peak_memory: float = 0.0,
                finish_reason: str | None = None) -> "GenerationResponse":
        self = super().__new__(cls, text)
        self.token, self.prompt_tokens, self.prompt_tps = token, prompt_tokens, prompt_tps
        self.generation_tokens, self.generation_tps = generation_tokens, generation_tps
        self.peak_memory, self.finish_reason = peak_memory, finish_reason
        return self

    @property
    def text(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return (f"GenerationResponse(text={self.text!r}, token={self.token}, generation_tokens={self.generation_tokens}, "
                f"finish_reason={self.finish_reason!r})")


class IncrementalText:
    """Turns a growing token list into printable increments whose concatenation equals the final
    decoded text. Held back: an incomplete UTF-8 tail (U+FFFD) and a short tail after the last
    space, because the reference's space clean-up (" ." → ".", " n't" → "n't") may still rewrite it."""

    HOLD = 5  # longer than the longest clean-up pattern (" n't")

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self.decode = decode
        self.tokens: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        stable = text.rstrip("\ufffd")
        space = stable.rfind(" ")
        if space >= 0 and len(stable) - space < self.HOLD:
            stable = stable[:space]
        return self._emit(stable)

    def finish(self) -> str:
        return self._emit(self.decode(self.tokens))

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        new = text[len(self.emitted):]
        self.emitted = text
        return new
