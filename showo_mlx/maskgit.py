"""MaskGIT parallel decoding of image tokens, exactly as `Showo.t2i_generate` does it (official
`models/modeling_showo.py`, with `models/sampling.py`: the schedules of `get_mask_chedule`,
`mask_by_random_topk`, `gumbel_noise`).

The loop is model-agnostic: it receives a function that maps the current image window (token ids in
the LLM vocabulary, unknown positions = `[MASK]`) to image-code logits. The caller runs the
transformer, combines conditional and unconditional logits with `cfg_combine` and cuts the image part
out with `slice_image_logits`.

Every step (reference order):

    p        = softmax(logits)                                float32 over the codebook
    sampled  = categorical(p)  (known positions keep their code)
    conf     = p[sampled]       (float32 max at known positions, so they are never re-masked)
    mask_len = clamp(floor(f32(N · schedule((step+1)/T))), 1, unknown − 1)   per row
    τ        ← τ · (1 − (step+1)/T)                            cumulative (t2i_generate overwrites τ)
    score    = log(max(conf, 1e-20)) + τ · gumbel(u)
    remask   = score < sort(score)[mask_len]                   strict, per row
    tokens   = where(remask, [MASK], offset + sampled)

and the result is the last step's `sampled` (not the re-masked tokens).

Top-k (Show-o Turbo, `sample_t2i.py` of SJTU-Deng-Lab/Show-o-Turbo): the categorical draw is taken
from the k most probable codes, renormalised (`torch.topk` then `topk_probs /= topk_probs.sum()`),
while `conf` keeps reading the full softmax. It changes only what `categorical` sees.

Randomness is injected through a `MaskGitRandomness` object so that the same loop serves seeded
generation (`KeyedRandomness`), deterministic comparison with the reference (`GreedyRandomness`) and
replay of recorded reference draws (`ReplayRandomness`).
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence, runtime_checkable

import mlx.core as mx
import numpy as np

from .errors import GenerationInputError

__all__ = [
    "SCHEDULES",
    "check_schedule",
    "mask_ratio",
    "mask_len_for_step",
    "annealed_temperatures",
    "cfg_combine",
    "slice_image_logits",
    "tokens_from_codes",
    "MaskGitRandomness",
    "KeyedRandomness",
    "GreedyRandomness",
    "ReplayRandomness",
    "gumbel_from_uniform",
    "top_k_probs",
    "GenerationCancelled",
    "decode_image_tokens",
]

SCHEDULES = ("cosine", "linear", "powK", "sigmoid")

_F32 = np.float32
_F32_MAX = float(np.finfo(np.float32).max)  # 3.4028235e38, the reference's "known" confidence
_EPS = 1e-20  # clamp of the reference's log()


# --------------------------------------------------------------------------------------------------
# Schedules. The reference evaluates them on `torch.tensor(r)`, i.e. in float32; each operation below
# is one float32 rounding, in the reference's order, so that floor(N · ratio) lands on the same
# integer (at r = 2/3 float32 gives 0.49999997 where float64 gives 0.5: 127 tokens instead of 128 at N = 256).
# --------------------------------------------------------------------------------------------------


def _cosine(r: np.float32) -> np.float32:
    a = _F32(r * _F32(math.pi))  # t * math.pi: the Python scalar is cast to float32
    a = _F32(a * _F32(0.5))
    # torch's float32 cos is correctly rounded for these arguments; the float64 cos rounded once to
    # float32 reproduced torch on all 40,200 cases checked (every T ≤ 200, N ∈ {256, 1024}).
    return _F32(math.cos(float(a)))


def _linear(r: np.float32) -> np.float32:
    return _clip(_F32(_F32(1.0) - r))


def _pow(r: np.float32, k: float) -> np.float32:
    # ATen's pow(tensor, scalar) special-cases these exponents with float32 arithmetic; every other
    # exponent goes through std::pow(float, double), i.e. float64 pow rounded once.
    if k == 2.0:
        p = _F32(r * r)
    elif k == 3.0:
        p = _F32(_F32(r * r) * r)
    elif k == 0.5:
        p = np.sqrt(r, dtype=_F32)
    else:
        p = _F32(math.pow(float(r), k))
    # Negative exponents give p >= 1, which the clip turns into 1e-6 whatever the rounding was.
    return _clip(_F32(_F32(1.0) - p))


def _sigmoid32(x: np.float32) -> np.float32:
    # torch's scalar sigmoid: 1 / (1 + exp(-x)), each step in float32.
    e = _F32(math.exp(-float(x)))
    return _F32(_F32(1.0) / _F32(_F32(1.0) + e))


def _sigmoid_schedule(r: np.float32, start=-3.0, end=3.0, tau=1.0) -> np.float32:
    v_start = _sigmoid32(_F32(start / tau))
    v_end = _sigmoid32(_F32(end / tau))
    x = _F32(_F32(_F32(r * _F32(end - start)) + _F32(start)) / _F32(tau))
    out = _F32(_F32(v_end - _sigmoid32(x)) / _F32(v_end - v_start))
    return _clip(out)


def _clip(x: np.float32, lo: float = 1e-6) -> np.float32:
    return _F32(min(max(x, _F32(lo)), _F32(1.0)))


def _bad_schedule(schedule) -> GenerationInputError:
    return GenerationInputError(
        f"unknown mask schedule {schedule!r}; valid: 'cosine', 'linear', 'sigmoid', "
        f"'powK' with a number K (e.g. 'pow2', 'pow0.5')"
    )


def _schedule_fn(schedule: str) -> Callable[[np.float32], np.float32]:
    if schedule == "cosine":
        return _cosine
    if schedule == "linear":
        return _linear
    if schedule == "sigmoid":
        return _sigmoid_schedule
    if isinstance(schedule, str) and schedule.startswith("pow"):
        try:
            k = float(schedule[3:])
        except ValueError:
            raise _bad_schedule(schedule) from None
        if not math.isfinite(k):
            raise _bad_schedule(schedule)
        return lambda r: _pow(r, k)
    raise _bad_schedule(schedule)


def check_schedule(schedule: str) -> None:
    """Raise `GenerationInputError` unless `schedule` names a known schedule."""
    _schedule_fn(schedule)


def mask_ratio(schedule: str, r: float) -> float:
    """Fraction of the window that stays masked after progress `r` in [0, 1], in float32 as the
    reference computes it (returned as the Python float holding that float32 value)."""
    return float(_schedule_fn(schedule)(_F32(r)))


def _check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise GenerationInputError(f"steps must be an integer >= 1, got {steps!r}")


def _budget(step: int, steps: int, num_tokens: int, schedule: str) -> int:
    """floor(f32(N · mask_ratio)) before the per-row clamp."""
    _check_steps(steps)
    if not 0 <= step < steps:
        raise GenerationInputError(f"step {step} outside 0..{steps - 1}")
    ratio = _schedule_fn(schedule)(_F32(1.0 * (step + 1) / steps))
    return int(math.floor(_F32(_F32(num_tokens) * ratio)))


def mask_len_for_step(step: int, steps: int, num_tokens: int, num_unknown, schedule: str = "cosine"):
    """Number of positions re-masked by `step`: the schedule's budget over the whole window
    (`num_tokens` = N, not the unknown count, as `Showo.t2i_generate` computes it), clamped per row to [1, unknown − 1].

    `num_unknown` may be an int (returns an int), a numpy array or an mx.array (returns the same
    kind, elementwise)."""
    base = _budget(step, steps, num_tokens, schedule)
    if isinstance(num_unknown, mx.array):
        return mx.maximum(mx.minimum(num_unknown - 1, base), 1)
    if isinstance(num_unknown, np.ndarray):
        return np.maximum(np.minimum(num_unknown - 1, base), 1)
    return max(1, min(int(num_unknown) - 1, base))


def annealed_temperatures(temperature: float, steps: int) -> list[float]:
    """The temperature each step applies to the Gumbel noise: τ ← τ·(1 − (step+1)/T), cumulative
    (the reference overwrites its variable), in Python float64 as the reference does."""
    _check_steps(steps)
    out, tau = [], float(temperature)
    for step in range(steps):
        tau = tau * (1.0 - 1.0 * (step + 1) / steps)
        out.append(tau)
    return out


# --------------------------------------------------------------------------------------------------
# Logit helpers for the caller.
# --------------------------------------------------------------------------------------------------


def cfg_combine(cond: mx.array, uncond: mx.array, scale: float) -> mx.array:
    """MUSE-style guidance on full logits: (1 + s)·cond − s·uncond, as `Showo.t2i_generate`
    computes it (not uncond + s·(cond − uncond), which rounds differently)."""
    return (1 + scale) * cond - scale * uncond


def slice_image_logits(logits: mx.array, first_image_pos: int, n: int, offset: int, codebook: int) -> mx.array:
    """(B, L, V) → (B, n, codebook) float32: the image positions [first, first + n) — the first image
    *token*, one after `<|soi|>` — and the code columns [offset, offset + codebook), which leaves out
    `[MASK]` and every text logit (the slice `Showo.t2i_generate` takes)."""
    return logits[:, first_image_pos : first_image_pos + n, offset : offset + codebook].astype(mx.float32)


def tokens_from_codes(codes, unknown, *, image_token_offset: int, mask_token_id: int) -> mx.array:
    """Initial window for inpainting/extrapolation: offset + code where known, `[MASK]` where
    `unknown` is True."""
    codes = mx.array(codes).astype(mx.int32)
    return mx.where(mx.array(unknown), mask_token_id, codes + image_token_offset).astype(mx.int32)


# --------------------------------------------------------------------------------------------------
# Randomness.
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class MaskGitRandomness(Protocol):
    """Source of the two random draws of a step (reference order: categorical, then uniform)."""

    def categorical(self, probs: mx.array, step: int) -> mx.array:
        """One code per position from float32 probabilities (B, N, K) → (B, N) int."""
        ...

    def uniform(self, shape: tuple[int, ...], step: int) -> mx.array | None:
        """U[0, 1) float32 draws for the re-masking Gumbel noise, or None for no noise."""
        ...


def _log_probs(probs: mx.array) -> mx.array:
    # log(0) = -inf, which categorical sampling treats as "never".
    return mx.log(probs)


class KeyedRandomness:
    """Seeded draws from `mx.random` keys; reproducible across runs and processes.

    Keys never depend on call order: step s uses the s-th key of a chain started at
    `mx.random.key(seed)`, split into one key for sampling and one for the noise. With a sequence of
    seeds, row i of the batch uses its own chain, so an image generated with seed s in a batch equals
    the one generated alone with seed s."""

    def __init__(self, seed: int | Sequence[int]):
        self.per_row = not isinstance(seed, (int, np.integer))
        seeds = list(seed) if self.per_row else [seed]
        if not seeds:
            raise GenerationInputError("KeyedRandomness needs at least one seed")
        # Per row: the running chain key and the step keys split off it so far.
        self._chain = [mx.random.key(int(s)) for s in seeds]
        self._step_keys: list[list[mx.array]] = [[] for _ in seeds]

    def _keys(self, row: int, step: int) -> tuple[mx.array, mx.array]:
        keys = self._step_keys[row]
        while len(keys) <= step:
            self._chain[row], here = mx.random.split(self._chain[row], 2)
            keys.append(here)
        cat_key, uni_key = mx.random.split(keys[step], 2)
        return cat_key, uni_key

    def _rows(self, batch: int) -> list[int]:
        if not self.per_row:
            return [0]
        if batch != len(self._chain):
            raise GenerationInputError(f"{len(self._chain)} seeds given for a batch of {batch}")
        return list(range(batch))

    def categorical(self, probs: mx.array, step: int) -> mx.array:
        logp = _log_probs(probs)
        if not self.per_row:
            return mx.random.categorical(logp, axis=-1, key=self._keys(0, step)[0]).astype(mx.int32)
        draws = [
            mx.random.categorical(logp[i], axis=-1, key=self._keys(i, step)[0])
            for i in self._rows(probs.shape[0])
        ]
        return mx.stack(draws).astype(mx.int32)

    def uniform(self, shape: tuple[int, ...], step: int) -> mx.array:
        if not self.per_row:
            return mx.random.uniform(shape=shape, key=self._keys(0, step)[1])
        rows = self._rows(shape[0])
        return mx.stack([mx.random.uniform(shape=shape[1:], key=self._keys(i, step)[1]) for i in rows])


class GreedyRandomness:
    """Deterministic mode: argmax sampling (first index on ties, as torch) and no re-masking noise,
    whatever the temperature. With temperature 0 this is the fixture's deterministic reference."""

    def categorical(self, probs: mx.array, step: int) -> mx.array:
        return mx.argmax(probs, axis=-1).astype(mx.int32)

    def uniform(self, shape: tuple[int, ...], step: int) -> None:
        return None


