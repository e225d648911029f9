"""EnginePool: the server's one pool. Each worker thread owns an Engine whose sequences hold its live
jobs; every round each job's queries move one step (a decode, or up to `budget` prompt tokens) in the
same llama.cpp batches, and waiting jobs join between rounds as sequences free up.

Owns moving jobs between the event loop and the workers: admitting, the rounds, a client that left,
and the end of a job (its sequences settled and their states handed to the cache off the round,
by a thread of their own). Never speaks HTTP, never samples (jobs do) and never plans reuse.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace

from promptcache.engines.llama_cpp import LLM, Advance, Engine, Query
from promptcache.engines.llama_cpp.prompt_logprobs import PromptLogprobs
from promptcache.server.events import END, Event, Failed

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """What a job runs on: the worker's engine, an LLM handle on it (tokenizer, chat template) and
    the prompt log-probabilities every worker shares."""

    engine: Engine
    llm: LLM
    prompt_logprobs: PromptLogprobs
    # Held by the worker's thread while it starts jobs or runs a round; outside it, `busy` is every
    # sequence the live jobs hold (the rest are idle: free_idle may drop them).
    lock: threading.Lock = field(default_factory=threading.Lock)
    busy: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Ending:
    """What a job returns: the keys whose sequences go into the prefix cache, and work to run off
    the round before the job ends (writing a session file)."""

    cache: tuple[int, ...] = ()
    then: Callable[[], None] | None = None


# What a job is: a generator that yields the queries it needs answered (by key), is sent each key's
# Advance once all of them are done, and returns an Ending. It runs in its worker's thread.
JobRun = Generator[dict[int, Query], dict[int, Advance], Ending | None]


class QueueFullError(Exception):
    """Every sequence is taken and the queue holds its maximum; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"server busy; retry after {retry_after} s")
        self.retry_after = retry_after


