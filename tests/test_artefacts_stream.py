"""BatchStream: order, a bounded queue, error hand-over and clean shutdown of the prefetch thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from promptcache.artefacts import BatchStream


class Producer:
    """A generator with observable progress and cleanup."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.made = 0
        self.cleaned = threading.Event()

    def __call__(self) -> Iterator[int]:
        try:
            for i in range(self.n):
                if i == self.fail_at:
                    raise RuntimeError(f"failed at {i}")
                self.made += 1
                yield i
        finally:
            self.cleaned.set()


def wait_until(predicate, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("prefetch", [0, 1, 4])
def test_yields_every_batch_in_order(prefetch: int) -> None:
    producer = Producer(50)
    with BatchStream(producer(), prefetch) as stream:
        assert list(stream) == list(range(50))
    assert producer.cleaned.is_set() and stream.batches == 50


def test_producer_runs_ahead_by_at_most_prefetch() -> None:
    producer = Producer(100)
    stream = BatchStream(producer(), 4)
    assert next(stream) == 0
    wait_until(lambda: producer.made >= 6)  # 1 taken, 4 queued, 1 made and waiting for room
    time.sleep(0.2)
    assert producer.made == 6
    stream.close()
    assert producer.cleaned.is_set()


def test_synchronous_without_prefetch() -> None:
    producer = Producer(10)
    stream = BatchStream(producer(), 0)
    next(stream)
    assert producer.made == 1
    assert not any(t.name == "promptcache-prefetch" for t in threading.enumerate())
    stream.close()
    assert producer.cleaned.is_set()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_producer_error_reaches_the_consumer_after_earlier_batches(prefetch: int) -> None:
    producer = Producer(10, fail_at=5)
    stream = BatchStream(producer(), prefetch)
    got = []
    with pytest.raises(RuntimeError, match="failed at 5"):
        for item in stream:
            got.append(item)
    assert got == [0, 1, 2, 3, 4] and producer.cleaned.is_set()
    assert list(stream) == []


def test_close_early_stops_and_cleans_up_in_time() -> None:
    before = threading.active_count()
    producer = Producer(10**9)
    stream = BatchStream(producer(), 2)
    for i, _item in enumerate(stream):
        if i == 3:
            break
    t0 = time.monotonic()
    stream.close()
    stream.close()
    assert time.monotonic() - t0 < 2 and producer.cleaned.is_set()
    assert threading.active_count() == before


def test_abandoned_stream_stops_its_thread() -> None:
    before = threading.active_count()
    producer = Producer(10**9)
    stream = BatchStream(producer(), 2)
    next(stream)
    del stream
    wait_until(producer.cleaned.is_set)
    wait_until(lambda: threading.active_count() == before)


def test_stalls_counted_when_the_producer_is_slow() -> None:
    def slow() -> Iterator[int]:
        for i in range(5):
            time.sleep(0.05)
            yield i

    stream = BatchStream(slow(), 2)
    assert list(stream) == [0, 1, 2, 3, 4]
    assert stream.stalls >= 4 and stream.wait_seconds > 0.1 and stream.stalls_after(5) == 0


def test_negative_prefetch_is_rejected() -> None:
    with pytest.raises(ValueError):
        BatchStream(iter([]), -1)
