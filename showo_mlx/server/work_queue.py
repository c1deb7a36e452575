"""The work queue: one model in memory, one request on it at a time.

A single worker thread owns the Pipeline: it loads the model (so MLX's per-thread state is the
worker's on every backend) and then runs jobs in arrival order. The event loop never touches the
model; it submits a `Job` and reads the job's events (text pieces, partial images, the result, or an
error) from an asyncio queue the worker fills with `call_soon_threadsafe`.

Every accepted job ends in exactly one terminal event ("done", "error" or "cancelled"), so no
request is lost; `stats` counts them. Beyond `max_queue` waiting jobs, `submit` raises `QueueFull`
with a Retry-After estimate from recent job durations. A job's `cancel()` (its client went away)
makes a waiting job be skipped and a running one stop at its next MaskGIT step or answer token.
"""

from __future__ import annotations

import asyncio
import collections
import math
import queue
import threading
import time
import traceback
from typing import Any, Callable

import mlx.core as mx

from ..errors import ShowoError
from ..maskgit import GenerationCancelled
from .errors import APIError

TERMINAL = ("done", "error", "cancelled")


class QueueFull(Exception):
    def __init__(self, retry_after: int, waiting: int):
        super().__init__(f"the server is busy: {waiting} requests are waiting; retry in about {retry_after} s")
        self.retry_after = retry_after


class JobCancelled(Exception):
    """Raised inside a job's work when its client has gone."""


class Job:
    """One request's work: `work(pipe, job)` runs on the worker thread and may `emit` events."""

    def __init__(self, name: str, work: Callable[[Any, "Job"], Any]):
        self.name = name
        self.work = work
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.started = threading.Event()

    def emit(self, kind: str, payload: Any = None) -> None:
        """Hand an event to the request's coroutine (thread-safe)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop has closed (server shut down); nobody is listening
            pass

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise JobCancelled if the client has gone (call between units of work)."""
        if self._cancelled.is_set():
            raise JobCancelled()


class WorkQueue:
    def __init__(self, loader: Callable[[], Any], max_queue: int, log: Callable[[str], None] = print):
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.max_queue = max_queue
        self._loader = loader
        self._log = log
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running: Job | None = None
        self._durations: collections.deque = collections.deque(maxlen=20)
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.pipe = None
        self.stats = {"accepted": 0, "completed": 0, "failed": 0, "cancelled": 0, "rejected": 0}
        self._thread = threading.Thread(target=self._run, name="showo-worker", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Any:
        """Start the worker, wait for the model to load and return the pipeline (or raise the
        loading error)."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        return self.pipe

    def close(self, timeout: float = 15.0) -> None:
        """Cancel whatever is waiting or running and stop the worker."""
        with self._lock:
            if self._running is not None:
                self._running.cancel()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._finish(job, "error", APIError(503, "the server is shutting down", code="shutting_down"), "failed")
        self._jobs.put(None)
        self._thread.join(timeout)

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._waiting >= self.max_queue and (self._running is not None or self._waiting > 0):
                self.stats["rejected"] += 1
                raise QueueFull(self._retry_after(), self._waiting)
            self._waiting += 1
            self.stats["accepted"] += 1
        self._jobs.put(job)
        return job

    def _retry_after(self) -> int:
        typical = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(typical * (self._waiting + 1)))

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def busy(self) -> bool:
        return self._running is not None

    # -- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        finally:
            # MLX needs a thread's streams destroyed by that thread before it ends; left to the
            # interpreter's exit, the cleanup aborts the process ("terminate called ...").
            clear = getattr(mx, "clear_streams", None)
            if clear is not None:
                clear()

    def _serve(self) -> None:
        try:
            self.pipe = self._loader()
        except BaseException as e:  # reported by start() in the main thread
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self._running = job
            try:
                self._execute(job)
            finally:
                with self._lock:
                    self._running = None

    def _execute(self, job: Job) -> None:
        if job.cancelled:  # the client left while waiting
            self._finish(job, "cancelled", None, "cancelled")
            return
        job.started.set()
        start = time.perf_counter()
        try:
            result = job.work(self.pipe, job)
        except (JobCancelled, GenerationCancelled):
            self._finish(job, "cancelled", None, "cancelled")
        except APIError as e:
            self._finish(job, "error", e, "failed")
        except ShowoError as e:
            self._finish(job, "error", APIError(400, str(e).splitlines()[0] if str(e) else type(e).__name__), "failed")
        except Exception as e:  # a bug: log it whole, tell the client one line
            self._log(f"error in {job.name}:\n{traceback.format_exc().rstrip()}")
            self._finish(job, "error", APIError(500, f"internal error ({type(e).__name__}); see the server log", code="internal_error"), "failed")
        else:
            self._finish(job, "done", result, "completed")
        finally:
            self._durations.append(time.perf_counter() - start)

    def _finish(self, job: Job, kind: str, payload: Any, counter: str) -> None:
        with self._lock:
            self.stats[counter] += 1
        job.emit(kind, payload)