class Job:
    """One request: `fn(worker, job)` makes its JobRun in the worker's thread and reports through
    `emit`; the event loop reads `events` (then END) and may `cancel()` at any time. `sequences`: the
    sequences it holds at once (a request's n choices)."""

    def __init__(
        self,
        fn: Callable[[Worker, Job], JobRun],
        loop: asyncio.AbstractEventLoop,
        sequences: int = 1,
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.sequences = sequences
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.started: float | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the worker to stop; a job not started yet is skipped, a running one stops at its next round."""
        self._cancelled.set()

    @property
    def queue_seconds(self) -> float:
        return (self.started or time.perf_counter()) - self.submitted

    def emit(self, event: Event) -> None:
        """Hand an event to the event loop (called from a worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody listens
            self.cancel()


@dataclass
class _Live:
    """A job between two rounds: the queries it waits on, what they got, their sequences."""

    job: Job
    run: JobRun
    asks: dict[int, Query]
    got: dict[int, Advance] = field(default_factory=dict)
    first: dict[int, Advance] = field(default_factory=dict)
    rows: dict[int, list] = field(default_factory=dict)
    seqs: dict[int, int] = field(default_factory=dict)


class EnginePool:
    """`len(engines)` worker threads, each batching up to engine.n_seq sequences of live jobs; at most
    `max_queue` jobs wait while every sequence is taken. `budget`: prompt tokens a job evaluates per
    round, so the streams already running keep producing tokens. A job that raises hands the error to
    the event loop; unless it is one of `expected` (errors answered to the client), the worker's
    engine drops its sequences."""

    def __init__(
        self,
        engines: list[Engine],
        *,
        max_queue: int,
        budget: int,
        expected: tuple[type[Exception], ...] = (),
    ) -> None:
        if not engines:
            raise ValueError("a pool needs at least one engine")
        memo = PromptLogprobs()
        self.workers = [Worker(e, LLM(engine=e), memo) for e in engines]
        self.max_queue = max_queue
        self.budget = budget
        self.expected = expected
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._busy = 0
        self._mean_job_s = 1.0
        self._running: set[Job] = set()
        self._endings: queue.SimpleQueue[tuple[Job, Engine, list, Ending] | None] = (
            queue.SimpleQueue()
        )
        self._threads = [
            threading.Thread(
                target=self._work, args=(w,), name=f"promptcache-worker-{i}", daemon=True
            )
            for i, w in enumerate(self.workers)
        ]
        self._threads.append(
            threading.Thread(target=self._end_jobs, name="promptcache-cache-writer", daemon=True)
        )
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ facts

    @property
    def engines(self) -> list[Engine]:
        return [w.engine for w in self.workers]

    @property
    def size(self) -> int:
        """Worker threads."""
        return len(self.workers)

    @property
    def parallel(self) -> int:
        """Sequences (requests at once) per worker."""
        return self.workers[0].engine.n_seq

    @property
    def sequences(self) -> int:
        """Requests served at once."""
        return sum(e.n_seq for e in self.engines)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the engines' KV caches (allocated when a worker starts its first job)."""
        return sum(e.kv_bytes for e in self.engines)

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def waiting(self) -> int:
        with self._lock:
            return max(0, self._in_flight - self._busy)

    def engine_stats(self) -> dict[str, int]:
        """The engines' counters (Engine.stats), summed; peak_sequences is the largest."""
        out: dict[str, int] = {}
        for engine in self.engines:
            for name, value in engine.stats.as_dict().items():
                peak = name == "peak_sequences"
                out[name] = max(out.get(name, 0), value) if peak else out.get(name, 0) + value
        return out

    def free_idle(self) -> int:
        """Drop every sequence no running job holds (between rounds), in every engine; returns
        how many (any thread: each worker's lock is taken in turn)."""
        dropped = 0
        for worker in self.workers:
            with worker.lock:
                dropped += worker.engine.free_idle(worker.busy)
        return dropped

    # ------------------------------------------------------------ the event loop's side

    def submit(self, job: Job) -> None:
        """Queue `job`. Raises QueueFullError when every sequence is taken and max_queue jobs wait."""
        with self._lock:
            if self._in_flight >= self.sequences + self.max_queue:
                waiting = self._in_flight - self._busy
                raise QueueFullError(
                    max(1, min(60, math.ceil(self._mean_job_s * (waiting + 1) / self.sequences)))
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
                job.emit(END)
        with self._lock:
            for job in self._running:
                job.cancel()
        for _ in self.workers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads[:-1]:
            t.join(max(0.0, deadline - time.monotonic()))
        self._endings.put(None)
        self._threads[-1].join(max(0.0, deadline - time.monotonic()))
        for engine in self.engines:
            engine.close()

    # ------------------------------------------------------------ a worker

    def _work(self, worker: Worker) -> None:
        engine = worker.engine
        live: list[_Live] = []
        held: Job | None = None  # taken from the queue, waiting for enough free sequences
        while True:
            free = engine.n_seq - sum(item.job.sequences for item in live)
            while True:
                if held is None:
                    try:
                        held = self._queue.get(block=not live)
                    except queue.Empty:
                        break
                    if held is None:  # close(): stop
                        for item in live:
                            item.job.cancel()
                            self._drop(item)
                        return
                if held.cancelled or held.sequences <= free or not live:
                    job, held = held, None
                    with worker.lock:
                        item = self._start(worker, job)
                    if item is not None:
                        live.append(item)
                        free -= job.sequences
                    continue
                break
            with worker.lock:
                live = [item for item in live if not self._left(item)]
                if live:
                    live = self._round(worker, live)
                worker.busy = {seq for item in live for seq in item.seqs.values()}

    def _start(self, worker: Worker, job: Job) -> _Live | None:
        """Begin a job: make its run and take its first queries (or its ending)."""
        self._began(job)
        if job.cancelled:
            self._ended(job)
            return None
        try:
            run = job.fn(worker, job)
            asks = next(run)
            return _Live(job, run, asks)
        except StopIteration as stop:
            self._finish(worker, _Live(job, iter(()), {}), stop.value)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - a worker must survive anything a request does
            self._failed(worker, job, exc, [])
            self._ended(job)
        return None

    def _left(self, item: _Live) -> bool:
        """Drop a job whose client left: its generator closes, its sequences become evictable."""
        if not item.job.cancelled:
            return False
        self._drop(item)
        return True

    def _drop(self, item: _Live) -> None:
        try:
            item.run.close()
        except Exception:  # noqa: BLE001 - closing must not take the worker down
            log.exception("a request failed while closing")
        self._ended(item.job)

    def _round(self, worker: Worker, live: list[_Live]) -> list[_Live]:
        """One engine round over every live job's unanswered queries; returns the jobs still live."""
        wanted = [
            (item, key, replace(q, hint=item.seqs.get(key, q.hint)))
            for item in live
            for key, q in item.asks.items()
            if key not in item.got
        ]
        try:
            advances = worker.engine.advance([q for _, _, q in wanted], budget=self.budget)
        except Exception as exc:  # noqa: BLE001 - fail this round's jobs, keep the worker
            for item in live:
                self._failed(worker, item.job, exc, list(item.seqs.values()))
                self._drop(item)
            return []
        for (item, key, _), adv in zip(wanted, advances, strict=True):
            if adv.seq is None:
                continue  # waits for a sequence or for another job's prefix
            item.seqs[key] = adv.seq
            first = item.first.setdefault(key, adv)
            item.rows.setdefault(key, []).extend(adv.rows)
            if adv.done:
                rows = item.rows.pop(key)
                item.got[key] = replace(adv, reused=first.reused, source=first.source, rows=rows)
        still = []
        for item in live:
            if any(key not in item.got for key in item.asks):
                still.append(item)
                continue
            got, item.got, item.first = item.got, {}, {}
            try:
                item.asks = item.run.send(got)
                still.append(item)
            except StopIteration as stop:
                self._finish(worker, item, stop.value)
            except Exception as exc:  # noqa: BLE001 - a request's own failure ends only it
                self._failed(worker, item.job, exc, [])
                self._drop(item)
        return still

    def _finish(self, worker: Worker, item: _Live, ending: Ending | None) -> None:
        """A job returned: settle the sequences it names and read their states now (the cells
        change next round); the states go to the cache, and the job ends, off the round."""
        ending = ending or Ending()
        engine, states = worker.engine, []
        for key in ending.cache:
            seq = item.seqs.get(key)
            if seq is None or seq not in engine.sequences:
                continue
            engine.settle(seq)
            states += engine.snapshot(seq)
        self._endings.put((item.job, engine, states, ending))

    def _end_jobs(self) -> None:
        """The cache writer: stores what finished jobs computed, then ends them (END follows the
        store, so a client's next request finds it)."""
        while True:
            entry = self._endings.get()
            if entry is None:
                return
            job, engine, states, ending = entry
            try:
                engine.store(states)
                if ending.then is not None:
                    ending.then()
            except Exception as exc:  # noqa: BLE001 - a failed write must not stop the writer
                if not isinstance(exc, self.expected):
                    log.exception("ending a request failed")
                job.emit(Failed(exc))
            self._ended(job)

    # ------------------------------------------------------------ bookkeeping

    def _began(self, job: Job) -> None:
        with self._lock:
            self._busy += 1
            self._running.add(job)
        job.started = time.perf_counter()

    def _failed(self, worker: Worker, job: Job, exc: Exception, seqs: list[int]) -> None:
        """Hand the error to the client; an unexpected one also drops the job's sequences (their
        cells may be half written)."""
        if not isinstance(exc, self.expected):
            log.error("a request failed inside a worker", exc_info=exc)
            for seq in seqs:
                if seq in worker.engine.sequences:
                    worker.engine.free(seq)
        job.emit(Failed(exc))

    def _ended(self, job: Job) -> None:
        elapsed = time.perf_counter() - (job.started or job.submitted)
        with self._lock:
            self._busy -= 1
            self._running.discard(job)
            self._in_flight -= 1
            self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * elapsed
        job.emit(END)


__all__ = ["END", "Ending", "EnginePool", "Job", "JobRun", "QueueFullError", "Worker"]
