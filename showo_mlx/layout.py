"""Layout: a description of one token sequence by its segments, and the attention rule it implies.

The reference builds three kinds of L×L additive masks (official `training/prompting_utils.py`:
`create_attention_mask_predict_next`, `create_attention_mask_for_mmu`,
`create_attention_mask_for_mmu_vit`). All three are readings of one
rule over a few segment facts, which a `Layout` records:

    allowed(q, k) = ( k <= q                      causal
                      or q in an image span       image segments (soi..eoi) see the whole row
                      or k < prefix_len           prefix-LM (MMU: everything up to eoi)
                      or k in a global key range  MMU-ViT: every query sees the 576 image columns )
                    and ( k is not a hidden pad  or  q is a hidden pad )

Hidden pads are the t2i left pads (`rm_pad_in_image=True`); pad rows keep causal pad-to-pad
attention so that no row is ever empty (as `create_attention_mask_predict_next` keeps them; an empty
row would leak NaNs). Masks are boolean (True = may attend), never additive with the official
builders' -2^63, which overflows to -inf in float16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

Span = tuple[int, int]  # half-open [start, end)


@dataclass(frozen=True)
class Layout:
    """Segments of one row. All spans are half-open position ranges."""

    length: int
    pads: tuple[Span, ...] = ()  # pad keys hidden from non-pad queries
    image_spans: tuple[Span, ...] = ()  # [soi, eoi + 1): bidirectional over the whole row
    prefix_len: int = 0  # keys [0, prefix_len) visible to every query
    global_keys: tuple[Span, ...] = ()  # key ranges visible to every query

    def __post_init__(self):
        for a, b in (*self.pads, *self.image_spans, *self.global_keys):
            if not 0 <= a <= b <= self.length:
                raise ValueError(f"span [{a}, {b}) outside a row of length {self.length}")
        if not 0 <= self.prefix_len <= self.length:
            raise ValueError(f"prefix_len {self.prefix_len} outside a row of length {self.length}")

    # -- per-position attributes -------------------------------------------------------------
    def _flags(self, spans: Sequence[Span]) -> np.ndarray:
        f = np.zeros(self.length, dtype=bool)
        for a, b in spans:
            f[a:b] = True
        return f

    def pad_flags(self) -> np.ndarray:
        return self._flags(self.pads)

    def image_flags(self) -> np.ndarray:
        return self._flags(self.image_spans)

    # -- the rule ------------------------------------------------------------------------------
    def allowed(self, q_start: int = 0, q_end: int | None = None) -> np.ndarray:
        """Boolean (q_end - q_start, length) mask for query rows [q_start, q_end)."""
        q_end = self.length if q_end is None else q_end
        q = np.arange(q_start, q_end)[:, None]
        k = np.arange(self.length)[None, :]
        pad = self.pad_flags()
        see = (k <= q) | self.image_flags()[q_start:q_end, None] | (k < self.prefix_len)
        see = see | self._flags(self.global_keys)[None, :]
        return see & (~pad[None, :] | pad[q_start:q_end, None])

    def is_full(self, q_start: int, q_end: int | None = None) -> bool:
        """True when rows [q_start, q_end) may attend to every key (no mask needed)."""
        return bool(self.allowed(q_start, q_end).all())

    @property
    def first_image_position(self) -> int | None:
        return self.image_spans[0][0] if self.image_spans else None


def batch_allowed(layouts: Sequence[Layout], q_start: int = 0, q_end: int | None = None) -> np.ndarray:
    """(B, q, L) boolean mask for a batch of equal-length rows."""
    lengths = {lay.length for lay in layouts}
    if len(lengths) != 1:
        raise ValueError(f"rows of a batch must have one length, got {sorted(lengths)}")
    return np.stack([lay.allowed(q_start, q_end) for lay in layouts])


# -- constructors for the reference's sequence kinds (`UniversalPrompting` and its mask builders) --
def t2i_layout(length: int, num_left_pads: int, soi: int, eoi: int) -> Layout:
    """`create_attention_mask_predict_next` with rm_pad_in_image=True: left pads hidden, soi..eoi
    bidirectional."""
    return Layout(length, pads=((0, num_left_pads),) if num_left_pads else (), image_spans=((soi, eoi + 1),))


def causal_layout(length: int, image_spans: tuple[Span, ...] = ()) -> Layout:
    """`create_attention_mask_predict_next` with rm_pad_in_image=False (lm rows): causal, image spans
    (if any) bidirectional."""
    return Layout(length, image_spans=image_spans)


def mmu_layout(length: int, eoi: int) -> Layout:
    """`create_attention_mask_for_mmu`: prefix-LM, everything up to and including the first eoi is
    bidirectional."""
    return Layout(length, prefix_len=eoi + 1)


def mmu_vit_layout(length: int, system_prompt_len: int = 28, num_image: int = 576) -> Layout:
    """`create_attention_mask_for_mmu_vit`: causal, and every query sees the image columns
    [s, s + num_image)."""
    s = 1 + system_prompt_len + 1
    return Layout(length, global_keys=((s, s + num_image),))


def layout_from_ids(ids: Sequence[int], kind: str, *, pad_id: int, soi_id: int, eoi_id: int) -> Layout:
    """Read a Layout off a row of token ids the way the reference's mask builders read their ids.

    kind: "t2i" (`create_attention_mask_predict_next`, pads hidden), "lm" (the same without pad
    removal), "mmu" (`create_attention_mask_for_mmu`)."""
    ids = np.asarray(ids)
    length = len(ids)
    if kind == "mmu":
        eoi = np.flatnonzero(ids == eoi_id)
        if not len(eoi):
            raise ValueError("an mmu row needs an <|eoi|> token")
        return mmu_layout(length, int(eoi[0]))
    # The reference's reading (`create_attention_mask_predict_next`): a position is in an image
    # segment when more soi than eoi tokens precede it (cumulative counts), or it is a soi/eoi
    # token itself.
    is_soi, is_eoi = ids == soi_id, ids == eoi_id
    img = (np.cumsum(is_soi) > np.cumsum(is_eoi)) | is_soi | is_eoi
    spans = _runs(img)
    if kind == "lm":
        return causal_layout(length, spans)
    if kind != "t2i":
        raise ValueError(f"unknown layout kind {kind!r}")
    return Layout(length, pads=_runs(ids == pad_id), image_spans=spans)


def _runs(flags: np.ndarray) -> tuple[Span, ...]:
    """Half-open spans of consecutive True values."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return tuple((int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]))