class ReplayRandomness:
    """Replays recorded draws: `sampled_raw` (T, B, N) categorical outputs and `uniform` (T, B, N)
    noise inputs (or None for no noise)."""

    def __init__(self, sampled_raw, uniform=None):
        self.sampled_raw = mx.array(np.asarray(sampled_raw)).astype(mx.int32)
        self.uniform_draws = None if uniform is None else mx.array(np.asarray(uniform, dtype=np.float32))

    def _at(self, draws: mx.array, step: int, shape: tuple[int, ...]) -> mx.array:
        if step >= draws.shape[0] or tuple(draws.shape[1:]) != tuple(shape):
            raise ValueError(f"no recorded draw of shape {shape} for step {step} (have {draws.shape})")
        return draws[step]

    def categorical(self, probs: mx.array, step: int) -> mx.array:
        return self._at(self.sampled_raw, step, probs.shape[:-1])

    def uniform(self, shape: tuple[int, ...], step: int) -> mx.array | None:
        return None if self.uniform_draws is None else self._at(self.uniform_draws, step, shape)


def top_k_probs(probs: mx.array, k: int | None) -> mx.array:
    """The distribution Show-o Turbo samples from: the k largest probabilities of each position,
    renormalised to sum to 1, zero elsewhere (full codebook width, so sampled indices are codes).
    Exactly k codes survive, as `torch.topk` keeps k (which of several tied codes is unspecified in
    both). No filtering for k None/0 or k >= the codebook size."""
    if not k or k >= probs.shape[-1]:
        return probs
    idx = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
    top = mx.take_along_axis(probs, idx, axis=-1)
    top = top / top.sum(axis=-1, keepdims=True)
    return mx.put_along_axis(mx.zeros_like(probs), idx, top, axis=-1)


