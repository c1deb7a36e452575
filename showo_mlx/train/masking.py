"""Image-token masking for the t2i rows (official `training/utils.py`,
`mask_or_random_replace_tokens`).

Per image: ``t ~ U[0, 1)``, ``p = cos(t·π/2)`` clipped below by ``min_masking_rate``,
``k = max(1, round(N·p))`` positions are masked. The positions come from uniform noise exactly as
the reference picks them: ``argsort(noise) < k`` (the positions whose entry of the sorting
permutation is below k — a uniformly random set of k positions). Masked inputs become [MASK];
labels hold the true id at masked positions and -100 elsewhere.

All randomness comes from the `rng` argument (a ``numpy.random.Generator`` or an int seed), drawn
in a fixed order — ``t`` for every row, then the ``(B, N)`` noise — so a test can recompute the
result from the same generator. float32 arithmetic throughout, as in torch.
"""

from __future__ import annotations

import numpy as np

from .losses import IGNORE_ID

HALF_PI = np.float32(np.pi / 2)


def cosine_schedule(t: np.ndarray) -> np.ndarray:
    """The reference's mask-ratio schedule: cos(t·π/2) in float32."""
    return np.cos(np.asarray(t, dtype=np.float32) * HALF_PI).astype(np.float32)


def _generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def mask_image_tokens(
    image_ids: np.ndarray,
    mask_id: int,
    rng: np.random.Generator | int | None = None,
    min_masking_rate: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask (B, N) image token ids. Returns (input_ids, labels, mask) with mask True = masked."""
    image_ids = np.asarray(image_ids, dtype=np.int64)
    if image_ids.ndim != 2:
        raise ValueError(f"image ids must be (B, N), got shape {image_ids.shape}")
    g = _generator(rng)
    b, n = image_ids.shape
    t = g.random(b, dtype=np.float32)
    p = np.maximum(cosine_schedule(t), np.float32(min_masking_rate))
    # torch's round is half-to-even, like numpy's; clamp(min=1) keeps at least one target.
    k = np.maximum(np.round(np.float32(n) * p), np.float32(1.0))
    noise = g.random((b, n), dtype=np.float32)
    ranks = np.argsort(noise, axis=-1, kind="stable")
    mask = ranks < k[:, None]
    inputs = np.where(mask, mask_id, image_ids)
    labels = np.where(mask, image_ids, IGNORE_ID)
    return inputs, labels, mask


def expected_mask_fraction(n: int, min_masking_rate: float = 0.0, grid: int = 200_001) -> float:
    """E[k]/N for t ~ U[0,1) by numerical integration (for statistical tests and docs): close to
    ∫cos(tπ/2)dt = 2/π ≈ 0.637 for large N and no minimum rate."""
    t = (np.arange(grid, dtype=np.float64) + 0.5) / grid
    p = np.maximum(np.cos(t * np.pi / 2), min_masking_rate)
    return float(np.maximum(np.round(n * p), 1).mean() / n)
