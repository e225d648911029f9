"""WorkerPool: a few LLM instances, each owned by one thread, fed from one bounded queue of jobs.

Moves jobs between the event loop and the worker threads and keeps workers alive; it does not know
HTTP or the OpenAI format (the app turns requests into jobs and events into responses).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from promptcache.engines.llama_cpp import LLM

log = logging.getLogger(__name__)

END = ("end",)


class QueueFullError(Exception):
    """Every worker is busy and the queue holds its maximum; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"server busy; retry after {retry_after} s")
        self.retry_after = retry_after


class Job:
    """One unit of work for a worker: `fn(llm, job)` runs in the worker's thread and reports through
    `emit`; the event loop reads `events` (a tuple per event, then END) and may `cancel()` at any time."""

    def __init__(self, fn: Callable[[LLM, Job], None], loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn
        self.loop = loop
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.slots = 1  # sequences it holds at once in a BatchPool (a request's n choices)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the worker to stop; a job not started yet is skipped, a running one stops at its next token."""
        self._cancelled.set()

    @property
    def queue_seconds(self) -> float:
        return (self.started or time.perf_counter()) - self.submitted

    def emit(self, *event: Any) -> None:
        """Hand an event to the event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody listens
            self.cancel()


class WorkerPool:
    """`len(llms)` worker threads; at most `max_queue` jobs wait while every worker is busy.

    A job that raises hands the exception to the event loop as ("error", exc); unless it is one of
    `expected` (errors answered to the client, raised before generation), the worker's context is reset.
    """

    def __init__(
        self, llms: list[LLM], *, max_queue: int, expected: tuple[type[Exception], ...] = ()
    ) -> None:
        if not llms:
            raise ValueError("a pool needs at least one LLM")
        self.llms = llms
        self.expected = expected
        self.max_queue = max_queue
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._busy = 0
        self._mean_job_s = 1.0
        self._running: set[Job] = set()
        self._kv_per_token: int | None = None
        self._threads = [
            threading.Thread(
                target=self._work, args=(unit,), name=f"promptcache-worker-{i}", daemon=True
            )
            for i, unit in enumerate(self._units())
        ]
        for t in self._threads:
            t.start()

    def _units(self) -> list[Any]:
        """What each worker thread owns (an LLM here)."""
        return list(self.llms)

    @property
    def size(self) -> int:
        """Worker threads."""
        return len(self.llms)

    @property
    def slots(self) -> int:
        """Requests served at once (one per worker here)."""
        return self.size

    def engine_stats(self) -> dict[str, int] | None:
        """Counters of a batching engine (None: workers run one request at a time)."""
        return None

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV cache the workers' contexts hold now (a context grows with its prompts)."""
        from promptcache.engines.sequences import kv_bytes_per_token

        if self._kv_per_token is None:
            self._kv_per_token = kv_bytes_per_token(self.llms[0].model)
        return sum(llm.context_size for llm in self.llms) * self._kv_per_token

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def waiting(self) -> int:
        with self._lock:
            return max(0, self._in_flight - self._busy)

    def submit(self, job: Job) -> None:
        """Queue `job`. Raises QueueFullError when all workers are busy and max_queue jobs already wait."""
        with self._lock:
            if self._in_flight >= self.slots + self.max_queue:
                waiting = self._in_flight - self._busy
                raise QueueFullError(
                    max(1, min(60, math.ceil(self._mean_job_s * (waiting + 1) / self.slots)))
                )
            self._in_flight += 1
        self._queue.put(job)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every job, stop the workers and free their contexts."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.emit(*END)
        with self._lock:
            for job in self._running:
                job.cancel()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for llm in self.llms:
            llm.close()

    def _work(self, llm: LLM) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._began(job)
            try:
                if not job.cancelled:
                    job.fn(llm, job)
            except Exception as exc:  # noqa: BLE001 - a worker must survive anything a request does
                self._failed(job, exc, llm.reset_context)
            finally:
                self._ended(job)

    def _began(self, job: Job) -> None:
        with self._lock:
            self._busy += 1
            self._running.add(job)
        job.started = time.perf_counter()

    def _failed(self, job: Job, exc: Exception, reset: Callable[[], None]) -> None:
        """Hand the error to the client; an unexpected one also resets the worker's context."""
        if not isinstance(exc, self.expected):
            log.error("a request failed inside a worker; resetting its context", exc_info=exc)
            reset()
        job.emit("error", exc)

    def _ended(self, job: Job) -> None:
        elapsed = time.perf_counter() - (job.started or job.submitted)
        with self._lock:
            self._busy -= 1
            self._running.discard(job)
            self._in_flight -= 1
            self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * elapsed
        job.emit(*END)
