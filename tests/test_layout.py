"""Layout → mask rules against a direct per-pair reading of the reference builders
(`training/prompting_utils.py`: `create_attention_mask_predict_next`, `create_attention_mask_for_mmu`,
`create_attention_mask_for_mmu_vit`)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from showo_mlx.attention import attention_mask
from showo_mlx.layout import Layout, layout_from_ids, mmu_layout, mmu_vit_layout

PAD, SOI, EOI, MASK = 99, 100, 101, 120
TEXT = st.integers(0, 98)


def predict_next_allowed(ids, rm_pad_in_image: bool) -> np.ndarray:
    """`create_attention_mask_predict_next` pair by pair: image-segment queries (cumulative soi > eoi, or the delimiters) see every
    non-pad key; text queries are causal; with pad removal, pads are seen only by pad queries."""
    n = len(ids)
    soi_seen = np.cumsum([t == SOI for t in ids])
    eoi_seen = np.cumsum([t == EOI for t in ids])
    out = np.zeros((n, n), bool)
    for q in range(n):
        img_q = soi_seen[q] > eoi_seen[q] or ids[q] in (SOI, EOI)
        for k in range(n):
            ok = img_q or k <= q
            if rm_pad_in_image:
                ok = ok and (ids[k] != PAD or ids[q] == PAD)
            out[q, k] = ok
    return out


@st.composite
def t2i_rows(draw):
    text_len = draw(st.integers(3, 12))
    pads = draw(st.integers(0, text_len - 3))
    text = [PAD] * pads + draw(st.lists(TEXT, min_size=text_len - pads, max_size=text_len - pads))
    image = draw(st.lists(st.sampled_from([MASK, 110, 111, 115]), min_size=1, max_size=10))
    return text + [SOI] + image + [EOI]


@st.composite
def lm_rows(draw):
    n = draw(st.integers(2, 20))
    used = draw(st.integers(1, n))
    return draw(st.lists(TEXT, min_size=used, max_size=used)) + [PAD] * (n - used)


@given(t2i_rows())
@settings(max_examples=150, deadline=None)
def test_t2i_rule(ids):
    lay = layout_from_ids(ids, "t2i", pad_id=PAD, soi_id=SOI, eoi_id=EOI)
    allowed = lay.allowed()
    np.testing.assert_array_equal(allowed, predict_next_allowed(ids, rm_pad_in_image=True))
    assert allowed.any(axis=1).all(), "an empty row would leak NaNs"


@given(lm_rows())
@settings(max_examples=60, deadline=None)
def test_lm_rule_is_causal(ids):
    lay = layout_from_ids(ids, "lm", pad_id=PAD, soi_id=SOI, eoi_id=EOI)
    np.testing.assert_array_equal(lay.allowed(), predict_next_allowed(ids, rm_pad_in_image=False))
    np.testing.assert_array_equal(lay.allowed(), np.tril(np.ones((len(ids), len(ids)), bool)))


@given(st.integers(1, 12), st.integers(0, 10), st.integers(0, 5))
@settings(max_examples=60, deadline=None)
def test_mmu_prefix_rule(n_image, n_text, n_pad):
    ids = [105, SOI] + [110] * n_image + [EOI] + [5] * n_text + [PAD] * n_pad
    eoi = ids.index(EOI)
    lay = layout_from_ids(ids, "mmu", pad_id=PAD, soi_id=SOI, eoi_id=EOI)
    assert lay == mmu_layout(len(ids), eoi)
    q, k = np.meshgrid(np.arange(len(ids)), np.arange(len(ids)), indexing="ij")
    np.testing.assert_array_equal(lay.allowed(), (k <= q) | (k <= eoi))


@given(st.integers(0, 6), st.integers(1, 8), st.integers(0, 8))
@settings(max_examples=60, deadline=None)
def test_mmu_vit_rule(system_len, n_image, n_text):
    length = 1 + system_len + 1 + n_image + 1 + n_text
    s = 1 + system_len + 1
    lay = mmu_vit_layout(length, system_prompt_len=system_len, num_image=n_image)
    q, k = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    want = (k <= q) | ((k >= s) & (k < s + n_image))
    np.testing.assert_array_equal(lay.allowed(), want)
    # the system prompt stays causal among itself: not a prefix-LM
    if system_len >= 2:
        assert not lay.allowed()[1, 2]


@given(t2i_rows(), st.data())
@settings(max_examples=60, deadline=None)
def test_query_slices_and_mask_shapes(ids, data):
    lay = layout_from_ids(ids, "t2i", pad_id=PAD, soi_id=SOI, eoi_id=EOI)
    a = data.draw(st.integers(0, len(ids) - 1))
    b = data.draw(st.integers(a + 1, len(ids)))
    np.testing.assert_array_equal(lay.allowed(a, b), lay.allowed()[a:b])
    mask = attention_mask([lay, lay], a, b)
    full = lay.allowed()[a:b].all()
    assert (mask is None) == bool(full)
    if mask is not None:
        assert mask.shape == (2, 1, b - a, len(ids))
        np.testing.assert_array_equal(np.array(mask[0, 0]), lay.allowed()[a:b])


def test_spans_are_validated():
    import pytest

    with pytest.raises(ValueError):
        Layout(5, pads=((0, 6),))
