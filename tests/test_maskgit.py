"""MaskGIT loop: schedules and mask_len against traces recorded from the official loop, whole-loop replays of the reference
fixture runs (no transformer: the stored per-step probabilities stand in for the model), seeded and
greedy randomness, properties, and input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from showo_mlx.errors import GenerationInputError
from showo_mlx.maskgit import (
    GenerationCancelled,
    GreedyRandomness,
    KeyedRandomness,
    ReplayRandomness,
    annealed_temperatures,
    cfg_combine,
    decode_image_tokens,
    gumbel_from_uniform,
    mask_len_for_step,
    mask_ratio,
    slice_image_logits,
    tokens_from_codes,
)

REF = Path(__file__).parent / "fixtures" / "reference"


# ------------------------------------------------------------------------------------------------
# Fixture access
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cases():
    return json.loads((REF / "cases.json").read_text())


@pytest.fixture(scope="module")
def run_config():
    return json.loads((REF / "run_config.json").read_text())


@pytest.fixture(scope="module")
def npz():
    with np.load(REF / "maskgit.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def ids(cases, run_config):
    """Special ids and sizes, derived from the fixture files (README: do not hard-code them)."""
    showo = run_config["model"]["showo"]
    offset = showo["llm_vocab_size"] + showo["num_new_special_tokens"]
    codebook = showo["codebook_size"]
    n = showo["num_vq_tokens"]
    text_block = run_config["dataset"]["preprocessing"]["max_seq_length"] + 1
    length = text_block + 1 + n + 1  # text block, soi, image, eoi
    out = dict(
        offset=offset,
        mask=offset + codebook,  # vocab_size - 1
        codebook=codebook,
        n=n,
        length=length,
        image=slice(length - n - 1, length - 1),
    )
    # The same numbers as cases.json states them.
    c = cases["ids"]
    assert (c["image_token_offset"], c["mask_token_id"], c["codebook_size"]) == (offset, out["mask"], codebook)
    assert (c["num_vq_tokens"], c["t2i_sequence_length"]) == (n, length)
    return out


def cumulative_mask_lens(n, steps, unknown, schedule="cosine"):
    """mask_len per step when each step leaves exactly mask_len positions unknown (no ties)."""
    out = []
    for step in range(steps):
        m = mask_len_for_step(step, steps, n, unknown, schedule)
        out.append(m)
        unknown = m
    return out


# ------------------------------------------------------------------------------------------------
# 1. Schedules, mask_len and temperature against `Showo.t2i_generate`'s recorded traces
# ------------------------------------------------------------------------------------------------

SPEC_TRACES = {
    (256, 12, 256): [253, 247, 236, 221, 203, 181, 155, 127, 97, 66, 33, 1],
    (256, 16, 256): [254, 251, 244, 236, 225, 212, 197, 181, 162, 142, 120, 97, 74, 49, 25, 1],
    (256, 18, 256): [255, 252, 247, 240, 232, 221, 209, 196, 181, 164, 146, 127, 108, 87, 66, 44, 22, 1],
    (1024, 50, 1024): [
        1023, 1021, 1019, 1015, 1011, 1005, 999, 991, 983, 973, 963, 952, 939, 926, 912, 897,
        881, 864, 846, 828, 809, 789, 768, 746, 724, 700, 677, 652, 627, 601, 575, 548, 521, 493,
        464, 435, 406, 376, 346, 316, 285, 254, 223, 191, 160, 128, 96, 64, 32, 1,
    ],  # fmt: skip
    (256, 16, 100): list(range(99, 87, -1)) + [74, 49, 25, 1],  # inpainting-like: 100 unknown
}


@pytest.mark.parametrize("key", list(SPEC_TRACES), ids=lambda k: f"N{k[0]}-T{k[1]}-U{k[2]}")
def test_mask_len_traces_match_spec(key):
    n, steps, unknown = key
    assert cumulative_mask_lens(n, steps, unknown) == SPEC_TRACES[key]


def test_cosine_is_float32_at_two_thirds():
    # torch's float32 evaluation gives 0.49999997 at r = 2/3; float64 would give 0.5 → 128 / 512.
    assert mask_ratio("cosine", 2 / 3) == float(np.float32(0.49999997))
    assert mask_len_for_step(7, 12, 256, 256) == 127
    assert mask_len_for_step(11, 18, 256, 256) == 127
    assert mask_len_for_step(7, 12, 1024, 1024) == 511
    assert mask_len_for_step(7, 12, 64, 64) == 31  # the fixture's N = 64 case


def test_other_schedules_values():
    f32 = np.float32
    assert mask_ratio("linear", 0.25) == float(f32(0.75))
    assert mask_ratio("linear", 1.0) == float(f32(1e-6))  # clamped, never 0
    assert mask_ratio("pow2", 0.5) == 0.75
    assert mask_ratio("pow0.5", 0.25) == 0.5
    assert mask_ratio("pow1", 1.0) == float(f32(1e-6))
    assert mask_ratio("sigmoid", 0.5) == pytest.approx(0.5, abs=1e-6)
    assert mask_ratio("sigmoid", 0.0) == pytest.approx(1.0, abs=1e-6)
    assert mask_ratio("sigmoid", 1.0) == float(f32(1e-6))
    assert mask_ratio("cosine", 0.0) == 1.0
    # Every value is a float32 number.
    for name in ("cosine", "linear", "pow3", "pow0.5", "sigmoid"):
        for r in (0.1, 1 / 3, 0.7):
            v = mask_ratio(name, r)
            assert float(np.float32(v)) == v and 0 < v <= 1


def test_mask_len_vectorised_forms_agree():
    unknown = [64, 40, 10, 2, 1, 0]
    scalar = [mask_len_for_step(2, 8, 64, u) for u in unknown]
    assert scalar == [53, 39, 9, 1, 1, 1]  # budget 53 clamped to [1, unknown − 1]
    assert mask_len_for_step(2, 8, 64, np.array(unknown)).tolist() == scalar
    assert mask_len_for_step(2, 8, 64, mx.array(unknown)).tolist() == scalar


def test_temperature_anneals_cumulatively():
    spec_t12 = [.916667, .763889, .572917, .381944, .222801, .111400, .046417, .015472, .003868,
                .000645, .000054, 0]  # fmt: skip  (recorded from Showo.t2i_generate, six decimals)
    taus = annealed_temperatures(1.0, 12)
    assert taus == pytest.approx(spec_t12, abs=5e-7)
    expected = [math.prod(1 - j / 12 for j in range(1, s + 2)) for s in range(12)]
    assert taus == pytest.approx(expected, rel=1e-12)
    assert taus[-1] == 0.0
    t50 = annealed_temperatures(1.0, 50)
    assert t50[:4] == pytest.approx([0.98, 0.9408, 0.884352, 0.813604], rel=1e-5)
    assert max(t50[31:]) < 1e-6 and t50[30] >= 1e-6  # "from step 32 on", counting from 1
    assert annealed_temperatures(2.5, 5) == pytest.approx([2.5 * t for t in annealed_temperatures(1.0, 5)])


def test_fixture_mask_len_and_temperature_for_every_run(cases, npz, ids):
    """All seven reference runs (T = 8 and 12, also those without stored probs)."""
    for run, rc in cases["maskgit"]["runs"].items():
        steps = rc["timesteps"]
        unknown = npz[f"{run}.num_unknown"]
        got = [mask_len_for_step(s, steps, ids["n"], unknown[s], "cosine") for s in range(steps)]
        np.testing.assert_array_equal(np.stack(got), npz[f"{run}.mask_len"], err_msg=run)
        np.testing.assert_allclose(
            annealed_temperatures(rc["temperature"], steps), npz[f"{run}.temperature"], rtol=1e-5, atol=0
        )


# ------------------------------------------------------------------------------------------------
# 2. Whole-loop replays of the reference runs that stored their per-step probabilities
# ------------------------------------------------------------------------------------------------

REPLAY_RUNS = ["nocfg_T8", "cfg_T8", "inpaint_T8", "replay_T12"]


@pytest.mark.parametrize("run", REPLAY_RUNS)
def test_fixture_replay(run, cases, run_config, npz, ids):
    rc = cases["maskgit"]["runs"][run]
    steps = rc["timesteps"]
    assert rc["guidance_scale"] in (0.0, run_config["training"]["guidance_scale"])
    assert cases["maskgit"]["schedule"] == run_config["training"]["mask_schedule"] == "cosine"
    probs = npz[f"{run}.probs"]
    batch = probs.shape[1]
    fed = []

    def image_logits_fn(tokens):
        # The stored softmax stands in for the guided, sliced model logits: softmax(log p) = p.
        fed.append(np.array(tokens))
        return mx.log(mx.array(probs[len(fed) - 1]))

    if rc["temperature"] == 0.0:
        randomness = GreedyRandomness()  # the fixture's deterministic runs: argmax, τ = 0
    else:
        randomness = ReplayRandomness(npz[f"{run}.sampled_raw"], npz[f"{run}.uniform"])
    windows = []
    trace = []
    codes = decode_image_tokens(
        image_logits_fn,
        npz[f"{run}.input_ids"][:, ids["image"]],
        steps=steps,
        mask_token_id=ids["mask"],
        image_token_offset=ids["offset"],
        codebook_size=ids["codebook"],
        schedule=cases["maskgit"]["schedule"],
        temperature=rc["temperature"],
        randomness=randomness,
        callback=lambda step, total, tokens: windows.append(np.array(tokens)),
        trace=trace,
    )

    assert len(trace) == len(fed) == len(windows) == steps
    for s, t in enumerate(trace):
        msg = f"{run} step {s}"
        # The window fed to the model equals the cond rows' image part of the reference input.
        np.testing.assert_array_equal(fed[s], npz[f"{run}.model_inputs"][s, :batch, ids["image"]], msg)
        np.testing.assert_array_equal(t["tokens"], fed[s], msg)
        np.testing.assert_array_equal(t["num_unknown"], npz[f"{run}.num_unknown"][s], msg)
        np.testing.assert_array_equal(t["mask_len"], npz[f"{run}.mask_len"][s], msg)
        assert t["temperature"] == pytest.approx(float(npz[f"{run}.temperature"][s]), rel=1e-5, abs=0)
        np.testing.assert_array_equal(t["sampled_raw"], npz[f"{run}.sampled_raw"][s], msg)
        np.testing.assert_allclose(t["selected_probs"], npz[f"{run}.selected_probs"][s], rtol=2e-6, err_msg=msg)
        np.testing.assert_array_equal(t["remask"], npz[f"{run}.remask"][s], msg)
        np.testing.assert_array_equal(t["remask"].sum(-1), npz[f"{run}.num_remasked"][s], msg)
    # Known positions carry float32 max as their confidence (never re-masked).
    known0 = fed[0] != ids["mask"]
    assert (trace[0]["selected_probs"][known0] == np.finfo(np.float32).max).all()
    # Result = last step's sampled codes; the final window still has the last re-masked position.
    np.testing.assert_array_equal(np.array(codes), npz[f"{run}.result"])
    np.testing.assert_array_equal(windows[-1], npz[f"{run}.final_input_ids"][:, ids["image"]])
    assert (windows[-1] == ids["mask"]).sum() == batch


def test_gumbel_from_uniform_matches_reference(npz):
    got = np.array(gumbel_from_uniform(mx.array(npz["replay_T12.uniform"])))
    np.testing.assert_allclose(got, npz["replay_T12.gumbel"], rtol=1e-5, atol=1e-6)


def test_cfg_and_slice_helpers(ids):
    rng = np.random.default_rng(0)
    vocab = ids["mask"] + 1
    cond = rng.normal(size=(2, ids["length"], vocab)).astype(np.float32)
    unc = rng.normal(size=cond.shape).astype(np.float32)
    s = 1.75
    got = np.array(cfg_combine(mx.array(cond), mx.array(unc), s))
    np.testing.assert_array_equal(got, np.float32(1 + s) * cond - np.float32(s) * unc)
    first = ids["image"].start
    sl = np.array(slice_image_logits(mx.array(got), first, ids["n"], ids["offset"], ids["codebook"]))
    np.testing.assert_array_equal(sl, got[:, ids["image"], ids["offset"] : ids["mask"]])
    assert sl.shape == (2, ids["n"], ids["codebook"])

    codes = np.arange(6).reshape(2, 3)
    unknown = np.array([[True, False, False], [False, False, True]])
    win = np.array(tokens_from_codes(codes, unknown, image_token_offset=ids["offset"], mask_token_id=ids["mask"]))
    np.testing.assert_array_equal(win, [[ids["mask"], ids["offset"] + 1, ids["offset"] + 2],
                                        [ids["offset"] + 3, ids["offset"] + 4, ids["mask"]]])  # fmt: skip


# ------------------------------------------------------------------------------------------------
# 3. Randomness
# ------------------------------------------------------------------------------------------------

MASK, OFFSET, K = 100, 10, 16  # a toy vocabulary: codes at [10, 26), [MASK] = 100


def toy_logits_fn(n, seed=0):
    """Logits that depend only on each row's own window, so rows are independent."""
    table = mx.array(np.random.default_rng(seed).normal(size=(n, K)).astype(np.float32) * 2)

    def fn(tokens):
        is_mask = (tokens == MASK).astype(mx.float32)[..., None]
        return table[None] + 0.5 * is_mask

    return fn


