"""The transformer as MaskGIT's image-logits function (the first step of each iteration of the
official `Showo.t2i_generate`, `models/modeling_showo.py`), two ways.

`CachedImageLogits` (default): the 129-token text block never attends to image positions (the
official `create_attention_mask_predict_next`, `training/prompting_utils.py`), so its per-layer keys/values are computed once per prompt, and once per loaded model for the
unconditional prompt; each step then runs only soi + N image tokens + eoi, and the head only over
the image-code rows of the vocabulary.

`RecomputeImageLogits`: the reference's way: the whole (2B, L) sequence and the full vocabulary
every step. Kept for equivalence tests and for benchmarks that measure what the cache saves.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from .attention import attention_mask
from .maskgit import cfg_combine
from .model import PrefixCache, ShowoTransformer
from .prompting import Prompt, Prompting

ImageLogitsFn = Callable[[mx.array], mx.array]


class UncondPrefixStore:
    """The unconditional prompt's text-block keys/values: computed once per loaded model."""

    def __init__(self):
        self._cache: list[PrefixCache] | None = None

    def get(self, model: ShowoTransformer, prompting: Prompting) -> list[PrefixCache]:
        if self._cache is None:
            block, _ = prompting.t2i_text_block("")
            ids = np.asarray([block])
            layouts = prompting.t2i_layouts(_with_dummy_image(ids, prompting))
            self._cache = model.prefix_cache(mx.array(ids), _prefix_mask(layouts, ids.shape[1]))
        return self._cache


def _with_dummy_image(text_ids: np.ndarray, prompting: Prompting) -> np.ndarray:
    """Append soi/eoi so the Layout reader sees the text block exactly as in a full sequence."""
    b = len(text_ids)
    return np.concatenate([text_ids, np.full((b, 1), prompting.ids.soi), np.full((b, 1), prompting.ids.eoi)], 1)


def _prefix_mask(layouts, prefix_len: int):
    """Text-block rows over text-block keys only (they never see later positions)."""
    return attention_mask(layouts, 0, prefix_len, k_end=prefix_len)


class CachedImageLogits:
    """Image-code logits for the current window with prefix caches (cond rows, then uncond rows)."""

    def __init__(
        self,
        model: ShowoTransformer,
        prompting: Prompting,
        cond: Prompt,
        guidance: float,
        uncond_store: UncondPrefixStore | None = None,
    ):
        self.model, self.guidance = model, guidance
        ids = prompting.ids
        self.offset, self.codebook = ids.image_offset, model.config.codebook_size
        self.soi, self.eoi = ids.soi, ids.eoi
        b, length = cond.ids.shape
        self.prefix_len = prompting.max_text_len
        self.batch = b
        p = self.prefix_len
        cond_cache = model.prefix_cache(mx.array(cond.ids[:, :p]), _prefix_mask(cond.layouts, p))
        layouts = list(cond.layouts)
        if guidance > 0:
            store = uncond_store or UncondPrefixStore()
            uncond_cache = [c.repeat(b) for c in store.get(model, prompting)]
            cond_cache = PrefixCache.concat_batch([cond_cache, uncond_cache])
            layouts += prompting.uncond(cond.ids[:, p + 1 : -1]).layouts
        self.cache = cond_cache
        # Image-segment queries see every non-pad key (`training/prompting_utils.py`,
        # `create_attention_mask_predict_next` with `rm_pad_in_image=True`): all queries of a row see
        # the same keys, so SDPA gets a (B, 1, 1, Lk) key mask read off the Layouts' flag bytes, built
        # here once for all steps and layers; None when no row has pads. No Lq x Lk mask is built.
        self.mask = attention_mask(layouts, p, length)
        if self.mask is not None:
            self.mask.sdpa_mask()

    def __call__(self, tokens: mx.array) -> mx.array:
        rows = tokens.shape[0] * (2 if self.guidance > 0 else 1)
        if self.guidance > 0:
            tokens = mx.concatenate([tokens, tokens], axis=0)  # uncond shares the current image tokens
        tail = mx.concatenate(
            [mx.full((rows, 1), self.soi, tokens.dtype), tokens, mx.full((rows, 1), self.eoi, tokens.dtype)], axis=1
        )
        h = self.model.hidden_states(tail, mask=self.mask, cache=self.cache)[:, 1:-1]
        logits = self.model.head_slice(h, self.offset, self.offset + self.codebook).astype(mx.float32)
        if self.guidance > 0:
            logits = cfg_combine(logits[: self.batch], logits[self.batch :], self.guidance)
        return logits


class RecomputeImageLogits:
    """The reference's step: full forward over cond (+uncond) rows, CFG on full fp32 logits."""

    def __init__(self, model: ShowoTransformer, prompting: Prompting, cond: Prompt, guidance: float):
        self.model, self.guidance = model, guidance
        self.offset, self.codebook = prompting.ids.image_offset, model.config.codebook_size
        self.text = mx.array(cond.ids[:, : prompting.max_text_len + 1])  # text block + soi
        self.eoi = prompting.ids.eoi
        layouts = list(cond.layouts)
        if guidance > 0:
            uncond = prompting.uncond(cond.ids[:, prompting.max_text_len + 1 : -1])
            self.text = mx.concatenate([self.text, mx.array(uncond.ids[:, : prompting.max_text_len + 1])], axis=0)
            layouts += uncond.layouts
        self.mask = attention_mask(layouts)
        self.batch = cond.ids.shape[0]

    def __call__(self, tokens: mx.array) -> mx.array:
        n = tokens.shape[1]
        if self.guidance > 0:
            tokens = mx.concatenate([tokens, tokens], axis=0)
        eoi = mx.full((tokens.shape[0], 1), self.eoi, tokens.dtype)
        ids = mx.concatenate([self.text.astype(tokens.dtype), tokens, eoi], axis=1)
        logits = self.model(ids, mask=self.mask).astype(mx.float32)
        if self.guidance > 0:
            logits = cfg_combine(logits[: self.batch], logits[self.batch :], self.guidance)
        start = ids.shape[1] - n - 1
        return logits[:, start : start + n, self.offset : self.offset + self.codebook]