def gumbel_from_uniform(u: mx.array) -> mx.array:
    """−log(−log(u)) with the reference's 1e-20 clamps before each log."""
    return -mx.log(mx.maximum(-mx.log(mx.maximum(u, _EPS)), _EPS))


# --------------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------------


class GenerationCancelled(Exception):
    """Raised when the step callback returns False. `codes` holds the codes sampled at `step`
    (a complete grid, usable as a preview)."""

    def __init__(self, step: int, codes: mx.array):
        super().__init__(f"generation cancelled after step {step + 1}")
        self.step = step
        self.codes = codes


StepCallback = Callable[[int, int, mx.array], "bool | None"]


def _check_window(tokens: np.ndarray, mask_token_id: int, offset: int, codebook: int) -> None:
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise GenerationInputError(f"init_tokens must be (batch, N >= 2) token ids, got shape {tokens.shape}")
    valid = (tokens == mask_token_id) | ((tokens >= offset) & (tokens < offset + codebook))
    if not valid.all():
        bad = int(tokens[~valid][0])
        raise GenerationInputError(
            f"init_tokens holds id {bad}; image windows take [MASK] ({mask_token_id}) or image ids "
            f"[{offset}, {offset + codebook})"
        )


def _remask_step(probs, sampled, unknown, mask_len, tau, u):
    """Confidence of every sampled code and the strict cut at the per-row `mask_len`."""
    conf = mx.take_along_axis(probs, sampled[..., None], axis=-1)[..., 0]
    conf = mx.where(unknown, conf, mx.array(_F32_MAX, dtype=mx.float32))
    score = mx.log(mx.maximum(conf, _EPS))
    if u is not None and tau != 0.0:
        # tau is a Python float; MLX casts it to float32 like torch's scalar multiply.
        score = score + tau * gumbel_from_uniform(u.astype(mx.float32))
    cut = mx.take_along_axis(mx.sort(score, axis=-1), mask_len[:, None], axis=-1)
    return conf, score, score < cut


