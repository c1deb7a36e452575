"""Show-o Turbo's top-k in the MaskGIT sampler, replayed step by step against a float64 NumPy
re-implementation of the Turbo sampling step (`sample_t2i.py`, `denoise`, of SJTU-Deng-Lab/Show-o-Turbo):

    probs = softmax(logits)
    topk_probs, topk_idx = topk(probs, k); topk_probs /= topk_probs.sum()     ← before the draw
    sampled = topk_idx[multinomial(topk_probs)]
    selected_probs = probs[sampled]                                            ← the FULL softmax
    (then Show-o's unchanged re-masking: mask_len, annealed Gumbel noise, strict cut)

Randomness is injected: the categorical draw is Gumbel-max with pre-drawn noise per (position,
code), which picks the same code whatever order the candidates are listed in (MLX keeps the full
codebook width with zeros outside the top k; Turbo's code works in top-k order), and the re-masking
noise comes from pre-drawn uniforms, as in the existing fixture replays."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from showo_mlx.errors import GenerationInputError
from showo_mlx.maskgit import KeyedRandomness, decode_image_tokens, top_k_probs

MASK, OFFSET, K, N, B, STEPS = 200, 10, 64, 48, 2, 4


def gumbel64(u):
    return -np.log(np.maximum(-np.log(np.maximum(u, 1e-20)), 1e-20))


class InjectedDraws:
    """Gumbel-max categorical over pre-drawn noise (T, B, N, K) and pre-drawn re-masking uniforms."""

    def __init__(self, cat_u: np.ndarray, remask_u: np.ndarray):
        self.cat_u, self.remask_u = cat_u, remask_u

    def categorical(self, probs, step):
        g = mx.array(gumbel64(self.cat_u[step].astype(np.float64)).astype(np.float32))
        return mx.argmax(mx.log(probs) + g, axis=-1)

    def uniform(self, shape, step):
        return mx.array(self.remask_u[step])


def make_logits_fn(seed: int):
    """Logits that depend on the window: a fixed table, a bonus for [MASK] positions and a shift by
    how many positions are still unknown, so every step sees different probabilities."""
    table = np.random.default_rng(seed).normal(size=(N, K)) * 2.5

    def np_fn(tokens: np.ndarray) -> np.ndarray:
        unknown = tokens == MASK
        frac = unknown.mean(axis=-1, keepdims=True)[..., None]
        return (table[None] + 0.6 * unknown[..., None] + frac * np.sin(np.arange(K))[None, None]).astype(np.float32)

    return np_fn


def turbo_reference(np_fn, init, steps, top_k, temperature, cat_u, remask_u):
    """Float64 NumPy transcription of Turbo's denoise loop (cosine schedule in float32 as torch)."""
    x = init.copy()
    out = []
    tau = temperature
    for step in range(steps):
        unknown = x == MASK
        known_codes = np.where(unknown, 0, x - OFFSET)
        logits = np_fn(x).astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        g = gumbel64(cat_u[step].astype(np.float64))
        flat_p, flat_g = probs.reshape(-1, K), g.reshape(-1, K)
        if top_k:
            idx = np.argsort(-flat_p, axis=-1, kind="stable")[:, :top_k]  # torch.topk
            tp = np.take_along_axis(flat_p, idx, -1)
            tp = tp / tp.sum(-1, keepdims=True)
            j = np.argmax(np.log(tp) + np.take_along_axis(flat_g, idx, -1), axis=-1)
            sampled = np.take_along_axis(idx, j[:, None], -1)[:, 0].reshape(B, N)
        else:
            sampled = np.argmax(np.log(flat_p) + flat_g, axis=-1).reshape(B, N)
        sampled = np.where(unknown, sampled, known_codes)
        ratio = 1.0 * (step + 1) / steps
        f32 = np.float32
        mask_ratio = f32(math.cos(float(f32(f32(f32(ratio) * f32(math.pi)) * f32(0.5)))))
        sel = np.take_along_axis(probs, sampled[..., None], -1)[..., 0]
        sel = np.where(unknown, sel, float(np.finfo(np.float32).max))
        mask_len = math.floor(f32(N * mask_ratio))
        mask_len = np.maximum(1, np.minimum(unknown.sum(-1) - 1, mask_len))
        tau = tau * (1.0 - ratio)
        conf = np.log(np.maximum(sel, 1e-20)) + tau * gumbel64(remask_u[step].astype(np.float64))
        cut = np.take_along_axis(np.sort(conf, -1), mask_len[:, None], -1)
        masking = conf < cut
        in_top = None if not top_k else (sampled[..., None] == idx.reshape(B, N, top_k)).any(-1)
        out.append({"sampled": sampled, "selected_probs": sel, "mask_len": mask_len, "remask": masking,
                    "topk_ok": None if not top_k else in_top[unknown].all()})  # known codes are kept as they are
        x = np.where(masking, MASK, sampled + OFFSET)
    return out


