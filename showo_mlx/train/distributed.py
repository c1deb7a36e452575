"""Data parallel over `mx.distributed` (ring backend, launched with `mlx.launch`).

Every process holds the whole model and runs its own slice of each global batch (batches.py picks
the rows from the rank). After the backward pass the gradients are averaged with
`nn.average_gradients`; the trainer scales each rank's loss by the world size and divides by the
*global* number of labelled tokens, so that average is exactly the gradient of the one-process
loss over the whole global batch. Loss values for the progress bar are reduced with `all_sum`.
Only rank 0 logs and writes files.

Outside a launcher `mx.distributed.init(strict=False)` gives a group of size 1 and every
collective is a no-op, so the same code runs on one Mac.

Failure handling. MLX's collectives have no timeout: if one process stalls (stopped, swapping, a cut
link) the others wait inside ``all_sum`` forever, and `mlx.launch` reports exit code 0 even when a
rank died. So every collective here runs under a `CollectiveWatchdog`: a daemon thread that, when
one collective has waited longer than ``collective_timeout`` seconds, runs the failure hooks (the
trainer writes status.json), prints one line naming the rank and the collective, and ends the
process with exit code 4. It has to end the process: the waiting thread is blocked inside MLX's C++
socket code, where no Python exception can reach it. (MLX releases the GIL while it waits, which is
what lets the watchdog thread run.) A peer that *died* closes its sockets and MLX raises at once;
that becomes a one-line DistributedError. Alternatives considered: a heartbeat file per rank needs
a folder shared by all machines, and a heartbeat socket a second network channel; the watchdog
needs neither, catches every reason a collective does not return, and costs two clock reads per
collective. It cannot tell a slow peer from a stalled one, so the timeout must exceed the longest
legitimate gap between ranks (rank 0 alone writes checkpoints and validation images).

SIGTERM has the same problem: `showo train` turns it into an exception in the main thread, which
cannot be raised while that thread waits inside a collective. With `watch_signals` the watchdog
also reads the signal wake-up pipe (`signal.set_wakeup_fd`), and if the process is still blocked in
a collective two seconds after a SIGTERM, it ends it (status "interrupted", exit code 143).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import DistributedError, ShowoError

EXIT_STALLED = 4
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM
SIGNAL_GRACE = 2.0  # seconds the main thread gets to handle SIGTERM itself before the watchdog does


class CollectiveWatchdog:
    """Ends the process when one collective waits longer than `timeout` seconds (see the module
    docstring for why a thread and a hard exit). Entering and leaving a collective costs a clock
    read. Optionally (`watch_signals`) it also ends a process that got SIGTERM while blocked in a
    collective, where Python's own handler cannot run until the collective returns."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        # hook(message, status, exit_code) runs before the process ends (the trainer writes status.json)
        self.hooks: list[Callable[[str, str, int], None]] = []
        self.exit: Callable[[int], None] = os._exit  # replaceable in tests
        self._deadline: float | None = None
        self._what = ""
        self._started = 0.0
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="showo-collective-watchdog", daemon=True)
        self._thread.start()

    @property
    def waiting_in(self) -> str | None:
        """The collective this process is blocked in, or None."""
        return self._what if self._deadline is not None else None

    @contextlib.contextmanager
    def watch(self, what: str) -> Iterator[None]:
        self._what, self._started = what, time.monotonic()
        self._deadline = self._started + self.timeout
        self._wake.set()
        try:
            yield
        finally:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            deadline = self._deadline
            if deadline is None:
                self._wake.wait()  # idle until a collective starts
                self._wake.clear()
                continue
            now = time.monotonic()
            if now >= deadline and self._deadline == deadline:
                self._finish(
                    f"rank {self.rank}: waited {now - self._started:.0f} s in {self._what} for the other process(es) "
                    f"(collective_timeout: {self.timeout:g} s); a process has stalled or died, so this one stops",
                    "failed", EXIT_STALLED,
                )
                return
            time.sleep(min(0.5, max(0.01, deadline - now)))

    def watch_signals(self, fd: int) -> None:
        """`fd`: the read end of the pipe given to `signal.set_wakeup_fd`, into which the C-level
        signal handler writes each signal's number even while the main thread is inside MLX."""
        threading.Thread(target=self._signals, args=(fd,), name="showo-signal-watch", daemon=True).start()

    def _signals(self, fd: int) -> None:
        while True:
            try:
                select.select([fd], [], [])
                got = os.read(fd, 64)
            except BlockingIOError:
                continue
            except (OSError, ValueError):  # the pipe was closed: training is over
                return
            if signal.SIGTERM not in got:
                continue
            time.sleep(SIGNAL_GRACE)  # normally Python's handler stops the run in the meantime
            what = self.waiting_in
            if what is not None:
                self._finish(f"rank {self.rank}: terminated by SIGTERM while waiting in {what}", "interrupted",
                             EXIT_TERMINATED)
                return

    def _finish(self, message: str, status: str, code: int) -> None:
        for hook in self.hooks:
            try:
                hook(message, status, code)
            except BaseException:  # noqa: BLE001 - the exit below must happen whatever a hook does
                pass
        os.write(2, f"error: {message}\n".encode())
        self.exit(code)


