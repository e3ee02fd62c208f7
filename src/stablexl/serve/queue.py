"""The job queue: one worker thread per model, FIFO, bounded, cancellable, results kept for a TTL.

Torch-free on purpose: a job carries a `run(job)` callable that does the work (in the worker thread) and
reports progress through `job.report(...)`. `report` is also where cancellation lands: a running job
stops at its next step because `report` raises `Cancelled` inside the sampler's callback.

The HTTP side never blocks on a job. It awaits `Job.changed(...)`, which the worker thread wakes with
`loop.call_soon_threadsafe`, so the event loop only ever sees finished Python objects.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("stablexl.serve")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)


class Cancelled(Exception):
    """Raised inside a running job (from `Job.report`) once a cancel was requested."""


class QueueFull(Exception):
    def __init__(self, pending: int, retry_after: int):
        super().__init__(f"the queue is full ({pending} jobs waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    id: str
    model: str
    run: Callable[[Job], Any]
    meta: dict = field(default_factory=dict)  # what the HTTP layer wants to show back (settings, origin)
    created: float = field(default_factory=time.time)
    state: str = QUEUED
    step: int = 0
    total: int = 0
    started: float | None = None
    finished: float | None = None
    preview: bytes | None = None  # PNG of the current latent, while running
    result: Any = None
    error: str | None = None
    error_kind: str | None = None  # "invalid" (the request's fault: ValueError & co.) or "internal"
    cancel_requested: bool = False
    slot: int = 0  # which of its model's workers (devices) runs it
    version: int = 0  # bumped on every change; waiters compare against it
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _waiters: list = field(default_factory=list, repr=False)
    _t_first: float | None = field(default=None, repr=False)  # monotonic time of the first progress report

    # ---- worker side ---------------------------------------------------------------------------

    def report(self, step: int, total: int, preview: bytes | None = None) -> None:
        """Progress from inside the work; raises Cancelled when a cancel was requested."""
        if self.cancel_requested:
            raise Cancelled()
        with self._lock:
            if self._t_first is None:
                self._t_first = time.monotonic()
            self.step, self.total = step, max(total, step)
            if preview is not None:
                self.preview = preview
        self.notify()

    def notify(self) -> None:
        with self._lock:
            self.version += 1
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # the waiter's loop is closed: nobody is listening any more
                pass

    # ---- reader side ---------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state in FINISHED

    def eta(self) -> float | None:
        """Seconds left for a running job, from its pace so far (None before the second step)."""
        with self._lock:
            if self.state != RUNNING or self._t_first is None or self.step < 2:
                return None
            pace = (time.monotonic() - self._t_first) / (self.step - 1)
            return max(0.0, pace * (self.total - self.step))

    async def changed(self, since: int, timeout: float | None = None) -> int:
        """Wait until `version` differs from `since` (or the timeout passes); returns the version."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.version != since:
                return self.version
            fut = loop.create_future()
            entry = (loop, fut)
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                if entry in self._waiters:
                    self._waiters.remove(entry)
        return self.version

    async def wait_done(self) -> None:
        version = -1
        while not self.done:
            version = await self.changed(version, timeout=30.0)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class _Lane:
    """One model's FIFO of waiting jobs, served by one worker thread per slot (a slot is a device the model
    is loaded on); `current[k]` is the job slot k is running."""

    def __init__(self, queue: JobQueue, model: str, slots: int):
        self.queue, self.model = queue, model
        self.pending: collections.deque[Job] = collections.deque()
        self.current: list[Job | None] = [None] * slots
        self.threads = [threading.Thread(target=self._loop, args=(k,), name=f"stablexl-worker-{model}-{k}", daemon=True)
                        for k in range(slots)]

    def running(self) -> list[Job]:
        return [j for j in self.current if j is not None]

    def _loop(self, slot: int) -> None:
        q = self.queue
        if q.thread_init is not None:
            q.thread_init()
        while True:
            with q._cond:
                while not self.pending and not q._stopping:
                    q._cond.wait()
                if q._stopping:
                    return
                job = self.pending.popleft()
                job.state, job.started, job.slot = RUNNING, time.time(), slot
                self.current[slot] = job
            job.notify()
            t0 = time.monotonic()
            try:
                result = job.run(job)
            except Cancelled:
                job.state = CANCELLED
            except (ValueError, FloatingPointError, MemoryError) as e:  # the pipeline's "bad input" contract
                job.error, job.error_kind, job.state = str(e), "invalid", FAILED
            except Exception as e:  # noqa: BLE001 - a bug; keep serving, report it on the job
                log.error("job %s failed:\n%s", job.id, traceback.format_exc())
                job.error, job.error_kind, job.state = f"internal error: {type(e).__name__}: {e}", "internal", FAILED
            else:
                job.result, job.state = result, SUCCEEDED
            finally:
                with q._cond:
                    self.current[slot] = None
                    job.finished = time.time()
                    job.preview = None  # previews are for running jobs only
                    q._record_duration(time.monotonic() - t0)
            job.notify()


