"""The pipeline end to end through the real (tiny, float32) transformer and MAGVIT-v2.

* The recorded MaskGIT runs of the official `t2i_generate` (maskgit.npz) reproduced code for code,
  with the prefix-cached steps and with the reference's full recompute; the stochastic run replayed
  from its recorded draws.
* Prefix-cached image logits equal full-recompute logits (and the reference's logits).
* `generate` seeding, `inpaint` against the recorded inpainting run, `extrapolate` canvas growth and
  the reference window, `ask` against the recorded greedy MMU decoding with KV-cache logits checked
  step by step, and the typed errors for bad input.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from conftest import REF, load_npz
from showo_mlx.decoding import SamplingOptions
from showo_mlx.errors import GenerationInputError, ImageInputError
from showo_mlx.layout import Layout
from showo_mlx.attention import attention_mask
from showo_mlx.maskgit import GreedyRandomness, ReplayRandomness, cfg_combine, decode_image_tokens
from showo_mlx.pipeline import AnswerStats, extension_windows, grow_canvas
from showo_mlx.prompting import Prompt
from showo_mlx.t2i import CachedImageLogits, RecomputeImageLogits

MG = load_npz("maskgit")
MMU = load_npz("mmu")
MAGVIT = load_npz("magvit")
PRE = load_npz("preprocess")
TR = load_npz("transformer")
RUN_CONFIG = json.loads((REF / "run_config.json").read_text())
IMAGES = REF / "images"
DETERMINISTIC_RUNS = ["nocfg_T8", "nocfg_T12", "cfg_T8", "cfg_T12", "inpaint_T8", "inpaint_T12"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def geom(cases):
    """Sizes derived from the fixture's own description (never hard-coded)."""
    ids = cases["ids"]
    length, n = ids["t2i_sequence_length"], ids["num_vq_tokens"]
    return {
        "n": n,
        "grid": tuple(ids["image_grid"]),
        "image": slice(length - n - 1, length - 1),
        "offset": ids["image_token_offset"],
        "mask": ids["mask_token_id"],
        "codebook": ids["codebook_size"],
    }


@pytest.fixture(scope="module")
def maskgit_prompts(cases):
    return [cases["prompts"][i]["text"] for i in cases["maskgit"]["prompt_indices"]]


def run_guidance(run: str) -> float:
    return 0.0 if run.startswith("nocfg") else float(RUN_CONFIG["training"]["guidance_scale"])


def decode(pipe, logits_fn, init, steps, *, temperature=0.0, randomness=None):
    """decode_image_tokens with a trace; also returns the final (re-masked) window tokens."""
    trace, last = [], {}

    def keep(step, total, tokens):
        last["tokens"] = np.array(tokens)

    codes = decode_image_tokens(
        logits_fn,
        init,
        steps=steps,
        mask_token_id=pipe.cfg.mask_token_id,
        image_token_offset=pipe.prompting.ids.image_offset,
        codebook_size=pipe.cfg.codebook_size,
        schedule=RUN_CONFIG["training"]["mask_schedule"],
        temperature=temperature,
        randomness=randomness or GreedyRandomness(),
        callback=keep,
        trace=trace,
    )
    return np.array(codes), trace, last["tokens"]


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and len(msg.splitlines()) == 1, msg
    return msg


