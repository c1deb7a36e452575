"""Data parallel over `mx.distributed` (ring backend, launched with `mlx.launch`).

Every process holds the whole model and runs its own slice of each global batch (batches.py picks
the rows from the rank). After the backward pass the gradients are averaged with
`nn.average_gradients`; the trainer scales each rank's loss by the world size and divides by the
*global* number of labelled tokens, so that average is exactly the gradient of the one-process
loss over the whole global batch. Loss values for the progress bar are reduced with `all_sum`.
Only rank 0 logs and writes files.

Outside a launcher `mx.distributed.init(strict=False)` gives a group of size 1 and every
collective is a no-op, so the same code runs on one Mac.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten


@dataclass
class World:
    group: object | None
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, x: np.ndarray) -> np.ndarray:
        """Sum a small host array over all processes (counts, loss sums)."""
        if self.size == 1:
            return np.asarray(x)
        out = mx.distributed.all_sum(mx.array(np.asarray(x, dtype=np.float64).astype(np.float32)), group=self.group)
        return np.array(out)

    def all_gather_ints(self, values) -> np.ndarray:
        """(size, n) array of every rank's small integer vector (exact below 2**24)."""
        x = np.asarray(values, dtype=np.float32).reshape(1, -1)
        if self.size == 1:
            return x.astype(np.int64)
        return np.array(mx.distributed.all_gather(mx.array(x), group=self.group)).astype(np.int64)

    def average_gradients(self, grads):
        if self.size == 1:
            return grads
        # nn.average_gradients concatenates the leaves in tree order. Trees rebuilt by
        # mlx.utils.tree_merge (MultiOptimizer does that) order dict keys by a set, i.e. by string
        # hashes, which differ between processes: the ranks would then add up different
        # parameters. A canonical (sorted) order makes the layout identical on every rank.
        flat = sorted(tree_flatten(grads), key=lambda kv: kv[0])
        return nn.average_gradients(tree_unflatten(flat), group=self.group)

    def barrier(self) -> None:
        if self.size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(0.0), group=self.group))


def init_world() -> World:
    group = mx.distributed.init(strict=False)
    return World(group, group.rank(), group.size())
