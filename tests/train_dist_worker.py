"""A training run driven by a JSON config, for tests that need separate processes.

    mlx.launch -n 2 --backend ring python tests/train_dist_worker.py RUN.json [--per-rank-output]
    python tests/train_dist_worker.py RUN.json            (one process)

RUN.json holds TrainConfig keys plus "report": a path prefix where every rank writes what it
computed (`<report>.rank<r>.json`: losses per step and a parameter checksum) — outside the run
folder, so the test can check that only rank 0 wrote into the run folder. With
--per-rank-output each rank gets its own run folder (`<output>/rank<r>`), which lets the test see
that rank 1 never creates anything. Every rank first writes its process id to
`<report>.rank<r>.pid`, so a test can stop one of them.
"""

from __future__ import annotations

import json
import os
import sys

import mlx.core as mx
from mlx.utils import tree_flatten

from showo_mlx.train.config import TrainConfig
from showo_mlx.train.distributed import init_world
from showo_mlx.train.trainer import Trainer


def main(argv: list[str]) -> None:
    with open(argv[0]) as f:
        values = json.load(f)
    report = values.pop("report")
    world = init_world()
    with open(f"{report}.rank{world.rank}.pid", "w") as f:
        f.write(str(os.getpid()))
    if "--per-rank-output" in argv:
        values["output"] = f"{values['output']}/rank{world.rank}"
    cfg = TrainConfig.from_dict(values)
    trainer = Trainer(cfg, world=world, log=lambda m: print(f"[rank {world.rank}] {m}", flush=True))
    result = trainer.run()
    checksum = sum(float(mx.abs(v).sum()) for _, v in tree_flatten(trainer.params))
    with open(f"{report}.rank{world.rank}.json", "w") as f:
        json.dump({"rank": world.rank, "size": world.size, "checksum": checksum,
                   "losses": [r.losses for r in result.history]}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
