"""Block plan, blockwise attention and the Metal kernel against the boolean mask of `Layout.allowed`.

The plan and the blockwise (plain MLX) attention run everywhere; the Metal kernel itself is tested in
test_metal_kernel.py (emulated everywhere, run on Apple silicon). Property tests draw the sequence kinds Show-o builds (t2i with any number of left
pads, CFG pairs, mmu prefix-LM, mmu-vit global keys, lm) plus arbitrary Layouts, and query ranges
with a cached prefix.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx.core as mx

from showo_mlx.errors import AttentionBackendError, ShowoError
from showo_mlx.kernels import (
    FULL,
    PARTIAL,
    SKIP,
    blockwise_attention,
    blockwise_attention_with_plan,
    make_block_plan,
    masked_sdpa,
    metal_available,
    omni_attention,
    select_attention_backend,
)
from showo_mlx.kernels import metal_attention
from showo_mlx.layout import Layout, batch_allowed, causal_layout, mmu_layout, mmu_vit_layout, t2i_layout

# -- strategies --------------------------------------------------------------------------------
@st.composite
def t2i_rows(draw, length: int, count: int):
    """`count` t2i rows sharing one soi/eoi (a CFG batch), each with its own left-pad count."""
    text = draw(st.integers(1, length - 2))
    # zero pads, any number, and "all but a few" pads (the unconditional prompt has 126 of 129)
    pad_counts = st.one_of(st.just(0), st.integers(0, text - 1), st.integers(max(0, text - 3), text - 1))
    return [t2i_layout(length, draw(pad_counts), text, length - 1) for _ in range(count)]


@st.composite
def spans(draw, length: int, max_count: int):
    out = []
    for _ in range(draw(st.integers(0, max_count))):
        a = draw(st.integers(0, length))
        out.append((a, draw(st.integers(a, length))))
    return tuple(out)


@st.composite
def any_row(draw, length: int):
    """One row of any kind Show-o uses, or an arbitrary Layout (overlapping spans and all)."""
    kind = draw(st.sampled_from(["t2i", "mmu", "mmu_vit", "lm", "lm_image", "arbitrary"]))
    if kind == "t2i" and length >= 3:
        return draw(t2i_rows(length, 1))[0]
    if kind == "mmu":
        return mmu_layout(length, draw(st.integers(0, length - 1)))
    if kind == "mmu_vit" and length >= 2:
        system = draw(st.integers(0, length - 2))
        return mmu_vit_layout(length, system, draw(st.integers(0, length - 2 - system)))
    if kind == "lm_image":
        return causal_layout(length, draw(spans(length, 2)))
    if kind == "arbitrary":
        prefix = draw(st.one_of(st.just(0), st.integers(0, length)))
        return Layout(length, draw(spans(length, 3)), draw(spans(length, 2)), prefix, draw(spans(length, 2)))
    return causal_layout(length)


@st.composite
def batches(draw, max_length: int):
    """(layouts, q_start, q_end, key_len): a single row, a CFG pair or a mixed batch, with a query
    range that is the whole row, a cached-prefix suffix, one decode step, or anything."""
    length = draw(st.integers(3, max_length))
    shape = draw(st.sampled_from(["single", "cfg", "mixed"]))
    if shape == "cfg":
        layouts = draw(t2i_rows(length, 2))
    else:
        layouts = [draw(any_row(length)) for _ in range(1 if shape == "single" else draw(st.integers(2, 3)))]
    queries = draw(st.sampled_from(["all", "suffix", "decode", "any"]))
    if queries == "all":
        return layouts, 0, length, length
    if queries == "suffix":  # e.g. t2i with the text prefix cached: q_start = soi
        return layouts, draw(st.integers(1, length - 1)), length, length
    if queries == "decode":
        return layouts, length - 1, length, length
    q_start = draw(st.integers(0, length - 1))
    q_end = draw(st.integers(q_start + 1, length))
    return layouts, q_start, q_end, draw(st.integers(q_end, length))


def reference_attention(q, k, v, layouts, q_start, scale):
    """softmax(q·kᵀ·scale restricted to allowed keys)·v in float64 numpy."""
    q, k, v = (np.array(x, dtype=np.float64) for x in (q, k, v))
    mask = batch_allowed(layouts, q_start, q_start + q.shape[2])[:, None, :, : k.shape[2]]
    scores = np.where(mask, q @ k.swapaxes(-1, -2) * scale, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)) @ v


def random_qkv(batch, heads, q_len, k_len, dim, seed=0, dtype=mx.float32):
    keys = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((batch, heads, q_len, dim), key=keys[0]).astype(dtype)
    k = mx.random.normal((batch, heads, k_len, dim), key=keys[1]).astype(dtype)
    v = mx.random.normal((batch, heads, k_len, dim), key=keys[2]).astype(dtype)
    return q, k, v


# -- (a) the plan agrees with the mask, tile by tile -----------------------------------------------
def mask_tiles(mask: np.ndarray, block_q: int, block_k: int) -> np.ndarray:
    """(B, nqb, nkb) SKIP / PARTIAL / FULL read off a (B, Lq, Lk) boolean mask (the ground truth)."""
    B, Lq, Lk = mask.shape
    nqb, nkb = -(-Lq // block_q), -(-Lk // block_k)

    def blocked(fill):  # ragged last blocks padded with a value that does not change the answer
        padded = np.full((B, nqb * block_q, nkb * block_k), fill)
        padded[:, :Lq, :Lk] = mask
        return padded.reshape(B, nqb, block_q, nkb, block_k)

    any_pair = blocked(False).any(axis=(2, 4))
    all_pairs = blocked(True).all(axis=(2, 4))
    return np.where(all_pairs, FULL, np.where(any_pair, PARTIAL, SKIP))


def check_plan(layouts, q_start, q_end, key_len, block_q, block_k):
    plan = make_block_plan(layouts, q_start, q_end, key_len, block_q, block_k)
    mask = batch_allowed(layouts, q_start, q_end)[:, :, :key_len]
    np.testing.assert_array_equal(plan.tiles, mask_tiles(mask, block_q, block_k))
    return plan


@settings(max_examples=200, deadline=None)
@given(batches(48), st.sampled_from([1, 2, 3, 4, 5, 8, 16]), st.sampled_from([1, 2, 3, 4, 7, 8, 32]))
def test_plan_matches_mask(case, block_q, block_k):
    plan = check_plan(*case, block_q, block_k)
    # The visit lists are exactly the non-skipped blocks, in order, inside key_range.
    for b in range(plan.batch):
        for i in range(plan.num_q_blocks):
            visited = [j for j, _ in plan.visits(b, i)]
            assert visited == list(np.flatnonzero(plan.tiles[b, i] != SKIP))
            assert visited, "every query block sees at least its own diagonal"
            assert plan.key_range[b, i].tolist() == [visited[0], visited[-1] + 1]


def test_plan_random_sweep():
    """Many more arbitrary Layouts than hypothesis draws (pads next to prefix and global keys,
    overlapping spans), checked with the vectorised tile reduction."""
    rng = np.random.default_rng(0)

    def random_spans(length, n):
        starts = rng.integers(0, length + 1, n)
        return tuple((int(a), int(rng.integers(a, length + 1))) for a in starts)

    for _ in range(3000):
        length = int(rng.integers(1, 40))
        layouts = [
            Layout(
                length,
                pads=random_spans(length, rng.integers(0, 3)),
                image_spans=random_spans(length, rng.integers(0, 3)),
                prefix_len=int(rng.integers(0, length + 1)) if rng.random() < 0.4 else 0,
                global_keys=random_spans(length, rng.integers(0, 2)),
            )
            for _ in range(int(rng.integers(1, 4)))
        ]
        q_start = int(rng.integers(0, length))
        q_end = int(rng.integers(q_start + 1, length + 1))
        key_len = int(rng.integers(q_end, length + 1))
        check_plan(layouts, q_start, q_end, key_len, int(rng.integers(1, 9)), int(rng.integers(1, 9)))


# -- (b) blockwise attention equals masked attention ---------------------------------------------
@settings(max_examples=200, deadline=None)
@given(batches(40), st.sampled_from([3, 4, 5, 8, 16]), st.sampled_from([3, 4, 8, 16]), st.integers(0, 2**16))
def test_blockwise_matches_reference(case, block_q, block_k, seed):
    layouts, q_start, q_end, key_len = case
    q, k, v = random_qkv(len(layouts), 2, q_end - q_start, key_len, 16, seed)
    plan = make_block_plan(layouts, q_start, q_end, key_len, block_q, block_k)
    out = np.array(blockwise_attention_with_plan(q, k, v, plan, 0.25))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, reference_attention(q, k, v, layouts, q_start, 0.25), atol=1e-5, rtol=0)


@pytest.mark.parametrize("q_start", [0, 129, 194])
@pytest.mark.parametrize("blocks", [(64, 64), (16, 32)])
def test_blockwise_showo_shape(q_start, blocks):
    """D = 64, L = 195 (129 text + soi + 64 image + eoi), a CFG pair: real prompt / unconditional."""
    layouts = [t2i_layout(195, 40, 129, 194), t2i_layout(195, 126, 129, 194)]
    q, k, v = random_qkv(2, 4, 195 - q_start, 195, 64, seed=q_start)
    out = blockwise_attention(q, k, v, layouts, q_start, 0.125, *blocks)
    ref = mx.fast.scaled_dot_product_attention(
        q, k, v, scale=0.125, mask=mx.array(batch_allowed(layouts, q_start)[:, None])
    )
    assert mx.abs(out - ref).max().item() <= 1e-5
    assert np.abs(np.array(out) - reference_attention(q, k, v, layouts, q_start, 0.125)).max() <= 1e-5


def test_plan_skips_text_to_image_tiles():
    """The t2i text prefix never sees image keys, and the all-pad key blocks of the unconditional
    row are skipped by the image queries: the plan is sparse where Show-o's mask is."""
    layouts = [t2i_layout(1155, 5, 129, 1154), t2i_layout(1155, 126, 129, 1154)]
    plan = make_block_plan(layouts, block_q=64, block_k=64)
    assert (plan.tiles[:, :2, 3:] == SKIP).all()  # queries 0..127 vs keys 192..
    assert (plan.tiles[1, 3:, 0] == SKIP).all()  # image queries vs keys 0..63, all pads in row 1
    assert (plan.tiles[:, 3:, 3:] == FULL).all()
    assert plan.density() < 0.9