@pytest.mark.parametrize("top_k", [5, 1, None])
def test_top_k_run_equals_numpy_turbo_step_by_step(top_k):
    rng = np.random.default_rng(12)
    cat_u = rng.random((STEPS, B, N, K)).astype(np.float32)
    remask_u = rng.random((STEPS, B, N)).astype(np.float32)
    init = np.full((B, N), MASK, dtype=np.int64)
    init[1, :6] = OFFSET + np.arange(6)  # a few known positions: kept, never re-masked
    np_fn = make_logits_fn(3)
    ref = turbo_reference(np_fn, init, STEPS, top_k, 1.0, cat_u, remask_u)
    trace = []
    codes = decode_image_tokens(
        lambda t: mx.array(np_fn(np.array(t))), init, steps=STEPS, mask_token_id=MASK, image_token_offset=OFFSET,
        codebook_size=K, temperature=1.0, randomness=InjectedDraws(cat_u, remask_u), trace=trace, top_k=top_k,
    )
    for s, (t, r) in enumerate(zip(trace, ref)):
        msg = f"top_k={top_k} step {s}"
        np.testing.assert_array_equal(t["sampled"], r["sampled"], msg)
        np.testing.assert_array_equal(t["mask_len"], r["mask_len"], msg)
        np.testing.assert_allclose(t["selected_probs"], r["selected_probs"], rtol=2e-6, err_msg=msg)
        np.testing.assert_array_equal(t["remask"], r["remask"], msg)
        if top_k:
            assert r["topk_ok"], msg
    np.testing.assert_array_equal(np.array(codes), ref[-1]["sampled"])
    np.testing.assert_array_equal(np.array(codes)[1, :6], np.arange(6))


def test_top_k_changes_the_draw_but_not_the_confidence_source():
    """With top-k the draws differ from the unfiltered ones on the same noise, and the confidence of
    a code drawn with top-k is its probability under the full softmax, not the renormalised one."""
    rng = np.random.default_rng(5)
    cat_u = rng.random((STEPS, B, N, K)).astype(np.float32)
    remask_u = rng.random((STEPS, B, N)).astype(np.float32)
    init = np.full((B, N), MASK, dtype=np.int64)
    np_fn = make_logits_fn(7)
    runs = {}
    for k in (None, 3):
        trace = []
        decode_image_tokens(lambda t: mx.array(np_fn(np.array(t))), init, steps=STEPS, mask_token_id=MASK,
                            image_token_offset=OFFSET, codebook_size=K, randomness=InjectedDraws(cat_u, remask_u),
                            trace=trace, top_k=k)
        runs[k] = trace
    assert (runs[None][0]["sampled"] != runs[3][0]["sampled"]).any()
    logits = np_fn(init).astype(np.float64)
    full = np.exp(logits - logits.max(-1, keepdims=True))
    full /= full.sum(-1, keepdims=True)
    picked = np.take_along_axis(full, runs[3][0]["sampled"][..., None], -1)[..., 0]
    np.testing.assert_allclose(runs[3][0]["selected_probs"], picked, rtol=2e-6)
    assert (picked < 0.999).all()  # renormalised top-3 probabilities would be larger


def test_top_k_probs_keeps_exactly_k_and_renormalises():
    p = mx.softmax(mx.array(np.random.default_rng(0).normal(size=(3, 7, 50)).astype(np.float32)), axis=-1)
    q = np.array(top_k_probs(p, 4))
    assert ((q > 0).sum(-1) == 4).all()
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-6)
    pn = np.array(p)
    kth = np.sort(pn, -1)[..., -4][..., None]
    assert ((q > 0) == (pn >= kth)).all()
    np.testing.assert_allclose(q[q > 0], (pn / np.where(pn >= kth, pn, 0).sum(-1, keepdims=True))[q > 0], rtol=1e-6)
    assert top_k_probs(p, None) is p and top_k_probs(p, 0) is p and top_k_probs(p, 50) is p


