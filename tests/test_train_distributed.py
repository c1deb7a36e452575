"""Data parallel for real: `mlx.launch -n 2 --backend ring python tests/train_dist_worker.py`.

A two-process run with batch b per process must equal a one-process run with batch 2b (same rows,
loss normalised over the global batch, gradients averaged), the two ranks must hold identical
weights, and only rank 0 may write into the run folder.
"""

from __future__ import annotations

import contextlib
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


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its launcher to reap it counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="watches the ranks through /proc (Linux)")
def test_a_stalled_rank_stops_the_run_within_the_timeout(converted, tmp_path):
    """SIGSTOP rank 1 mid-run: rank 0 used to wait in all_sum forever; now its watchdog ends it
    after collective_timeout with exit code 4 and a "failed" status.json."""
    import signal
    import time

    from test_train_inputs import write_prepared

    launcher = _launcher()
    if launcher is None:
        pytest.skip("mlx.launch is not installed (it comes with the mlx package)")
    timeout = 6.0
    run, report = tmp_path / "run", tmp_path / "stall"
    cfg = dict(model=str(converted), data=str(write_prepared(tmp_path / "prep")), output=str(run), report=str(report),
               batch_t2i=1, batch_lm=0, batch_mmu=0, max_seq_length=8, max_steps=100_000, warmup_steps=0,
               save_every=100_000, progress=False, log_every=100_000, collective_timeout=timeout)
    (tmp_path / "stall.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([launcher, "-n", "2", "--backend", "ring", "--starting-port", str(_free_port_pair()),
                             sys.executable, str(WORKER), str(tmp_path / "stall.json")],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # both ranks up and training
            log = run / "log.jsonl"
            if log.exists() and log.read_text().count("\n") >= 1 and Path(f"{report}.rank1.pid").exists():
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        else:
            raise AssertionError("the two ranks did not start training")
        pids = [int(Path(f"{report}.rank{r}.pid").read_text()) for r in range(2)]
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.monotonic()
        while _alive(pids[0]) and time.monotonic() - stopped < timeout + 20:
            time.sleep(0.1)
        took = time.monotonic() - stopped
        assert not _alive(pids[0]), "rank 0 still waits for the stopped rank"
        # at least one full timeout, and not much more (the watchdog polls twice a second)
        assert timeout - 1 <= took <= timeout + 5, took
    finally:
        for pid in pids[1:]:  # mlx.launch SIGTERMs the other ranks, which a stopped rank only gets when continued
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert "error: rank 0: waited" in err and "collective_timeout: 6 s" in err, err[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and status["exit_code"] == 4 and status["step"] >= 1, status
    assert "stalled or died" in status["message"] and status["run_id"] == json.loads((run / "run.json").read_text())["run_id"]
    # the launcher's own exit code says nothing: documented in docs/TRAINING.md
    assert "exited with code 4" in err


def test_watchdog_ends_a_process_blocked_in_a_collective(monkeypatch):
    """The watchdog itself, without processes: a collective past its timeout, one that returns in
    time, and SIGTERM arriving while blocked (the exit is replaced so the test process survives)."""
    import signal
    import threading
    import time

    from showo_mlx.train import distributed
    from showo_mlx.train.distributed import CollectiveWatchdog

    monkeypatch.setattr(distributed, "SIGNAL_GRACE", 0.1)

    def watchdog(timeout):
        dog = CollectiveWatchdog(rank=3, timeout=timeout)
        calls, ended = [], threading.Event()
        dog.hooks.append(lambda message, status, code: calls.append((message, status, code)))
        dog.exit = lambda code: (calls.append(code), ended.set())
        return dog, calls, ended

    dog, calls, ended = watchdog(0.3)
    with dog.watch("all_sum at step 7"):
        assert ended.wait(5)  # "blocked" in the collective until the watchdog acts
    (message, status, code), exit_code = calls
    assert message.startswith("rank 3: waited 0 s in all_sum at step 7") and "collective_timeout: 0.3 s" in message
    assert (status, code, exit_code) == ("failed", 4, 4)

    dog, calls, ended = watchdog(0.3)
    for _ in range(2):
        with dog.watch("barrier"):
            time.sleep(0.05)
        time.sleep(0.3)  # between collectives the clock does not run
    assert not ended.wait(0.1) and calls == []

    dog, calls, ended = watchdog(100.0)
    read_fd, write_fd = os.pipe()
    dog.watch_signals(read_fd)
    os.write(write_fd, bytes([signal.SIGTERM]))  # outside a collective: Python's handler does the work
    assert not ended.wait(0.3)
    with dog.watch("average_gradients at step 2"):
        os.write(write_fd, bytes([signal.SIGTERM]))
        assert ended.wait(5)
    assert calls == [("rank 3: terminated by SIGTERM while waiting in average_gradients at step 2", "interrupted", 143), 143]
    os.close(write_fd)
    os.close(read_fd)