# -- (c) pad rows are never empty --------------------------------------------------------------
@pytest.mark.parametrize("pads", [0, 1, 7, 8])
def test_pad_rows_finite(pads):
    """Pad queries attend causally to pads; with up to all-but-one text token padded no output is
    NaN, also when a pad row's key blocks are otherwise all skipped or masked."""
    layouts = [t2i_layout(20, pads, 9, 19), t2i_layout(20, 8, 9, 19)]
    q, k, v = random_qkv(2, 2, 20, 20, 16, seed=pads)
    for blocks in [(1, 1), (4, 4), (3, 8)]:
        out = np.array(blockwise_attention(q, k, v, layouts, 0, 0.25, *blocks))
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, reference_attention(q, k, v, layouts, 0, 0.25), atol=1e-5, rtol=0)


# -- backend selection -------------------------------------------------------------------------
def test_select_backend(monkeypatch, tmp_path):
    monkeypatch.setenv("SHOWO_MLX_CACHE", str(tmp_path))  # no doctor report: nothing verified
    monkeypatch.delenv("SHOWO_ATTENTION", raising=False)
    q = mx.zeros((1, 2, 4, 64))
    assert select_attention_backend() == "sdpa"
    assert select_attention_backend(q, q, q, kind="hot") == "sdpa"  # SDPA by default, Metal or not
    for name in ("sdpa", "blockwise", "auto", "SDPA"):
        monkeypatch.setenv("SHOWO_ATTENTION", name)
        assert select_attention_backend(q, q, q) == ("sdpa" if name.lower() in ("auto", "sdpa") else name)
    monkeypatch.setenv("SHOWO_ATTENTION", "cuda")
    with pytest.raises(AttentionBackendError, match="not a backend"):
        select_attention_backend()