def test_seeded_top_k_run_is_reproducible_and_stays_in_the_top_k():
    np_fn = make_logits_fn(1)
    init = np.full((B, N), MASK, dtype=np.int64)
    runs = []
    for _ in range(2):
        trace = []
        decode_image_tokens(lambda t: mx.array(np_fn(np.array(t))), init, steps=3, mask_token_id=MASK,
                            image_token_offset=OFFSET, codebook_size=K, randomness=KeyedRandomness([4, 9]),
                            trace=trace, top_k=2)
        runs.append(trace)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a["sampled"], b["sampled"])
    first = runs[0][0]
    top2 = np.argsort(-np_fn(first["tokens"]), axis=-1)[..., :2]
    assert (first["sampled"][..., None] == top2).any(-1).all()


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bad_top_k(bad):
    with pytest.raises(GenerationInputError, match="top-k"):
        decode_image_tokens(lambda t: mx.zeros((*t.shape, K)), np.full((1, 4), MASK), steps=2, mask_token_id=MASK,
                            image_token_offset=OFFSET, codebook_size=K, randomness=KeyedRandomness(0), top_k=bad)


# ------------------------------------------------------------------------------------------------
# Through the pipeline, the CLI and `showo bench`
# ------------------------------------------------------------------------------------------------


def test_generate_with_top_k_on_the_cli_records_it(converted, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from showo_mlx.cli import app
    from showo_mlx.metadata import read_record

    from PIL import Image

    from showo_mlx.pipeline import Pipeline

    monkeypatch.chdir(tmp_path)
    # The option's way to the sampler and the metadata is under test here, not MAGVIT's decoder.
    monkeypatch.setattr(Pipeline, "decode_codes", lambda self, codes, shape=None: [Image.new("RGB", (128, 128))] * len(codes))
    r = CliRunner().invoke(app, ["generate", "a red cat", "--steps", "2", "--top-k", "5", "-s", "1", "--model", str(converted)])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert "top-k 5" in r.stderr and "(show-o defaults)" in r.stderr
    record = read_record(tmp_path / "image.png")  # the default output name
    assert record["top_k"] == 5 and record["steps"] == 2
    bad = CliRunner().invoke(app, ["generate", "a red cat", "--top-k", "-3", "--model", str(converted)])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: top-k must be an integer >= 0")


def test_pipeline_top_k_changes_a_seeded_image(pipe):
    init = np.full((1, pipe.cfg.num_vq_tokens), pipe.cfg.mask_token_id)

    def codes(top_k):
        s = pipe.settings("generate", steps=2, top_k=top_k)
        return pipe._decode_window(["a red cat"], init, [3], s)

    a, b, c = codes(0), codes(1), codes(1)
    assert (a != b).any() and (b == c).all()


def test_bench_turbo_and_clip_rows():
    from showo_mlx import bench

    r = bench.run_bench(bench.BenchOptions(tiny=True, steps=1, tokens=3, phases=("t2i", "clip"), turbo=True, warmup=False))
    t = r["t2i"]["turbo"]
    assert t["steps"] == 4 and t["measured_steps"] == 1 and t["top_k"] == 200
    assert t["image_s"] == pytest.approx(t["setup_s"] + 4 * t["step_s"] + r["t2i"]["decode_s"])
    assert t["speedup"] == pytest.approx(r["t2i"]["cached"]["image_s"] / t["image_s"])
    v = r["clip"]
    assert v["prompt_positions"] == 1 + 28 + 1 + 16 + 1 + v["prompt_positions"] - 47 and v["tokens_agree"] == 3
    table = " ".join(bench.format_table(r).split())
    for row in ("Turbo step, N=64, no CFG, top-k 200", "Turbo image, 4 steps + decode, 1 measured, est.",
                "Turbo speed-up vs Show-o's 18-step CFG image", "CLIP prefill", "CLIP per token (3 tokens; recompute at 3)"):
        assert row in table, row
