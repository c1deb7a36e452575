"""Training objective against the reference fixture: losses, prompt builders, masking, schedule."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_npz

from showo_mlx.attention import attention_mask
from showo_mlx.layout import batch_allowed, layout_from_ids
from showo_mlx.train.losses import TaskRows, loss_targets, reference_losses, task_sums
from showo_mlx.train.masking import expected_mask_fraction, mask_image_tokens


@pytest.fixture(scope="module")
def tiny(converted):
    from showo_mlx.loading import load_transformer, read_model_config
    from showo_mlx.config import ShowoConfig
    from showo_mlx.prompting import Prompting

    config = read_model_config(converted)
    model = load_transformer(converted, config)
    return model, Prompting(converted, ShowoConfig.from_dict(config["showo"]))


def _train_layouts(ids, prompting):
    sp = prompting.ids
    kinds = ["t2i", "t2i", "lm", "mmu"]  # the recorded batch: t2i 2 | lm 1 | mmu 1
    return [layout_from_ids(r, k, pad_id=sp.pad, soi_id=sp.soi, eoi_id=sp.eoi) for r, k in zip(ids, kinds)]


def test_three_losses_match_the_reference(tiny):
    model, prompting = tiny
    t = load_npz("transformer")
    ids, labels = t["train.input_ids"], t["train.labels"]
    layouts = _train_layouts(ids, prompting)
    # Our Layouts reproduce the concatenated reference masks exactly.
    np.testing.assert_array_equal(batch_allowed(layouts), t["train.allowed"])
    rows = TaskRows(t2i=2, lm=1, mmu=1)
    logits = model(mx.array(ids), mask=attention_mask(layouts))
    got = reference_losses(logits, labels, rows, max_seq_length=128)
    want = t["train.losses"]
    np.testing.assert_allclose([float(got[k]) for k in ("t2i", "lm", "mmu")], want, atol=1e-5, rtol=0)

    # The trainer's gathered form (head only at labelled positions) is the same objective.
    targets = loss_targets(labels, rows, 128)
    h = model.hidden_states(mx.array(ids), mask=attention_mask(layouts))
    sums = np.array(task_sums(h, model.lm_head, targets))
    np.testing.assert_allclose(sums / targets.counts, want, atol=1e-5, rtol=0)


def test_t2i_loss_is_unshifted_and_counts_soi_eoi():
    t = load_npz("transformer")
    rows = TaskRows(2, 1, 1)
    targets = loss_targets(t["train.labels"], rows, 128)
    labels = t["train.labels"]
    t2i = targets.tasks == 0
    pos = targets.positions[t2i] % labels.shape[1]
    # position 129 (soi) and the last position (eoi) carry labels and are predicted in place
    assert 129 in pos and labels.shape[1] - 1 in pos
    np.testing.assert_array_equal(targets.targets[t2i], labels[: 2, 129:][labels[:2, 129:] != -100])
    # lm/mmu: hidden state p predicts label p + 1
    lm = targets.tasks == 1
    flat = labels.reshape(-1)
    np.testing.assert_array_equal(targets.targets[lm], flat[targets.positions[lm] + 1])
    assert targets.counts.sum() == targets.size


def test_training_prompts_reproduce_the_fixture(tiny, cases):
    _, prompting = tiny
    p = load_npz("prompting")
    prompts = [c["text"] for c in cases["prompts"]]
    t2i = prompting.t2i(prompts, p["t2i_train.image_input"], p["t2i_train.image_labels"], cond_dropout_prob=0.0)
    np.testing.assert_array_equal(t2i.ids, p["t2i_train.input_ids"])
    np.testing.assert_array_equal(t2i.labels, p["t2i_train.labels"])
    image = np.repeat(p["mmu.image_tokens"], len(prompts), axis=0)
    mmu = prompting.mmu(image, prompts)
    np.testing.assert_array_equal(mmu.ids, p["mmu_train.input_ids"])
    np.testing.assert_array_equal(mmu.labels, p["mmu_train.labels"])
    np.testing.assert_array_equal(batch_allowed(mmu.layouts), p["mmu_train.allowed"])
    lm = prompting.lm(prompts, 195)
    np.testing.assert_array_equal(lm.ids, p["lm.input_ids"])
    np.testing.assert_array_equal(lm.labels, p["lm.labels"])
    np.testing.assert_array_equal(batch_allowed(lm.layouts), p["lm.allowed"])


def test_condition_dropout_is_the_empty_prompt(tiny):
    _, prompting = tiny
    image = np.full((1, 64), prompting.ids.mask)
    labels = np.full((1, 64), -100)
    dropped = prompting.t2i(["a red cat"], image, labels, cond_dropout_prob=1.0, rng=np.random.default_rng(0))
    empty = prompting.t2i([""], image, labels)
    np.testing.assert_array_equal(dropped.ids, empty.ids)
    sp = prompting.ids
    np.testing.assert_array_equal(dropped.ids[0, 126:129], [sp.t2i, sp.bos, sp.eos])


# -- masking (`training/utils.py`, mask_or_random_replace_tokens) ----------------------------------
def _masking_by_hand(ids, mask_id, seed):
    """Independent re-statement of the reference: t, then noise; argsort(noise) < k."""
    g = np.random.default_rng(seed)
    b, n = ids.shape
    t = g.random(b, dtype=np.float32)
    noise = g.random((b, n), dtype=np.float32)
    inputs, labels = ids.copy(), np.full_like(ids, -100)
    for r in range(b):
        ratio = max(math.cos(float(t[r]) * math.pi / 2), 0.0)
        k = max(1, int(np.round(np.float32(n) * np.float32(ratio))))
        order = sorted(range(n), key=lambda j: noise[r, j])  # order[i] = index of i-th smallest
        for pos in range(n):
            if order[pos] < k:  # the reference's `argsort(noise) < k`
                inputs[r, pos] = mask_id
                labels[r, pos] = ids[r, pos]
    return inputs, labels


def test_masking_exact_for_a_fixed_key():
    ids = np.random.default_rng(1).integers(509, 573, (4, 64))
    got_in, got_lab, mask = mask_image_tokens(ids, 573, np.random.default_rng(1234))
    want_in, want_lab = _masking_by_hand(ids, 573, 1234)
    np.testing.assert_array_equal(got_in, want_in)
    np.testing.assert_array_equal(got_lab, want_lab)
    assert (mask.sum(1) >= 1).all()
    # an int seed is the same as a Generator with that seed
    np.testing.assert_array_equal(mask_image_tokens(ids, 573, 1234)[0], got_in)


def test_masking_follows_the_cosine_schedule_statistically():
    n, draws = 64, 20000
    ids = np.full((draws, n), 600)
    _, _, mask = mask_image_tokens(ids, 573, np.random.default_rng(7))
    frac = mask.mean()
    expected = expected_mask_fraction(n)
    assert abs(expected - 2 / math.pi) < 0.01  # rounding and the k >= 1 clamp barely matter
    # 20000 images: standard error of the mean ≈ 0.3/sqrt(20000) ≈ 0.002
    assert abs(frac - expected) < 0.01, (frac, expected)
    # the distribution of k follows cos(t·π/2) with t uniform: P(k/N <= 0.5) = P(t >= 2/3) = 1/3
    below_half = (mask.sum(1) / n <= 0.5).mean()
    assert abs(below_half - 1 / 3) < 0.02
    # min_masking_rate clips from below
    _, _, m2 = mask_image_tokens(ids[:2000], 573, np.random.default_rng(8), min_masking_rate=0.5)
    assert (m2.sum(1) >= 32).all()


# -- optimizer schedule --------------------------------------------------------------------------
def test_lr_schedule_is_the_reference_cosine_with_warmup():
    from showo_mlx.train.trainer import lr_schedule

    lr, warm, total = 1e-4, 10, 50
    f = lr_schedule(lr, warm, total)
    for s in [0, 1, 5, 9, 10, 11, 30, 49, 50, 60]:
        if s < warm:
            want = lr * s / warm
        else:
            want = lr * max(0.0, 0.5 * (1 + math.cos(math.pi * min(s - warm, total - warm) / (total - warm))))
        assert abs(float(f(mx.array(s))) - want) < 1e-6 * lr, s


def test_weight_decay_groups_mirror_the_reference():
    """Only names containing "bias" escape weight decay (LayerNorm weights and embeddings decay)."""
    from showo_mlx.train.config import TrainConfig
    from showo_mlx.train.trainer import build_optimizer

    opt = build_optimizer(TrainConfig(lr=0.1, warmup_steps=0, max_steps=10, weight_decay=0.5))
    params = {"embed_tokens": {"weight": mx.ones((2,))}, "ln": {"weight": mx.ones((2,)), "bias": mx.ones((2,))}}
    zero = {"embed_tokens": {"weight": mx.zeros((2,))}, "ln": {"weight": mx.zeros((2,)), "bias": mx.zeros((2,))}}
    new = opt.apply_gradients(zero, params)
    assert float(new["embed_tokens"]["weight"][0]) == pytest.approx(1 - 0.1 * 0.5)
    assert float(new["ln"]["weight"][0]) == pytest.approx(1 - 0.1 * 0.5)
    assert float(new["ln"]["bias"][0]) == 1.0


# -- LLaVA conversations (`llava/llava_data_vq_unified.py`) -----------------------------------------
def test_llava_conversation_rendering_and_targets(tiny):
    from showo_mlx.train.conversation import conversation_tokens, render

    _, prompting = tiny
    conv = [
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Which color?"},
        {"from": "gpt", "value": "Red."},
    ]
    text = render(conv)
    assert text == "USER: What is this? ASSISTANT: A cat.<|endoftext|>USER: Which color? ASSISTANT: Red.<|endoftext|>"
    ids, labels = conversation_tokens(prompting.encode, conv, 128, prompting.ids.pad)
    n = len(prompting.encode(text))
    np.testing.assert_array_equal(ids[:n], prompting.encode(text))
    assert (ids[n:] == prompting.ids.pad).all() and (labels[n:] == -100).all()
    trained = labels[labels != -100]
    eos = prompting.ids.eos
    # the answers (with their leading space) and each round's <|endoftext|> are trained on
    want = prompting.encode(" A cat.") + [eos] + prompting.encode(" Red.") + [eos]
    np.testing.assert_array_equal(trained, want)
    # a conversation whose turns do not alternate is blanked
    _, bad = conversation_tokens(prompting.encode, conv[:1] + conv[:1], 64, prompting.ids.pad)
    assert (bad == -100).all()