def toy_decode(randomness, *, batch=2, n=32, steps=6, temperature=1.0, init=None, **kw):
    init = np.full((batch, n), MASK) if init is None else init
    out = decode_image_tokens(
        toy_logits_fn(n), init, steps=steps, mask_token_id=MASK, image_token_offset=OFFSET,
        codebook_size=K, temperature=temperature, randomness=randomness, **kw,
    )  # fmt: skip
    return np.array(out)


def test_keyed_randomness_is_reproducible_and_seed_dependent():
    a = toy_decode(KeyedRandomness(7))
    b = toy_decode(KeyedRandomness(7))
    c = toy_decode(KeyedRandomness(8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert a.dtype == np.int32 and a.shape == (2, 32)
    # A reused object gives the same draws again (keys depend on the step only).
    r = KeyedRandomness(7)
    np.testing.assert_array_equal(toy_decode(r), toy_decode(r))


def test_keyed_per_row_seeds_match_single_runs():
    both = toy_decode(KeyedRandomness([3, 5]))
    alone = toy_decode(KeyedRandomness([5]), batch=1)
    np.testing.assert_array_equal(both[1], alone[0])
    assert (both[0] != both[1]).any()
    with pytest.raises(GenerationInputError):
        toy_decode(KeyedRandomness([1, 2, 3]))


def test_keyed_categorical_respects_zero_probabilities():
    probs = mx.array(np.tile(np.array([0, 0.3, 0, 0.7], np.float32), (2, 50, 1)))
    draws = np.array(KeyedRandomness(0).categorical(probs, 0))
    assert set(np.unique(draws)) == {1, 3}
    u = np.array(KeyedRandomness(0).uniform((2, 50), 0))
    assert u.dtype == np.float32 and (u >= 0).all() and (u < 1).all()


def test_greedy_is_deterministic_whatever_the_temperature():
    hot = toy_decode(GreedyRandomness(), temperature=3.0)
    cold = toy_decode(GreedyRandomness(), temperature=0.0)
    np.testing.assert_array_equal(hot, cold)
    np.testing.assert_array_equal(hot, toy_decode(GreedyRandomness(), temperature=1.0))
    assert (hot == hot[0]).all()  # identical rows with row-independent logits


def test_argmax_takes_first_index_on_ties():
    probs = mx.array([[[0.25, 0.375, 0.375, 0.0]]], dtype=mx.float32)
    assert GreedyRandomness().categorical(probs, 0).tolist() == [[1]]


def test_callback_cancel_and_interrupt():
    seen = []

    def stop_at_two(step, steps, tokens):
        seen.append((step, steps, tuple(tokens.shape)))
        return step < 2

    with pytest.raises(GenerationCancelled) as info:
        toy_decode(GreedyRandomness(), callback=stop_at_two)
    assert seen == [(0, 6, (2, 32)), (1, 6, (2, 32)), (2, 6, (2, 32))]
    assert info.value.step == 2 and info.value.codes.shape == (2, 32)

    def ctrl_c(step, steps, tokens):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        toy_decode(GreedyRandomness(), callback=ctrl_c)


# ------------------------------------------------------------------------------------------------
# 4. Properties
# ------------------------------------------------------------------------------------------------


@st.composite
def windows(draw):
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(2, 24))
    unknown = np.array(draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=batch, max_size=batch)))
    unknown[np.arange(batch), draw(st.integers(0, n - 1))] = True  # at least one unknown per row
    codes = np.array(draw(st.lists(st.integers(0, K - 1), min_size=batch * n, max_size=batch * n)))
    return codes.reshape(batch, n), unknown


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    window=windows(),
    steps=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    temperature=st.floats(0.0, 1.0),
    greedy=st.booleans(),
    schedule=st.sampled_from(["cosine", "linear", "pow2", "sigmoid"]),
)
def test_known_positions_are_kept(window, steps, seed, temperature, greedy, schedule):
    codes, unknown = window
    init = np.array(tokens_from_codes(codes, unknown, image_token_offset=OFFSET, mask_token_id=MASK))
    rng = np.random.default_rng(seed)

    def fn(tokens):  # continuous random logits: no exact ties
        return mx.array(rng.normal(size=(*tokens.shape, K)).astype(np.float32) * 3)

    known = ~unknown
    windows_seen = []
    out = decode_image_tokens(
        fn, init, steps=steps, mask_token_id=MASK, image_token_offset=OFFSET, codebook_size=K,
        schedule=schedule, temperature=temperature,
        randomness=GreedyRandomness() if greedy else KeyedRandomness(seed),
        callback=lambda s, t, tok: windows_seen.append(np.array(tok)),
    )  # fmt: skip
    out = np.array(out)
    assert out.shape == codes.shape
    assert ((out >= 0) & (out < K)).all()
    np.testing.assert_array_equal(out[known], codes[known])
    for w in windows_seen:  # a known token is never re-masked or changed in the window
        np.testing.assert_array_equal(w[known], codes[known] + OFFSET)
        assert ((w == MASK) | ((w >= OFFSET) & (w < OFFSET + K))).all()


