"""Data parallel for real: `mlx.launch -n 2 --backend ring python tests/train_dist_worker.py`.

A two-process run with batch b per process must equal a one-process run with batch 2b (same rows,
loss normalised over the global batch, gradients averaged), the two ranks must hold identical
weights, and only rank 0 may write into the run folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_train_data import make_pairs, make_text

WORKER = Path(__file__).resolve().parent / "train_dist_worker.py"
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")


def _launcher() -> str | None:
    local = Path(sys.executable).parent / "mlx.launch"
    return str(local) if local.exists() else shutil.which("mlx.launch")


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 65000:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The stock Linux wheel's BLAS is slow; Debian's OpenBLAS makes these runs ~5x faster. One
    # thread per process: the two ranks share this machine's cores.
    if OPENBLAS.exists() and sys.platform == "linux":
        env["LD_PRELOAD"] = str(OPENBLAS)
        env["OPENBLAS_NUM_THREADS"] = "1"
        if "avx512f" in Path("/proc/cpuinfo").read_text():
            env["OPENBLAS_CORETYPE"] = "SkylakeX"
    return env


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_two_process_data_parallel_equals_one_big_batch(converted, tmp_path):
    launcher = _launcher()
    if launcher is None:
        pytest.skip("mlx.launch is not installed (it comes with the mlx package)")
    from showo_mlx.train.prepare import prepare

    prepare(str(make_pairs(tmp_path / "pairs")), tmp_path / "prep", model=str(converted), log=lambda m: None, progress=False)
    base = dict(model=str(converted), data=str(tmp_path / "prep"), lm_data=str(make_text(tmp_path / "lm.txt")),
                max_steps=4, lr=2e-3, warmup_steps=1, save_every=2, progress=False, log_every=1, max_grad_norm=1.0)
    two = {**base, "batch_t2i": 1, "batch_lm": 1, "batch_mmu": 1, "output": str(tmp_path / "two"), "report": str(tmp_path / "two")}
    one = {**base, "batch_t2i": 2, "batch_lm": 2, "batch_mmu": 2, "output": str(tmp_path / "one"), "report": str(tmp_path / "one")}
    (tmp_path / "two.json").write_text(json.dumps(two))
    (tmp_path / "one.json").write_text(json.dumps(one))

    _run([launcher, "-n", "2", "--backend", "ring", "--starting-port", str(_free_port_pair()),
          sys.executable, str(WORKER), str(tmp_path / "two.json"), "--per-rank-output"])
    _run([sys.executable, str(WORKER), str(tmp_path / "one.json")])

    r0, r1, single = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two.rank0", "two.rank1", "one.rank0"))
    assert (r0["size"], r1["size"], single["size"]) == (2, 2, 1)
    assert r0["checksum"] == r1["checksum"]  # the replicas never drift apart
    assert r0["losses"] == r1["losses"]  # loss values are reduced with all_sum
    for a, b in zip(r0["losses"], single["losses"]):
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5), (k, r0["losses"], single["losses"])
    assert r0["checksum"] == pytest.approx(single["checksum"], rel=1e-5)

    # only rank 0 wrote: rank 1's run folder was never created
    assert not (tmp_path / "two" / "rank1").exists()
    ckpts = sorted(p.name for p in (tmp_path / "two" / "rank0" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]
    state = json.loads((tmp_path / "two" / "rank0" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["data"]["t2i"]["global_batch"] == 2
    w2 = mx.load(str(tmp_path / "two" / "rank0" / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    w1 = mx.load(str(tmp_path / "one" / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    assert set(w1) == set(w2)
    diff = np.concatenate([np.abs(np.array(w2[k]) - np.array(w1[k])).ravel() for k in w1])
    # Float summation order only: 99% of the weights agree to 1e-5. Adam's m/√v turns the last-bit
    # noise of gradients that are ~0 by symmetry (e.g. the k-LayerNorm bias, which shifts every
    # score of a query alike) into steps of up to lr, so the rest is bounded by 2·lr.
    assert np.quantile(diff, 0.99) < 1e-5 and diff.max() < 2 * base["lr"], (np.quantile(diff, 0.99), diff.max())
