"""The reference's training losses (official `models/modeling_showo.py`, `Showo.forward`).

One forward runs over the rows ``[t2i | lm | mmu]``; each task has its own cross-entropy over the
**full** vocabulary with ignore index -100, averaged over the non-ignored positions:

* t2i rows: positions ``max_seq_length + 1 … L-1`` (soi, image tokens, eoi), **not shifted** — the
  logit at position i predicts the label at i (MaskGIT). soi/eoi labels are real ids, so they count.
* lm and mmu rows: the usual next-token shift (logit i predicts label i+1).

`reference_losses` computes exactly that from full logits (used to check against the fixture).
The trainer uses `loss_targets` + `task_sums` instead: it gathers only the positions that carry a
label before the vocabulary projection, which is the same sum of the same terms but never builds
the (rows × L × 58498) logits tensor for pads and unmasked image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

IGNORE_ID = -100
TASKS = ("t2i", "lm", "mmu")


@dataclass(frozen=True)
class TaskRows:
    """How many rows of a batch belong to each task, in the order t2i, lm, mmu."""

    t2i: int = 0
    lm: int = 0
    mmu: int = 0

    @property
    def total(self) -> int:
        return self.t2i + self.lm + self.mmu

    def slices(self) -> dict[str, slice]:
        a, b = self.t2i, self.t2i + self.lm
        return {"t2i": slice(0, a), "lm": slice(a, b), "mmu": slice(b, b + self.mmu)}


def token_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross-entropy in float32 over the whole vocabulary (no ignore handling)."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None].astype(mx.int32), axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def _masked_mean(logits: mx.array, labels: mx.array) -> mx.array:
    valid = labels != IGNORE_ID
    ce = token_cross_entropy(logits, mx.where(valid, labels, 0))
    # A task without labelled positions contributes nothing (torch would return NaN).
    return mx.where(valid, ce, 0.0).sum() / mx.maximum(valid.sum(), 1)


def reference_losses(logits: mx.array, labels, rows: TaskRows, max_seq_length: int) -> dict[str, mx.array]:
    """The three reference losses from full logits (B, L, V) and labels (B, L).

    A task with zero rows is left out. (The reference slices ``[-B_mmu:]``, which would take the
    whole batch for B_mmu = 0 — so that case is simply not computed here.)"""
    labels = mx.array(labels)
    out: dict[str, mx.array] = {}
    s = rows.slices()
    if rows.t2i:
        start = max_seq_length + 1
        out["t2i"] = _masked_mean(logits[s["t2i"], start:], labels[s["t2i"], start:])
    for task in ("lm", "mmu"):
        if getattr(rows, task):
            out[task] = _masked_mean(logits[s[task], :-1], labels[s[task], 1:])
    return out


@dataclass
class LossTargets:
    """The labelled positions of a batch, flattened: hidden-state index, target id, task index."""

    positions: np.ndarray  # (M,) index into hidden.reshape(B * L, H)
    targets: np.ndarray  # (M,) target token ids
    tasks: np.ndarray  # (M,) 0 = t2i, 1 = lm, 2 = mmu
    counts: np.ndarray  # (3,) number of labelled positions per task

    @property
    def size(self) -> int:
        return int(self.positions.size)


def loss_targets(labels: np.ndarray, rows: TaskRows, max_seq_length: int) -> LossTargets:
    """Which hidden states predict which labels, with exactly the reference's slicing."""
    labels = np.asarray(labels)
    b, length = labels.shape
    if b != rows.total:
        raise ValueError(f"labels have {b} rows but the task rows add up to {rows.total}")
    pos, tgt, task = [], [], []
    for t, (name, sl) in enumerate(rows.slices().items()):
        if sl.stop == sl.start:
            continue
        block = labels[sl]
        if name == "t2i":
            mask = np.zeros_like(block, dtype=bool)
            mask[:, max_seq_length + 1 :] = block[:, max_seq_length + 1 :] != IGNORE_ID
            r, p = np.nonzero(mask)
            target = block[r, p]
        else:  # shifted: hidden state at p predicts label at p + 1
            r, p = np.nonzero(block[:, 1:] != IGNORE_ID)
            target = block[r, p + 1]
        pos.append((r + sl.start) * length + p)
        tgt.append(target)
        task.append(np.full(r.shape, t))
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    tasks = cat(task, np.int32)
    return LossTargets(
        positions=cat(pos, np.int32),
        targets=cat(tgt, np.int32),
        tasks=tasks,
        counts=np.bincount(tasks, minlength=3).astype(np.int64),
    )


def task_sums(hidden: mx.array, head, targets: LossTargets) -> mx.array:
    """(3,) float32 sums of the cross-entropy per task. `hidden` (B, L, H) is the final-LayerNorm
    output; `head` maps (M, H) → (M, V) (the model's lm_head)."""
    if targets.size == 0:
        return mx.zeros((3,), mx.float32)
    h = hidden.reshape(-1, hidden.shape[-1])[mx.array(targets.positions)]
    ce = token_cross_entropy(head(h), mx.array(targets.targets))
    onehot = mx.array(targets.tasks[:, None] == np.arange(3)[None, :]).astype(mx.float32)
    return ce @ onehot
