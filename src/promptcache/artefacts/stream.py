"""Prefetch: a background thread runs a batch producer ahead of its consumer, through a bounded queue.

Owns the thread, the queue, shutdown and error hand-over; never knows what a batch holds or where it comes from.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_POLL = 0.05
"""Seconds a blocked producer waits before checking whether the consumer closed the stream."""


class _End:
    pass


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _produce(source: Iterator[Any], out: queue.Queue[Any], stop: threading.Event) -> None:
    """Thread body: move items from `source` into `out` until it ends, fails, or `stop` is set.

    Holds no reference to the BatchStream, so an abandoned stream is collected and its finalizer stops this.
    """

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in source:
            if not offer(item):
                break
        else:
            offer(_End())
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the consumer, which re-raises it
        offer(_Failure(exc))
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()  # a generator's finally clauses (temp cleanup) run here, in the producer thread


class BatchStream(Generic[T]):
    """An iterator over a producer's batches; with prefetch > 0 they are made ahead in a background thread.

    prefetch: how many batches may wait, made, in the queue (0: each batch is made when asked for,
    in the consumer's thread). The producer blocks when the queue is full; an exception it raises is
    re-raised by the consumer's next `next()`, after the batches made before it. close() (also on
    `with` exit and when the stream is garbage-collected) stops the producer, waits for its thread and
    runs the producer's cleanup; closing twice is harmless.

    `key` and `from_cache` say, for a DatasetCache stream, which artefact it reads or fills and
    whether it was a hit. Counters: `batches` handed out, `stalls` (times the consumer found no batch ready and waited),
    `wait_seconds` (its total wait), `stalls_after(n)` (stalls after the first n batches: warm-up).
    """

    def __init__(
        self,
        source: Iterator[T],
        prefetch: int = 4,
        *,
        key: str | None = None,
        from_cache: bool | None = None,
        name: str = "promptcache-prefetch",
    ) -> None:
        """Start producing from `source` (a generator or iterator). Raises ValueError for a negative prefetch."""
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
        self.prefetch = prefetch
        self.key = key
        self.from_cache = from_cache
        self.batches = 0
        self.stalls = 0
        self.wait_seconds = 0.0
        self._stall_at: list[int] = []
        self._source = source
        self._done = False
        self._thread: threading.Thread | None = None
        if prefetch:
            self._queue: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=_produce, args=(source, self._queue, self._stop), name=name, daemon=True
            )
            self._thread.start()

    def __iter__(self) -> BatchStream[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        if self._thread is None:
            try:
                item = next(self._source)
            except BaseException:
                self.close()
                raise
            self.batches += 1
            return item
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            t0 = time.perf_counter()
            item = self._queue.get()
            self.wait_seconds += time.perf_counter() - t0
            if not isinstance(item, (_End, _Failure)):  # waiting for the end is no stall
                self.stalls += 1
                self._stall_at.append(self.batches)
        if isinstance(item, _End):
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        self.batches += 1
        return item

    def stalls_after(self, warmup: int) -> int:
        """Stalls that happened after the first `warmup` batches were handed out."""
        return sum(1 for at in self._stall_at if at >= warmup)

    def close(self) -> None:
        """Stop the producer, wait for its thread and run its cleanup. Idempotent; raises nothing of the producer's."""
        self._done = True
        if self._thread is None:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()
            return
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue, and free what it made
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> BatchStream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self.close()