def decode_image_tokens(
    image_logits_fn: Callable[[mx.array], mx.array],
    init_tokens,
    *,
    steps: int,
    mask_token_id: int,
    image_token_offset: int,
    codebook_size: int,
    schedule: str = "cosine",
    temperature: float = 1.0,
    randomness: MaskGitRandomness,
    callback: StepCallback | None = None,
    trace: list | None = None,
    top_k: int | None = None,
) -> mx.array:
    """Run the MaskGIT loop on an image window and return the last step's codes (B, N) int32.

    `init_tokens` (B, N): image ids (offset + code) for known positions, `mask_token_id` for unknown
    ones. `image_logits_fn(tokens (B, N))` returns (B, N, codebook_size) logits for the window (already
    guided and sliced). `callback(step, steps, tokens)` runs after each step with the re-masked window;
    returning False raises `GenerationCancelled`, exceptions (KeyboardInterrupt included) propagate.
    `top_k` restricts each position's draw to its k most probable codes (Show-o Turbo; see
    `top_k_probs`); the confidence still reads the full distribution.
    With a `trace` list, one dict of numpy arrays per step is appended (tokens fed to the model,
    num_unknown, mask_len, temperature, sampled_raw, sampled, selected_probs, confidence, remask).
    """
    _check_steps(steps)
    check_schedule(schedule)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise GenerationInputError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0):
        raise GenerationInputError(f"top-k must be an integer >= 0 (0 = off), got {top_k!r}")
    host = np.asarray(init_tokens)
    _check_window(host, mask_token_id, image_token_offset, codebook_size)

    batch, n = host.shape
    tokens = mx.array(host.astype(np.int32))
    taus = annealed_temperatures(temperature, steps)
    codes = None
    for step in range(steps):
        unknown = tokens == mask_token_id
        known_codes = tokens - image_token_offset  # garbage at unknown positions, never used there

        logits = image_logits_fn(tokens)
        if tuple(logits.shape) != (batch, n, codebook_size):
            raise ValueError(f"image_logits_fn returned {logits.shape}, expected {(batch, n, codebook_size)}")
        probs = mx.softmax(logits.astype(mx.float32), axis=-1)

        # Turbo's top-k acts on the draw only (before the multinomial), never on the confidence.
        sampled_raw = randomness.categorical(top_k_probs(probs, top_k), step).astype(mx.int32)
        codes = mx.where(unknown, sampled_raw, known_codes)

        # The schedule is a host scalar; the per-row unknown counts stay on the device.
        num_unknown = unknown.astype(mx.int32).sum(axis=-1)
        mask_len = mask_len_for_step(step, steps, n, num_unknown, schedule)
        u = randomness.uniform((batch, n), step)
        conf, score, remask = _remask_step(probs, codes, unknown, mask_len, taus[step], u)

        fed = tokens
        tokens = mx.where(remask, mask_token_id, codes + image_token_offset).astype(mx.int32)
        mx.eval(tokens, codes)
        if trace is not None:
            trace.append(
                {
                    "step": step,
                    "tokens": np.array(fed),
                    "num_unknown": np.array(num_unknown),
                    "mask_len": np.array(mask_len),
                    "temperature": taus[step],
                    "sampled_raw": np.array(sampled_raw),
                    "sampled": np.array(codes),
                    "selected_probs": np.array(conf),
                    "confidence": np.array(score),
                    "remask": np.array(remask),
                }
            )
        if callback is not None and callback(step, steps, tokens) is False:
            raise GenerationCancelled(step, codes)
    return codes