@dataclass
class World:
    group: object | None
    rank: int = 0
    size: int = 1
    watchdog: CollectiveWatchdog | None = field(default=None, repr=False)
    step: int | None = None  # named in timeout and error messages

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def set_timeout(self, seconds: float) -> None:
        """Bound every later collective to `seconds` (0: no bound). No-op in a single process."""
        if self.size == 1:
            return
        timeout = seconds if seconds > 0 else float("inf")
        if self.watchdog is None:
            self.watchdog = CollectiveWatchdog(self.rank, timeout)
        self.watchdog.timeout = timeout

    def on_abort(self, hook: Callable[[str, str, int], None]) -> None:
        """Run `hook(message, status, exit_code)` (e.g. write a status file) before the watchdog
        ends this process."""
        if self.watchdog is not None:
            self.watchdog.hooks.append(hook)

    def _collective(self, name: str, run: Callable):
        """Run and evaluate one collective under the watchdog; a lost peer becomes one line."""
        what = name if self.step is None else f"{name} at step {self.step + 1}"
        guard = self.watchdog.watch(what) if self.watchdog is not None else contextlib.nullcontext()
        try:
            with guard:
                return run()
        except RuntimeError as e:  # e.g. "[ring] connection to a peer was lost"
            raise DistributedError(
                f"rank {self.rank}: {what} failed ({' '.join(str(e).split())[:120]}); another process has died or "
                "lost its connection; see its output"
            ) from None

    def all_sum(self, x: np.ndarray) -> np.ndarray:
        """Sum a small host array over all processes (counts, loss sums)."""
        if self.size == 1:
            return np.asarray(x)
        arr = mx.array(np.asarray(x, dtype=np.float64).astype(np.float32))
        return self._collective("all_sum", lambda: np.array(mx.distributed.all_sum(arr, group=self.group)))

    def all_gather_ints(self, values) -> np.ndarray:
        """(size, n) array of every rank's small integer vector (exact below 2**24)."""
        x = np.asarray(values, dtype=np.float32).reshape(1, -1)
        if self.size == 1:
            return x.astype(np.int64)
        out = self._collective("all_gather", lambda: np.array(mx.distributed.all_gather(mx.array(x), group=self.group)))
        return out.astype(np.int64)

    def average_gradients(self, grads):
        if self.size == 1:
            return grads
        # nn.average_gradients concatenates the leaves in tree order. Trees rebuilt by
        # mlx.utils.tree_merge (MultiOptimizer does that) order dict keys by a set, i.e. by string
        # hashes, which differ between processes: the ranks would then add up different
        # parameters. A canonical (sorted) order makes the layout identical on every rank.
        flat = sorted(tree_flatten(grads), key=lambda kv: kv[0])

        def reduce():
            out = nn.average_gradients(tree_unflatten(flat), group=self.group)
            mx.eval(out)  # the exchange happens here, so it must happen under the watchdog
            return out

        return self._collective("average_gradients", reduce)

    def barrier(self) -> None:
        if self.size > 1:
            self._collective("barrier", lambda: mx.eval(mx.distributed.all_sum(mx.array(0.0), group=self.group)))

    def agree(self, error: ShowoError | None, what: str) -> None:
        """Every rank reports whether `what` failed on it; if it failed anywhere, every rank raises
        (the failing ones their own error). Without this, a rank that fails alone leaves the others
        waiting in their next collective."""
        failed = self.all_gather_ints([1 if error is not None else 0])[:, 0]
        if error is not None:
            raise error
        if failed.any():
            rank = int(np.flatnonzero(failed)[0])
            raise DistributedError(f"rank {rank} failed during {what} (see its message); rank {self.rank} stops too")


def init_world(timeout: float = 0.0) -> World:
    group = mx.distributed.init(strict=False)
    world = World(group, group.rank(), group.size())
    world.set_timeout(timeout)
    return world