SCHEDULE_NAMES = ["cosine", "linear", "pow2", "pow0.5", "pow3", "sigmoid"]


@settings(max_examples=60, deadline=None)
@given(
    schedule=st.sampled_from(SCHEDULE_NAMES),
    steps=st.integers(1, 64),
    n=st.sampled_from([2, 3, 16, 64, 256, 1024, 4096]),
)
def test_mask_len_non_increasing(schedule, steps, n):
    budget = [mask_len_for_step(s, steps, n, n, schedule) for s in range(steps)]
    trace = cumulative_mask_lens(n, steps, n, schedule)
    for seq in (budget, trace):
        assert all(a >= b for a, b in zip(seq, seq[1:]))
        assert all(1 <= m <= max(1, n - 1) for m in seq)
    assert trace[-1] == 1  # the schedule ends at mask ratio ~0: one position left masked


def test_mask_len_non_increasing_exhaustive():
    """Every schedule, every T in 1..64, the real sizes N = 256 and 1024."""
    for schedule in SCHEDULE_NAMES:
        for steps in range(1, 65):
            for n in (256, 1024):
                seq = [mask_len_for_step(s, steps, n, n, schedule) for s in range(steps)]
                assert all(a >= b for a, b in zip(seq, seq[1:])), (schedule, steps, n)