class JobQueue:
    """Jobs by id, one FIFO per model served by `slots` workers (one per device the model is loaded on), at
    most `max_pending` jobs waiting (not counting running ones).

    Finished jobs are kept `ttl` seconds after they finish, whether or not anyone is still listening.
    """

    def __init__(self, models: list[str], max_pending: int = 32, ttl: float = 600.0,
                 thread_init: Callable[[], None] | None = None, slots: int = 1):
        if max_pending < 1:
            raise ValueError(f"queue size must be at least 1, got {max_pending}")
        self.max_pending, self.ttl, self.thread_init = max_pending, ttl, thread_init
        self._cond = threading.Condition()
        self._stopping = False
        self._jobs: dict[str, Job] = {}
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self._workers = {m: _Lane(self, m, slots) for m in models}
        self._mean_duration: float | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        for w in self._workers.values():
            for t in w.threads:
                t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything, let running jobs reach their next step, join the threads."""
        with self._cond:
            self._stopping = True
            for w in self._workers.values():
                for job in w.running():
                    job.cancel_requested = True
            self._cond.notify_all()
        for w in self._workers.values():
            for t in w.threads:
                if t.is_alive():
                    t.join(timeout)
        for w in self._workers.values():
            while w.pending:
                job = w.pending.popleft()
                job.state, job.finished = CANCELLED, time.time()
                job.notify()

    # ---- submitting and reading --------------------------------------------------------------------

    def submit(self, model: str, run: Callable[[Job], Any], *, job_id: str | None = None,
               meta: dict | None = None) -> Job:
        """Queue a job; raises QueueFull, KeyError (unknown model) or ValueError (job id in use)."""
        with self._cond:
            self._purge()
            worker = self._workers[model]
            pending = self.pending_count()
            if pending >= self.max_pending:
                raise QueueFull(pending, self.retry_after())
            job_id = job_id or uuid.uuid4().hex
            if job_id in self._jobs:
                raise ValueError(f"job id {job_id!r} is already in use")
            job = Job(id=job_id, model=model, run=run, meta=meta or {})
            self._jobs[job_id] = job
            worker.pending.append(job)
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            self._purge()
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Queued: cancelled at once. Running: stops at its next step. Finished: unchanged."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.done:
                return job
            worker = self._workers[job.model]
            if job in worker.pending:
                worker.pending.remove(job)
                job.state, job.finished = CANCELLED, time.time()
            else:
                job.cancel_requested = True
        job.notify()
        return job

    def remove(self, job_id: str) -> Job | None:
        """Forget a finished job (DELETE on a finished job). Returns it, or None if absent / not finished."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or not job.done:
                return None
            return self._jobs.pop(job_id)

    def running(self) -> list[Job]:
        with self._cond:
            return [j for w in self._workers.values() for j in w.running()]

    def position(self, job: Job) -> int | None:
        """0-based place among the jobs waiting for the same model, or None when not waiting."""
        with self._cond:
            try:
                return self._workers[job.model].pending.index(job)
            except ValueError:
                return None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is waiting or running (True), or until `timeout` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.pending_count() or any(w.running() for w in self._workers.values()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.1 if left is None else min(0.1, left))
        return True

    def cancel_pending(self, reason: str) -> int:
        """Cancel every waiting job (they never start); returns how many."""
        with self._cond:
            jobs = [j for w in self._workers.values() for j in w.pending]
            for w in self._workers.values():
                w.pending.clear()
            for j in jobs:
                j.state, j.finished, j.error = CANCELLED, time.time(), reason
        for j in jobs:
            j.notify()
        return len(jobs)

    def pending_count(self) -> int:
        with self._cond:
            return sum(len(w.pending) for w in self._workers.values())

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: one average job per worker (at least 1 s)."""
        mean = self._mean_duration or 1.0
        workers = sum(len(w.threads) for w in self._workers.values())
        return max(1, math.ceil(mean * max(1, self.pending_count()) / max(1, workers)))

    def status(self) -> dict:
        with self._cond:
            return {
                "pending": self.pending_count(), "max_pending": self.max_pending,
                "running": [j.id for w in self._workers.values() for j in w.running()],
                "workers": {m: {"pending": len(w.pending), "running": ([j.id for j in w.running()] or [None])[0]
                                if len(w.threads) == 1 else [j.id for j in w.running()]}
                            for m, w in self._workers.items()},
                "stored_jobs": len(self._jobs), "job_ttl": self.ttl,
            }

    # ---- internals ---------------------------------------------------------------------------------

    def _record_duration(self, seconds: float) -> None:
        m = self._mean_duration
        self._mean_duration = seconds if m is None else 0.8 * m + 0.2 * seconds

    def _purge(self) -> None:
        now = time.time()
        expired = [k for k, j in self._jobs.items() if j.done and j.finished is not None and now - j.finished > self.ttl]
        for k in expired:
            del self._jobs[k]
