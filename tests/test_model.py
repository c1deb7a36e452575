"""The unified transformer against the official logits, and its caches against full recomputes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from conftest import load_npz
from showo_mlx.attention import attention_mask
from showo_mlx.decoding import generate_tokens
from showo_mlx.layout import Layout, mmu_layout
from showo_mlx.loading import load_transformer
from showo_mlx.model import PrefixCache

T = load_npz("transformer")
MMU = load_npz("mmu")


def forward(model, name):
    return np.array(model(mx.array(T[f"{name}.input_ids"]), mask=mx.array(T[f"{name}.allowed"][:, None])))


@pytest.mark.parametrize("name", ["t2i", "mmu", "lm"])
def test_float32_logits_match_reference(fx_model, name):
    err = np.abs(forward(fx_model, name) - T[f"{name}.logits"]).max()
    assert err <= 1e-4, f"{name}: max abs error {err}"


def test_masks_from_layouts_give_the_same_logits(fx_model, prompting):
    ids = T["t2i.input_ids"]
    mask = attention_mask(prompting.t2i_layouts(ids))
    out = np.array(fx_model(mx.array(ids), mask=mask))
    assert np.abs(out - T["t2i.logits"]).max() <= 1e-4


def test_layer_activations_match_reference(fx_model):
    collected = []
    fx_model.hidden_states(mx.array(T["t2i.input_ids"]), mask=mx.array(T["t2i.allowed"][:, None]), collect=collected)
    want = T["t2i.layer_outputs"]
    assert len(collected) == want.shape[0]
    for i, (got, ref) in enumerate(zip(collected, want)):
        assert np.abs(np.array(got) - ref).max() <= 1e-4, f"activation {i}"


def test_kv_cache_token_by_token_equals_full_recompute(fx_model):
    ids = T["mmu.input_ids"]
    n = ids.shape[1]
    layout = Layout(n, prefix_len=67)  # mmu: [mmu, soi, 64 image, eoi] bidirectional
    np.testing.assert_array_equal(layout.allowed(), T["mmu.allowed"][0])
    full = np.array(fx_model(mx.array(ids), mask=attention_mask([layout])))
    split = 80
    cache = [KVCache() for _ in fx_model.layers]
    first = fx_model(mx.array(ids[:, :split]), mask=attention_mask([layout], 0, split, k_end=split), cache=cache)
    steps = [np.array(first)]
    for pos in range(split, n):
        steps.append(np.array(fx_model(mx.array(ids[:, pos : pos + 1]), cache=cache)))
    cached = np.concatenate(steps, axis=1)
    assert np.abs(cached - full).max() <= 1e-5


def test_prefix_cache_equals_full_recompute(fx_model, prompting):
    ids = T["t2i.input_ids"]  # CFG batch: two prompts (one padded, one truncated) + two uncond rows
    layouts = prompting.t2i_layouts(ids)
    full = np.array(fx_model(mx.array(ids), mask=attention_mask(layouts)))
    p = prompting.max_text_len
    cache = fx_model.prefix_cache(mx.array(ids[:, :p]), attention_mask(layouts, 0, p, k_end=p))
    tail = fx_model(mx.array(ids[:, p:]), mask=attention_mask(layouts, p), cache=cache)
    assert np.abs(np.array(tail) - full[:, p:]).max() <= 1e-5
    # caches of row groups can be stacked and repeated (cond rows + one shared uncond prefix)
    uncond = fx_model.prefix_cache(mx.array(ids[2:3, :p]), attention_mask(layouts[2:3], 0, p, k_end=p))
    stacked = PrefixCache.concat_batch([[c for c in fx_model.prefix_cache(mx.array(ids[:2, :p]), attention_mask(layouts[:2], 0, p, k_end=p))],
                                        [c.repeat(2) for c in uncond]])
    again = fx_model(mx.array(ids[:, p:]), mask=attention_mask(layouts, p), cache=stacked)
    assert np.abs(np.array(again) - full[:, p:]).max() <= 1e-5


def test_head_slice_equals_sliced_logits(fx_model, prompting):
    ids = mx.array(T["t2i.input_ids"])
    h = fx_model.hidden_states(ids, mask=mx.array(T["t2i.allowed"][:, None]))
    a, b = prompting.ids.image_offset, prompting.ids.image_offset + fx_model.config.codebook_size
    full = np.array(fx_model.lm_head(h))[..., a:b]
    assert np.abs(np.array(fx_model.head_slice(h, a, b)) - full).max() <= 1e-5


def test_greedy_mmu_decoding_reproduces_reference(fx_model, cases):
    for i, run in enumerate(cases["mmu_generate"]):
        ids = MMU[f"q{i}.input_ids"]
        layout = mmu_layout(ids.shape[1], eoi=int(np.flatnonzero(ids[0] == 501)[0]))
        tokens = list(generate_tokens(fx_model, mx.array(ids), mask=attention_mask([layout]), max_tokens=20, stop_ids=[460]))
        assert tokens == run["generated"] == MMU[f"q{i}.generated"].tolist()


# Measured 2026-11-26 (Linux CPU, mlx 0.32.4), t2i CFG batch (logit std 1.58, max |logit| 6.8):
# float16 max abs error 0.0089 (1.3e-3 of max |logit|), bfloat16 0.067 (9.8e-3); mmu and lm alike.
# The ratio (≈ 7.5) follows the unit round-offs (2^-11 vs 2^-8). Bounds leave ~3× headroom.
@pytest.mark.parametrize("dtype,bound", [("float16", 0.03), ("bfloat16", 0.2)])
def test_half_precision_error_is_bounded(converted, dtype, bound):
    model = load_transformer(converted, dtype=dtype)
    out = np.array(model(mx.array(T["t2i.input_ids"]), mask=mx.array(T["t2i.allowed"][:, None])).astype(mx.float32))
    err = np.abs(out - T["t2i.logits"]).max()
    assert np.isfinite(out).all()
    assert err <= bound, f"{dtype}: {err}"


def test_blockwise_backend_through_the_model(fx_model, prompting, monkeypatch):
    # The plan-following attention (the Metal kernel's CPU twin) gives the reference logits too,
    # for a full CFG batch and for prefix-cached image steps.
    monkeypatch.setenv("SHOWO_ATTENTION", "blockwise")
    ids = T["t2i.input_ids"]
    layouts = prompting.t2i_layouts(ids)
    out = np.array(fx_model(mx.array(ids), mask=attention_mask(layouts)))
    assert np.abs(out - T["t2i.logits"]).max() <= 1e-4
    p = prompting.max_text_len
    cache = fx_model.prefix_cache(mx.array(ids[:, :p]), attention_mask(layouts, 0, p, k_end=p))
    tail = np.array(fx_model(mx.array(ids[:, p:]), mask=attention_mask(layouts, p), cache=cache))
    assert np.abs(tail - T["t2i.logits"][:, p:]).max() <= 1e-4