# ------------------------------------------------------------------------------------------------
# MaskGIT runs of the reference, through the real transformer
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", [CachedImageLogits, RecomputeImageLogits], ids=["cached", "recompute"])
@pytest.mark.parametrize("run", DETERMINISTIC_RUNS)
def test_reference_maskgit_runs_reproduced(run, impl, pipe, prompting, cases, geom, maskgit_prompts):
    meta = cases["maskgit"]["runs"][run]
    guidance = run_guidance(run)
    assert guidance == meta["guidance_scale"] and meta["temperature"] == 0.0
    ids = MG[f"{run}.input_ids"]
    init = ids[:, geom["image"]]
    if run.startswith("inpaint"):
        np.testing.assert_array_equal(init, MG["inpaint.image_tokens"])
    else:
        assert (init == geom["mask"]).all()

    # The same sequence built by our prompt builder from the prompt texts.
    built = prompting.t2i_gen(maskgit_prompts, init)
    np.testing.assert_array_equal(built.ids, ids)
    if guidance > 0:
        np.testing.assert_array_equal(prompting.uncond(init).ids, MG[f"{run}.uncond_input_ids"])
    cond = Prompt(ids, prompting.t2i_layouts(ids))
    assert cond.layouts == built.layouts

    fn = impl(pipe.model, prompting, cond, guidance)
    codes, trace, final = decode(pipe, fn, init, meta["timesteps"])

    np.testing.assert_array_equal(codes, MG[f"{run}.result"])
    b = len(ids)
    np.testing.assert_array_equal(np.stack([t["tokens"] for t in trace]), MG[f"{run}.model_inputs"][:, :b, geom["image"]])
    np.testing.assert_array_equal(np.stack([t["mask_len"] for t in trace]), MG[f"{run}.mask_len"])
    np.testing.assert_array_equal(np.stack([t["num_unknown"] for t in trace]), MG[f"{run}.num_unknown"])
    remask = np.stack([t["remask"] for t in trace])
    np.testing.assert_array_equal(remask, MG[f"{run}.remask"])
    np.testing.assert_array_equal(remask.sum(-1), MG[f"{run}.num_remasked"])
    np.testing.assert_array_equal(np.stack([t["sampled_raw"] for t in trace]), MG[f"{run}.sampled_raw"])
    np.testing.assert_allclose(np.stack([t["selected_probs"] for t in trace]), MG[f"{run}.selected_probs"], rtol=0, atol=1e-5)
    # The final window still holds one [MASK] per row (the last step re-masks mask_len = 1 token).
    np.testing.assert_array_equal(final, MG[f"{run}.final_input_ids"][:, geom["image"]])
    assert ((final == geom["mask"]).sum(-1) == 1).all()