def test_loop_remasks_mask_len_positions():
    trace = []
    toy_decode(KeyedRandomness(1), steps=7, trace=trace)
    for t in trace:
        np.testing.assert_array_equal(t["remask"].sum(-1), t["mask_len"])
    counts = [t["num_unknown"].tolist() for t in trace]
    assert counts[0] == [32, 32]
    assert all(c == t["mask_len"].tolist() for c, t in zip(counts[1:], trace))


# ------------------------------------------------------------------------------------------------
# 5. Bad inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -3, 1.5, True, None])
def test_bad_steps(steps):
    with pytest.raises(GenerationInputError, match="steps"):
        toy_decode(GreedyRandomness(), steps=steps)
    with pytest.raises(GenerationInputError):
        mask_len_for_step(0, steps, 64, 64)


@pytest.mark.parametrize("schedule", ["cos", "Cosine", "", "powx", "pownan", "sigmoid2", None])
def test_bad_schedule(schedule):
    with pytest.raises(GenerationInputError) as info:
        mask_ratio(schedule, 0.5)
    msg = str(info.value)
    assert "\n" not in msg and all(name in msg for name in ("cosine", "linear", "sigmoid", "pow"))
    with pytest.raises(GenerationInputError):
        toy_decode(GreedyRandomness(), schedule=schedule)


def test_bad_window_and_temperature():
    with pytest.raises(GenerationInputError, match="init_tokens"):
        toy_decode(GreedyRandomness(), init=np.full((2, 8), OFFSET + K))  # past the codebook
    with pytest.raises(GenerationInputError, match="init_tokens"):
        toy_decode(GreedyRandomness(), init=np.full((8,), MASK))  # not (B, N)
    with pytest.raises(GenerationInputError, match="temperature"):
        toy_decode(GreedyRandomness(), temperature=-1.0)
    with pytest.raises(GenerationInputError, match="temperature"):
        toy_decode(GreedyRandomness(), temperature=float("nan"))
