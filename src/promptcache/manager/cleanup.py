"""Cleanup: the background thread that enforces max_age and capacity in a manager's tiers and
artefact caches, each on its own interval, and the counts of what it removed.

Owns the thread, the schedule and the cleanup counters; never opens a cache or reports on entries
(cache_manager.py and reporting.py do).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from promptcache.config import CacheConfig
from promptcache.errors import PromptCacheError
from promptcache.store.tiered import TieredStore

log = logging.getLogger(__name__)

ARTEFACTS = "artefacts"
"""The part of a cleanup that covers the artefact caches (the others are tiers, by name)."""


class Done:
    """What start(), stop() and close() return: their work is done when they return, and awaiting the
    result (LlamaHome's `await manager.start()`) completes at once with None."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return iter(())  # type: ignore[return-value]

    def __repr__(self) -> str:
        return "Done()"


DONE = Done()

# (name, what has gc()) pairs: the artefact caches that exist, or those a manager opened.
ArtefactList = Callable[[], list[tuple[str, Any]]]


class Cleanup:
    """Cleans each KV tier of `store` every `config.tier_cleanup_interval(tier)` seconds and the
    artefact caches every `config.cleanup_interval`, in a daemon thread once started.

    existing: the artefact stores that exist (a cleanup run on demand covers them); opened: the
    ones the manager opened (the background thread covers only those).
    """

    def __init__(
        self,
        store: TieredStore,
        config: CacheConfig,
        *,
        existing: ArtefactList,
        opened: ArtefactList,
    ) -> None:
        self.store = store
        self.config = config
        self._existing = existing
        self._opened = opened
        self.runs = self.errors = 0
        self.last: dict[str, Any] = {}
        self.totals = {"expired": 0, "evicted": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def intervals(self) -> dict[str, float]:
        """Seconds between cleanups of each KV tier (by name) and of the artefact caches."""
        intervals = {t.name: self.config.tier_cleanup_interval(t.name) for t in self.store.tiers}
        intervals[ARTEFACTS] = self.config.cleanup_interval
        return intervals

    def run(self, parts: list[str] | None = None) -> dict[str, Any]:
        """Enforce max_age and capacity now in every tier and every artefact cache that exists (or in
        `parts`: tier names, and "artefacts" for the artefact caches the manager opened); returns
        the counts by tier and artefact cache name (see DiskStore.gc, ArtefactStore.gc),
        {"error": ...} for one that failed."""
        t0 = time.perf_counter()
        counts: dict[str, Any] = {}
        jobs: list[tuple[str, Any]] = [
            (t.name, t) for t in self.store.tiers if parts is None or t.name in parts
        ]
        if parts is None:
            try:
                jobs += self._existing()
            except PromptCacheError as exc:
                counts[ARTEFACTS] = {"error": str(exc)}
        elif ARTEFACTS in parts:  # the background cleanup: only the caches the manager opened
            jobs += self._opened()
        for name, target in jobs:
            try:
                counts[name] = dict(target.gc())
            except Exception as exc:  # noqa: BLE001 - the cleanup thread must outlive any one failure
                log.warning("cache cleanup of %s failed: %s", name, exc)
                counts[name] = {"error": str(exc)}
        self._count(counts)
        self.last = {**counts, "at": time.time(), "ms": (time.perf_counter() - t0) * 1000}
        return counts

    def _count(self, counts: dict[str, Any]) -> None:
        for part_counts in counts.values():
            if "error" in part_counts:
                self.errors += 1
            self.totals["expired"] += int(part_counts.get("expired", 0))
            self.totals["evicted"] += int(part_counts.get("evicted", 0))
        self.runs += 1

    def _loop(self) -> None:
        intervals = self.intervals()
        now = time.monotonic()
        due = {part: now + seconds for part, seconds in intervals.items()}
        while not self._stop.wait(max(0.0, min(due.values()) - time.monotonic())):
            now = time.monotonic()
            parts = [part for part, at in due.items() if at <= now]
            if not parts:
                continue
            self.run(parts)
            for part in parts:
                due[part] = time.monotonic() + intervals[part]

    def start(self) -> Done:
        """Start the background thread (no-op when it runs already)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return DONE
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._loop, name="promptcache-cleanup", daemon=True
            )
            self._thread.start()
        return DONE

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = 30.0) -> Done:
        """Stop the background thread, waiting for a run in progress to finish."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None
        return DONE

    def report(self) -> dict[str, Any]:
        """The cleanup's settings, state and counts, as CacheManager.stats()["cleanup"] shows them."""
        return {
            "interval_s": self.config.cleanup_interval,
            "tier_interval_s": {
                t.name: self.config.tier_cleanup_interval(t.name) for t in self.store.tiers
            },
            "running": self.running,
            "runs": self.runs,
            "errors": self.errors,
            **self.totals,
            "last": self.last,
        }


__all__ = ["ARTEFACTS", "Cleanup", "DONE", "Done"]
