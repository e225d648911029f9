"""BatchPool: continuous batching. Each worker thread owns one SequenceEngine whose sequences hold
several live requests; every round, each live request moves one decode step (and a new one up to
`budget` prompt tokens), all in the same llama.cpp batches, and new requests join between rounds.

Owns the rounds: admitting jobs as sequences free up, handing each job's token lists to the engine
and the logits back, dropping a job the client left. The request logic itself is a generator
(jobs.batched_job); other jobs (sessions, ...) are plain functions, run between two rounds on the
worker's LLM. Never speaks HTTP and never samples.
"""

from __future__ import annotations

import inspect
import logging
import queue
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from promptcache.server.pool import Job, WorkerPool

if TYPE_CHECKING:
    from promptcache.engines.sequences import Advance, SequenceEngine

log = logging.getLogger(__name__)


@dataclass
class _Live:
    """A job between two rounds: what it asks for, what it got, and the sequence each key last used."""

    job: Job
    run: Any  # the job's generator (jobs.BatchedRun)
    asks: list[tuple[int, list[int]]]
    got: dict[int, Advance] = field(default_factory=dict)
    first: dict[int, Advance] = field(default_factory=dict)  # the round that first placed each key
    seqs: dict[int, int] = field(default_factory=dict)
    prompted: bool = False  # its first asks (the prompt) have been answered


class BatchPool(WorkerPool):
    """`len(engines)` worker threads, each batching up to engine.n_seq sequences of live requests;
    at most `max_queue` jobs wait while every sequence is taken. `budget`: prompt tokens a new
    request evaluates per round (so the streams already running keep producing tokens)."""

    def __init__(
        self,
        engines: list[SequenceEngine],
        *,
        max_queue: int,
        expected: tuple[type[Exception], ...] = (),
        budget: int = 256,
    ) -> None:
        self.engines = engines
        self.budget = budget
        super().__init__([e.llm for e in engines], max_queue=max_queue, expected=expected)

    def _units(self) -> list[Any]:
        return list(self.engines)

    @property
    def slots(self) -> int:
        return sum(e.n_seq for e in self.engines)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the engines' KV caches (allocated whole when a worker starts its first request)."""
        return sum(e.kv_bytes for e in self.engines)

    def engine_stats(self) -> dict[str, int] | None:
        """The engines' counters (SequenceEngine.stats), summed; peak_sequences is the largest."""
        out: dict[str, int] = {}
        for engine in self.engines:
            for name, value in engine.stats.as_dict().items():
                out[name] = (
                    max(out.get(name, 0), value)
                    if name == "peak_sequences"
                    else out.get(name, 0) + value
                )
        return out

    def close(self, timeout: float = 10.0) -> None:
        super().close(timeout)
        for engine in self.engines:
            engine.close()

    # ------------------------------------------------------------ the worker

    def _work(self, engine: SequenceEngine) -> None:  # type: ignore[override]
        live: list[_Live] = []
        held: Job | None = None  # taken from the queue, waiting for enough free sequences
        while True:
            free = engine.n_seq - sum(item.job.slots for item in live)
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
                if held.cancelled or held.slots <= free or not live:
                    job, held = held, None
                    item = self._start(engine, job)
                    if item is not None:
                        live.append(item)
                        free -= job.slots
                    continue
                break
            live = [item for item in live if not self._left(item)]
            if live:
                live = self._round(engine, live)

    def _start(self, engine: SequenceEngine, job: Job) -> _Live | None:
        """Begin a job: a plain function runs to its end now; a generator is primed and goes live."""
        self._began(job)
        if job.cancelled:
            self._ended(job)
            return None
        try:
            run = job.fn(engine.llm, job)
            if inspect.isgenerator(run):
                asks = next(run, None)
                if asks is not None:
                    return _Live(job, run, asks)
        except Exception as exc:  # noqa: BLE001 - a worker must survive anything a request does
            self._failed(job, exc, engine.llm.reset_context)
        self._ended(job)
        return None

    def _left(self, item: _Live) -> bool:
        """Drop a job whose client left (its generator closes: the request is counted cancelled)."""
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

    def _round(self, engine: SequenceEngine, live: list[_Live]) -> list[_Live]:
        """One engine round over every live job's missing token lists; returns the jobs still live."""
        wanted = [(item, key, q) for item in live for key, q in item.asks if key not in item.got]
        prompts = [not item.prompted for item, _, _ in wanted]  # cached however short, as LLM does
        try:
            advances = engine.advance(
                [q for _, _, q in wanted],
                hints=[item.seqs.get(key) for item, key, _ in wanted],
                budget=self.budget,
                keep=prompts,
            )
        except Exception as exc:  # noqa: BLE001 - fail this round's jobs, keep the worker
            for item in live:
                self._failed(item.job, exc, engine.clear)
                self._drop(item)
            return []
        for (item, key, _), adv in zip(wanted, advances, strict=True):
            if adv.seq is None:
                continue  # waits for another job's prefix
            item.seqs[key] = adv.seq
            first = item.first.setdefault(key, adv)
            if adv.logits is not None:
                item.got[key] = replace_reuse(adv, first)
        still = []
        for item in live:
            if any(key not in item.got for key, _ in item.asks):
                still.append(item)
                continue
            got, item.got, item.first, item.prompted = item.got, {}, {}, True
            try:
                item.asks = item.run.send(got)
                still.append(item)
            except StopIteration as stop:
                self._keep(engine, item, stop.value)
                self._ended(item.job)
            except Exception as exc:  # noqa: BLE001 - a request's own failure ends only it
                self._failed(item.job, exc, lambda: None)
                self._drop(item)
        return still

    def _keep(self, engine: SequenceEngine, item: _Live, key: int | None) -> None:
        """Cache the sequence a finished job names (a chat's reply comes back in its next turn)."""
        seq = item.seqs.get(key) if key is not None else None
        if seq is not None:
            try:
                engine.save(seq)
            except ValueError:  # evicted meanwhile: nothing to keep
                pass


def replace_reuse(adv: Advance, first: Advance) -> Advance:
    """adv with the reuse its query found when first placed (later rounds reuse its own progress)."""
    if adv is first:
        return adv
    from dataclasses import replace

    return replace(adv, reused=first.reused, source=first.source)


__all__ = ["BatchPool"]