def test_reference_replay_run(pipe, prompting, cases):
    run = "replay_T12"
    meta = cases["maskgit"]["runs"][run]
    ids = MG[f"{run}.input_ids"]
    image = slice(ids.shape[1] - cases["ids"]["num_vq_tokens"] - 1, ids.shape[1] - 1)
    fn = CachedImageLogits(pipe.model, prompting, Prompt(ids, prompting.t2i_layouts(ids)), run_guidance(run))
    replay = ReplayRandomness(MG[f"{run}.sampled_raw"], MG[f"{run}.uniform"])
    codes, trace, final = decode(pipe, fn, ids[:, image], meta["timesteps"], temperature=meta["temperature"], randomness=replay)
    np.testing.assert_array_equal(codes, MG[f"{run}.result"])
    np.testing.assert_array_equal(np.stack([t["remask"] for t in trace]), MG[f"{run}.remask"])
    np.testing.assert_array_equal(np.stack([t["mask_len"] for t in trace]), MG[f"{run}.mask_len"])
    np.testing.assert_allclose([t["temperature"] for t in trace], MG[f"{run}.temperature"], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(final, MG[f"{run}.final_input_ids"][:, image])


# ------------------------------------------------------------------------------------------------
# Prefix-cached steps = full recompute
# ------------------------------------------------------------------------------------------------


def _window(kind: str, rows: int, geom) -> np.ndarray:
    n = geom["n"]
    if kind == "all_masked":
        return np.full((rows, n), geom["mask"], dtype=np.int64)
    rng = np.random.default_rng(7)
    codes = rng.integers(0, geom["codebook"], (rows, n)) + geom["offset"]
    hidden = np.zeros((rows, n), dtype=bool)
    for r in range(rows):
        hidden[r, rng.permutation(n)[: n // 2]] = True
    return np.where(hidden, geom["mask"], codes)


@pytest.mark.parametrize("kind", ["all_masked", "half_known"])
@pytest.mark.parametrize("guidance", [0.0, 1.75])
@pytest.mark.parametrize("prompt_idx", [[4], [0, 1, 4, 6]], ids=["unpadded", "mixed"])
def test_cached_logits_equal_full_recompute(prompt_idx, guidance, kind, pipe, prompting, cases, geom):
    texts = [cases["prompts"][i]["text"] for i in prompt_idx]
    tokens = _window(kind, len(texts), geom)
    cond = prompting.t2i_gen(texts, tokens)
    if prompt_idx == [4]:
        # prompt 4 fills the 129-token text block exactly: no padding at all
        assert len(cases["prompts"][4]["base_token_ids"]) == 126
        assert prompting.ids.pad not in cond.ids[0] and not cond.layouts[0].pads
    else:
        assert any(lay.pads for lay in cond.layouts)
    cached = CachedImageLogits(pipe.model, prompting, cond, guidance)
    full = RecomputeImageLogits(pipe.model, prompting, cond, guidance)
    a, b = np.array(cached(mx.array(tokens))), np.array(full(mx.array(tokens)))
    assert a.shape == b.shape == (len(texts), geom["n"], geom["codebook"])
    assert np.abs(a - b).max() <= 1e-5
    assert np.abs(b).max() > 1.0  # real logits, not zeros


def test_cached_logits_match_reference_forward(pipe, prompting, geom):
    """transformer.npz t2i: cond rows (prompts 2, 5) + two empty-prompt rows sharing the image part,
    full reference logits. The cached CFG step equals (1+s)·cond − s·uncond of those, sliced."""
    ids, logits = TR["t2i.input_ids"], TR["t2i.logits"]
    cond_ids = ids[:2]
    np.testing.assert_array_equal(ids[2:, geom["image"]], cond_ids[:, geom["image"]])
    s = float(RUN_CONFIG["training"]["guidance_scale"])
    want = np.array(cfg_combine(mx.array(logits[:2]), mx.array(logits[2:]), s))[
        :, geom["image"], geom["offset"] : geom["offset"] + geom["codebook"]
    ]
    fn = CachedImageLogits(pipe.model, prompting, Prompt(cond_ids, prompting.t2i_layouts(cond_ids)), s)
    got = np.array(fn(mx.array(cond_ids[:, geom["image"]])))
    assert np.abs(got - want).max() <= 1e-4
    plain = CachedImageLogits(pipe.model, prompting, Prompt(cond_ids, prompting.t2i_layouts(cond_ids)), 0.0)
    got0 = np.array(plain(mx.array(cond_ids[:, geom["image"]])))
    want0 = logits[:2, geom["image"], geom["offset"] : geom["offset"] + geom["codebook"]]
    assert np.abs(got0 - want0).max() <= 2e-5


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------


def test_generate_seeds(pipe, geom):
    prompt = "a red cat sitting on a wooden table"
    kw = dict(steps=3, guidance=1.75)
    assert pipe.resolution == geom["grid"][0] * 16 == 128

    batch = pipe.generate(prompt, seed=[11, 12], **kw)  # a batch of two rows with their own seeds
    alone = pipe.generate(prompt, seed=11, **kw)
    again = pipe.generate(prompt, seed=11, **kw)
    for r in batch + alone + again:
        assert r.image.size == (128, 128) and r.image.mode == "RGB"
        assert r.codes.shape == (geom["n"],) and 0 <= r.codes.min() and r.codes.max() < geom["codebook"]
    # same seed twice: identical codes and pixels
    np.testing.assert_array_equal(alone[0].codes, again[0].codes)
    np.testing.assert_array_equal(np.asarray(alone[0].image), np.asarray(again[0].image))
    # per-row keyed randomness: the batch row with seed 11 equals seed 11 alone
    assert [r.seed for r in batch] == [11, 12]
    np.testing.assert_array_equal(batch[0].codes, alone[0].codes)
    np.testing.assert_array_equal(np.asarray(batch[0].image), np.asarray(alone[0].image))
    # different seeds differ
    assert (batch[0].codes != batch[1].codes).any()
    assert not np.array_equal(np.asarray(batch[0].image), np.asarray(batch[1].image))

    # n=2 with one seed: seeds s, s+1 — the same two images as the explicit batch
    pair = pipe.generate(prompt, seed=11, n=2, **kw)
    assert [r.seed for r in pair] == [11, 12]
    for got, want in zip(pair, batch):
        np.testing.assert_array_equal(got.codes, want.codes)
    meta = pair[1].metadata("tiny")
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["guidance"]) == (prompt, "12", "3", "1.75")


def test_generate_greedy_ignores_the_seed(pipe, geom):
    out = pipe.generate("a blue bird over the lake", seed=[1, 2], steps=3, guidance=1.75, greedy=True)
    np.testing.assert_array_equal(out[0].codes, out[1].codes)
    np.testing.assert_array_equal(np.asarray(out[0].image), np.asarray(out[1].image))
    assert out[0].image.size == (128, 128)
    assert out[0].metadata("m")["seed"] == "greedy"


# ------------------------------------------------------------------------------------------------
# inpaint
# ------------------------------------------------------------------------------------------------


def test_inpaint_matches_reference_run(pipe, prompting, cases, geom, maskgit_prompts):
    """maskgit.npz inpaint_T8 ran prompts [5, 7] as a batch of 2 on the same image. `pipe.inpaint`
    takes one prompt, so row 0 is compared with a single-prompt `inpaint` (rows are independent:
    greedy, each row only attends to itself), and the 2-prompt batch goes through the pipeline's
    lower-level window decoder with the tokens `inpaint` builds."""
    run = "inpaint_T8"
    meta = cases["maskgit"]["runs"][run]
    image, mask = IMAGES / "preprocess_in_0.png", IMAGES / "inpaint_mask.png"
    out = pipe.inpaint(image, mask, maskgit_prompts[0], greedy=True, guidance=1.75, steps=meta["timesteps"], seed=0)
    assert len(out) == 1 and out[0].image.size == (128, 128)
    np.testing.assert_array_equal(out[0].codes, MG[f"{run}.result"][0])

    codes = pipe.encode_image(image)
    region = PRE["mask_tokens"]
    assert out[0].extra["repainted_tokens"] == int(region.sum()) == meta["num_unknown"][0][0]
    # known tokens outside the mask are the image's own codes, unchanged
    np.testing.assert_array_equal(out[0].codes[~region[0]], codes[0][~region[0]])
    np.testing.assert_array_equal(MG["inpaint.image_tokens"][0][~region[0]], codes[0][~region[0]] + geom["offset"])

    init = np.repeat(np.where(region, geom["mask"], codes + geom["offset"]), 2, axis=0)
    np.testing.assert_array_equal(init, MG["inpaint.image_tokens"])
    settings = pipe.settings("inpaint", steps=meta["timesteps"], guidance=1.75, temperature=0.0, greedy=True)
    both = pipe._decode_window(maskgit_prompts, init, [0, 0], settings)
    np.testing.assert_array_equal(both, MG[f"{run}.result"])


# ------------------------------------------------------------------------------------------------
# extrapolate
# ------------------------------------------------------------------------------------------------


def test_grow_canvas_and_windows_follow_the_reference_table():
    w, unknown = 8, -1
    c = np.arange(64).reshape(1, 8, 8)
    for offset in (0, 1):
        m, k = w // 2 + offset, w // 2 - offset
        for d in ("left", "right", "up", "down"):
            grown = grow_canvas(c, d, m, unknown)
            (rows, cols), = extension_windows(grown.shape[1:], d, w)
            window = grown[:, rows, cols]
            mask = np.full((1, w, m) if d in ("left", "right") else (1, m, w), unknown)
            want = {
                "left": lambda: np.concatenate([mask, c[:, :, :k]], 2),
                "right": lambda: np.concatenate([c[:, :, w - k :], mask], 2),
                "up": lambda: np.concatenate([mask, c[:, :k, :]], 1),
                "down": lambda: np.concatenate([c[:, w - k :, :], mask], 1),
            }[d]()
            np.testing.assert_array_equal(window, want)
            g = 1000 + np.arange(64).reshape(1, 8, 8)  # a generated window
            grown[:, rows, cols] = g
            after = {
                "left": lambda: np.concatenate([g, c[:, :, k:]], 2),
                "right": lambda: np.concatenate([c[:, :, : w - k], g], 2),
                "up": lambda: np.concatenate([g, c[:, k:, :]], 1),
                "down": lambda: np.concatenate([c[:, : w - k, :], g], 1),  # what the reference intended
            }[d]()
            np.testing.assert_array_equal(grown, after)
    # a 12-wide canvas grown downwards is covered by two 8-wide windows (last one at the far edge)
    assert extension_windows((12, 12), "down", 8) == [(slice(4, 12), slice(0, 8)), (slice(4, 12), slice(4, 12))]


def _record_windows(pipe, monkeypatch):
    calls = []
    real = pipe._decode_window

    def spy(prompts, init, seeds, s, callback=None):
        codes = real(prompts, init, seeds, s, callback)
        calls.append((np.array(init), np.array(codes)))
        return codes

    monkeypatch.setattr(pipe, "_decode_window", spy)
    return calls


def test_extrapolate_four_directions(pipe, geom, monkeypatch):
    import showo_mlx.pipeline as pl

    shapes = []
    real_grow = pl.grow_canvas

    def grow(*a, **k):
        out = real_grow(*a, **k)
        shapes.append(out.shape[1:])
        return out

    monkeypatch.setattr(pl, "grow_canvas", grow)
    windows = _record_windows(pipe, monkeypatch)
    image = IMAGES / "preprocess_in_0.png"
    (out,) = pipe.extrapolate(image, "a lake", ["left", "right", "down", "up"], steps=2, seed=3)
    assert shapes == [(8, 12), (8, 16), (12, 16), (16, 16)]
    assert out.extra["canvas_tokens"] == "16x16"
    assert out.image.size == (16 * 16, 16 * 16)
    assert len(windows) == 1 + 1 + 2 + 2
    for init, codes in windows:
        known = init != geom["mask"]
        np.testing.assert_array_equal(codes[known], init[known] - geom["offset"])  # never re-masked
        assert (~known).sum() >= geom["n"] // 2
    canvas = out.codes.reshape(16, 16)
    original = pipe.encode_image(image).reshape(8, 8)
    # left/right add 4 columns each side, down 4 rows below, up 4 rows above
    np.testing.assert_array_equal(canvas[4:12, 4:12], original)


def test_extrapolate_left_is_the_reference_window(pipe, prompting, geom, monkeypatch):
    windows = _record_windows(pipe, monkeypatch)
    image = IMAGES / "magvit_in_0.png"
    (out,) = pipe.extrapolate(image, "a lake", ["left"], steps=4, guidance=1.75, greedy=True, seed=0)
    c = MAGVIT["codes"][0].reshape(8, 8)
    assert out.image.size == (12 * 16, 8 * 16)
    ((init, g),) = windows
    k = m = 4
    want = np.concatenate([np.full((8, m), geom["mask"]), c[:, :k] + geom["offset"]], 1).reshape(1, -1)
    np.testing.assert_array_equal(init, want)
    np.testing.assert_array_equal(out.codes.reshape(8, 12), np.concatenate([g.reshape(8, 8), c[:, k:]], 1))
    # the reference's step on that window: full recompute, greedy
    cond = prompting.t2i_gen(["a lake"], want)
    ref_codes, _, _ = decode(pipe, RecomputeImageLogits(pipe.model, prompting, cond, 1.75), want, 4)
    np.testing.assert_array_equal(g, ref_codes)


def test_extrapolate_down_on_the_square_image(pipe, geom, monkeypatch):
    """The reference's "down" pastes the wrong slice and crashes on a W-wide canvas; here the new
    rows go below the image and the image keeps all its codes."""
    windows = _record_windows(pipe, monkeypatch)
    (out,) = pipe.extrapolate(IMAGES / "magvit_in_0.png", "a lake", ["down"], steps=2, seed=1)
    c = MAGVIT["codes"][0].reshape(8, 8)
    assert out.image.size == (8 * 16, 12 * 16) and out.extra["canvas_tokens"] == "12x8"
    ((init, g),) = windows
    want = np.concatenate([c[4:] + geom["offset"], np.full((4, 8), geom["mask"])], 0).reshape(1, -1)
    np.testing.assert_array_equal(init, want)
    canvas = out.codes.reshape(12, 8)
    np.testing.assert_array_equal(canvas[:8], c)
    np.testing.assert_array_equal(canvas[4:], g.reshape(8, 8))


def test_extrapolate_bad_direction_and_offset(pipe):
    image = IMAGES / "magvit_in_0.png"
    with pytest.raises(GenerationInputError) as e:
        pipe.extrapolate(image, "x", ["sideways"], steps=1, seed=0)
    assert "sideways" in one_line(e)
    with pytest.raises(GenerationInputError):
        pipe.extrapolate(image, "x", [], steps=1, seed=0)
    for offset in (-1, 4, 100):
        with pytest.raises(GenerationInputError) as e:
            pipe.extrapolate(image, "x", ["left"], offset=offset, steps=1, seed=0)
        assert "offset" in one_line(e)


# ------------------------------------------------------------------------------------------------
# ask
# ------------------------------------------------------------------------------------------------


class RecordingOptions(SamplingOptions):
    """Greedy options whose sampler keeps the log-probabilities the KV-cached loop hands it."""

    def __init__(self):
        super().__init__()
        self.seen: list[np.ndarray] = []

    def sampler(self):
        def argmax(logprobs):
            self.seen.append(np.array(logprobs.astype(mx.float32))[0])
            return mx.argmax(logprobs, axis=-1)

        return argmax


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("q", [0, 1])
def test_ask_reproduces_reference_mmu_generate(q, pipe, prompting, cases):
    case = cases["mmu_generate"][q]
    image = IMAGES / case["image"]
    codes = pipe.encode_image(image)
    np.testing.assert_array_equal(codes[0], MAGVIT["codes"][q])
    prompt = prompting.mmu_gen(prompting.image_ids(codes), case["question"])
    np.testing.assert_array_equal(prompt.ids, MMU[f"q{q}.input_ids"])
    assert prompt.ids.shape[1] == case["prompt_length"]

    options = RecordingOptions()
    tokens = list(pipe.answer_tokens(prompt.ids, prompt.layouts, 20, options))
    assert tokens == case["generated"] == MMU[f"q{q}.generated"].tolist()
    text = prompting.decode(tokens)
    assert text == case["decoded_text"][0]

    # KV-cached step logits (as log-probabilities) = full recompute of the grown sequence each step
    prefix_len = prompt.layouts[0].prefix_len
    assert len(options.seen) == 20
    for i, cached in enumerate(options.seen):
        ids = np.concatenate([prompt.ids, np.asarray([tokens[:i]], dtype=np.int64)], axis=1)
        layout = Layout(ids.shape[1], prefix_len=prefix_len)
        full = np.array(pipe.model(mx.array(ids), mask=attention_mask([layout]))[0, -1])
        assert np.abs(cached - _log_softmax(full)).max() <= 1e-5, i
        assert np.abs(full - MMU[f"q{q}.step_last_logits"][i]).max() <= 1e-4, i
        assert np.abs(cached - _log_softmax(MMU[f"q{q}.step_last_logits"][i])).max() <= 1e-4, i

    if q == 0:
        answer = pipe.ask(image, case["question"], max_tokens=20)
        assert answer == case["decoded_text"][0]
        pieces = list(pipe.stream_ask(image, case["question"], max_tokens=20))
        assert len(pieces) > 1 and "".join(pieces) == answer


def _drain(gen):
    pieces = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as end:
            return "".join(pieces), end.value


def test_answer_streams_return_their_stats(pipe, prompting, monkeypatch):
    """stream_complete / stream_ask return AnswerStats: prompt and answer lengths in tokens and
    whether the answer stopped at eos or at max_tokens (what `showo serve` reports as usage)."""
    text, stats = _drain(pipe.stream_complete("Once upon a time", max_tokens=5))
    assert text == pipe.complete("Once upon a time", max_tokens=5)
    assert stats == AnswerStats(1 + len(prompting.encode("Once upon a time")), 5, "length")

    # One token (max_tokens=1 crashed with UnboundLocalError in decoding.generate_tokens).
    one, stats = _drain(pipe.stream_complete("Once upon a time", max_tokens=1))
    assert stats.completion_tokens == 1 and one and text.startswith(one)

    eos = prompting.ids.eos
    monkeypatch.setattr(pipe, "answer_tokens", lambda ids, layouts, max_tokens, options, prompt_embeddings=None: iter([5, 6, eos]))
    text, stats = _drain(pipe.stream_complete("Hi", max_tokens=10))
    assert text == prompting.decode([5, 6]) and stats == AnswerStats(1 + len(prompting.encode("Hi")), 3, "stop")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_generation_settings(pipe):
    bad = [
        (dict(steps=0), "steps"),
        (dict(steps=-3), "steps"),
        (dict(guidance=-1.0), "guidance"),
        (dict(guidance=float("nan")), "guidance"),
        (dict(schedule="zigzag"), "schedule"),
        (dict(temperature=-1.0), "temperature"),
    ]
    for kwargs, word in bad:
        with pytest.raises(GenerationInputError) as e:
            pipe.generate("a cat", seed=0, **kwargs)
        assert word in one_line(e), kwargs
    with pytest.raises(GenerationInputError) as e:
        pipe.generate([], seed=0, steps=1)
    assert "prompt" in one_line(e)
    with pytest.raises(GenerationInputError) as e:
        pipe.generate("a cat", seed=0, steps=1, n=0)
    one_line(e)


def test_bad_images(pipe, tmp_path):
    image, mask = IMAGES / "magvit_in_0.png", IMAGES / "inpaint_mask.png"
    text = tmp_path / "notes.png"
    text.write_text("this is not a PNG\n")
    missing = tmp_path / "missing.png"
    calls = [
        lambda: pipe.inpaint(missing, mask, "x", steps=1, seed=0),
        lambda: pipe.inpaint(text, mask, "x", steps=1, seed=0),
        lambda: pipe.inpaint(image, missing, "x", steps=1, seed=0),
        lambda: pipe.inpaint(image, text, "x", steps=1, seed=0),
        lambda: pipe.inpaint(image, tmp_path, "x", steps=1, seed=0),
        lambda: pipe.ask(missing, "what?"),
        lambda: pipe.ask(text, "what?"),
        lambda: pipe.extrapolate(text, "x", ["left"], steps=1, seed=0),
        lambda: pipe.inpaint(np.zeros((8, 8, 3), np.float32), mask, "x", steps=1, seed=0),
    ]
    for call in calls:
        with pytest.raises(ImageInputError) as e:
            call()
        one_line(e)
    # an all-black mask repaints nothing: an error, not a silent copy
    black = tmp_path / "black.png"
    Image.new("L", (64, 64), 0).save(black)
    with pytest.raises(ImageInputError) as e:
        pipe.inpaint(image, black, "x", steps=1, seed=0)
    assert "mask" in one_line(e)


def test_several_seeds_with_n_is_refused_not_duplicated(pipe):
    from showo_mlx.errors import GenerationInputError

    with pytest.raises(GenerationInputError, match="ambiguous"):
        pipe.generate("a cat", seed=[5, 6], n=2, steps=1)


# ------------------------------------------------------------------------------------------------
# low-RAM mode
# ------------------------------------------------------------------------------------------------


def test_low_ram_pipeline_gives_the_reference_outputs_and_frees_magvit(converted, cases, maskgit_prompts, restore_limits):
    """`--low-ram` changes when memory is freed, never what is computed: the recorded inpainting run
    and greedy answer are reproduced; the encoder is gone after inpaint (decoder kept) and the whole
    MAGVIT after ask, and both come back from disk for the next call."""
    from showo_mlx import memory
    from showo_mlx.pipeline import Pipeline

    pipe = Pipeline(converted, low_ram=True)
    assert mx.set_cache_limit(memory.LOW_RAM_CACHE_BYTES) == memory.LOW_RAM_CACHE_BYTES
    meta = cases["maskgit"]["runs"]["inpaint_T8"]
    for _ in range(2):  # the second round reloads what the first one freed
        out = pipe.inpaint(IMAGES / "preprocess_in_0.png", IMAGES / "inpaint_mask.png", maskgit_prompts[0],
                           greedy=True, guidance=1.75, steps=meta["timesteps"], seed=0)
        np.testing.assert_array_equal(out[0].codes, MG["inpaint_T8.result"][0])
        assert pipe._vq is None and pipe._decoder is not None and not pipe._decoder.has_encoder

        case = cases["mmu_generate"][0]
        assert pipe.ask(IMAGES / case["image"], case["question"], max_tokens=20) == case["decoded_text"][0]
        assert pipe._vq is None and pipe._decoder is None