@pytest.mark.skipif(metal_available(), reason="checks the error raised where Metal is missing")
def test_forcing_metal_without_metal_is_one_line_error(monkeypatch):
    monkeypatch.setenv("SHOWO_ATTENTION", "metal")
    with pytest.raises(ShowoError) as err:
        select_attention_backend()
    assert "\n" not in str(err.value) and "Metal" in str(err.value)


def test_metal_needs_a_gpu_stream(monkeypatch):
    """Metal present but MLX's default device the CPU: the kernel is not chosen, and forcing it
    says why (it would run on a GPU stream while the model's arrays live on the CPU)."""
    monkeypatch.setattr(metal_attention, "metal_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    reason = metal_attention.metal_unavailable_reason()
    assert reason is not None and "default device is the CPU" in reason
    q = mx.zeros((1, 2, 4, 64))
    monkeypatch.delenv("SHOWO_ATTENTION", raising=False)
    assert select_attention_backend(q, q, q, kind="hot") == "sdpa"
    monkeypatch.setenv("SHOWO_ATTENTION", "metal")
    with pytest.raises(AttentionBackendError, match="default device is the CPU"):
        select_attention_backend(q, q, q)


def test_forced_metal_and_backend_argument_agree_on_unsupported_shapes(monkeypatch):
    """SHOWO_ATTENTION=metal and omni_attention(backend="metal") raise the same one-line error for a
    head dim the kernel does not handle (checked as if Metal were usable here)."""
    import showo_mlx.kernels as kernels

    monkeypatch.setattr(kernels, "metal_unavailable_reason", lambda: None)
    layouts = [t2i_layout(12, 2, 5, 11)]
    q, k, v = random_qkv(1, 2, 12, 12, 16)
    with pytest.raises(AttentionBackendError) as direct:
        omni_attention(q, k, v, layouts, 0, 0.25, backend="metal")
    monkeypatch.setenv("SHOWO_ATTENTION", "metal")
    with pytest.raises(AttentionBackendError) as forced:
        omni_attention(q, k, v, layouts, 0, 0.25)
    for err in (direct, forced):
        msg = str(err.value)
        assert "head dim 16" in msg and "SHOWO_ATTENTION=sdpa" in msg and "\n" not in msg
    assert str(direct.value).split(": ", 1)[1] == str(forced.value).split(": ", 1)[1]


def test_dispatch_agrees(monkeypatch):
    layouts = [t2i_layout(30, 3, 12, 29), mmu_layout(30, 14)]
    q, k, v = random_qkv(2, 2, 18, 30, 16)
    ref = masked_sdpa(q, k, v, layouts, 12, 0.25)
    assert np.abs(np.array(ref) - reference_attention(q, k, v, layouts, 12, 0.25)).max() <= 1e-5
    monkeypatch.setenv("SHOWO_ATTENTION", "blockwise")
    assert mx.abs(omni_attention(q, k, v, layouts, 12, 0.25) - ref).max().item() <= 1e-5
    monkeypatch.delenv("SHOWO_ATTENTION")
    assert mx.abs(omni_attention(q, k, v, layouts, 12, 0.25) - ref).max().item() <= 1e-5


# -- the Metal kernel's host side (runs everywhere; more in test_metal_kernel.py) ---------------
def test_metal_inputs_encode_plan():
    layouts = [t2i_layout(100, 10, 40, 99), t2i_layout(100, 37, 40, 99)]
    plan = make_block_plan(layouts, 40, 100, 100, metal_attention.BLOCK_Q, metal_attention.BLOCK_K)
    tiles, counts, flags, params, scale = (np.array(x) for x in metal_attention.kernel_inputs(plan, 32, 0.125))
    width = params[5]
    n = 2 * plan.num_q_blocks  # buffers are flat and padded to at least 8 elements
    tiles = tiles[: n * width].reshape(2, plan.num_q_blocks, width)
    counts = counts[:n].reshape(2, plan.num_q_blocks)
    for b in range(2):
        for i in range(plan.num_q_blocks):
            entries = tiles[b, i, : counts[b, i]]
            assert [(int(e) >> 1, bool(e & 1)) for e in entries] == plan.visits(b, i)
    assert params.tolist() == [32, 60, 100, 40, 100, width]
    np.testing.assert_array_equal(flags.reshape(2, 100), plan.flags)
    assert scale.tolist() == [0.125]
    config = metal_attention.KernelConfig(mx.float32, 64)
    grid, threadgroup = metal_attention.launch_config(plan, 32, config)
    assert threadgroup == (config.threads, 1, 1) == (128, 1, 1)
    assert grid == (128 * plan.num_q_blocks, 32, 2)


@pytest.mark.skipif(metal_available(), reason="checks the error raised where Metal is missing")
def test_metal_call_without_metal_raises():
    q = mx.zeros((1, 1, 4, 64))
    with pytest.raises(AttentionBackendError, match="Metal"):
        metal_attention.omni_attention_metal(q, q, q, [t2i_layout(4, 1, 2, 3)], 0, 0.125)
