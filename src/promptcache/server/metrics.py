"""Server metrics: Prometheus series on the server's own registry and the same counters as JSON.

Records what requests reused and computed and reads PromptCache.stats() at scrape time; it changes
nothing it observes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from promptcache.errors import PromptCacheError

if TYPE_CHECKING:
    from promptcache.cache import PromptCache
    from promptcache.engines.llama_cpp import RunStats
    from promptcache.server.kv_events import KVEventPublisher
    from promptcache.server.pool import EnginePool

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def cache_stats(cache: PromptCache) -> dict[str, Any]:
    """PromptCache.stats(): a consistent snapshot (taken under the cache's lock) while workers insert."""
    return cache.stats()


def tier_stats(cache: PromptCache) -> list[dict[str, Any]]:
    """Each tier's stats, with its name under "tier" (a plain store is its own one tier)."""
    return [dict(row, tier=name) for name, row in cache.store.tier_stats().items()]


class _CacheCollector(Collector):
    """Series read from PromptCache.stats(), the pool and the KV-event publisher at each scrape."""

    def __init__(
        self,
        cache: PromptCache | None,
        pool: Callable[[], EnginePool | None],
        events: KVEventPublisher | None = None,
    ) -> None:
        self.cache = cache
        self.pool = pool
        self.events = events

    def collect(self) -> Iterator[Metric]:
        yield from self._pool_metrics()
        if self.events is not None:
            yield from _event_metrics(self.events.stats())
        if self.cache is None:
            return
        try:
            stats = cache_stats(self.cache)
        except PromptCacheError:
            return
        yield from self._cache_metrics(stats)
        if isinstance(stats.get("store"), dict):
            yield from self._tier_metrics()

    def _pool_metrics(self) -> Iterator[Metric]:
        pool = self.pool()
        if pool is not None:
            for name, doc, value in (
                ("promptcache_workers", "LLM worker threads.", pool.size),
                (
                    "promptcache_slots",
                    "Requests served at once (workers x parallel).",
                    pool.sequences,
                ),
                ("promptcache_workers_busy", "Requests running now.", pool.busy),
                (
                    "promptcache_kv_cache_bytes",
                    "KV cache bytes of the workers' contexts.",
                    pool.kv_bytes,
                ),
                ("promptcache_queue_waiting", "Requests waiting for a worker.", pool.waiting),
                (
                    "promptcache_queue_capacity",
                    "Requests that may wait before 503.",
                    pool.max_queue,
                ),
            ):
                yield GaugeMetricFamily(name, doc, value=value)

    def _cache_metrics(self, stats: dict[str, Any]) -> Iterator[Metric]:
        for key, doc in (
            ("lookups", "Prefix-cache lookups."),
            ("hits", "Lookups that restored a cached prefix."),
            ("misses", "Lookups that found nothing to restore."),
            ("tokens_reused", "Prompt tokens restored from the prefix cache."),
            ("inserts", "Sequences inserted into the prefix cache."),
            ("bytes_written", "Bytes of state written to the store."),
            ("evicted_sequences", "Cached sequences evicted to stay within capacity."),
        ):
            yield CounterMetricFamily(f"promptcache_cache_{key}", doc, value=stats[key])
        yield _labelled(
            CounterMetricFamily,
            "promptcache_cache_hits_by_tier",
            "Hits by the slowest tier they read.",
            "tier",
            stats["hits_by_tier"],
        )
        yield GaugeMetricFamily(
            "promptcache_cache_bytes", "Bytes of state the index references.", value=stats["bytes"]
        )
        yield GaugeMetricFamily(
            "promptcache_cache_sequences", "Cached token sequences.", value=stats["sequences"]
        )

    def _tier_metrics(self) -> Iterator[Metric]:
        assert self.cache is not None
        gauges = {
            k: GaugeMetricFamily(f"promptcache_store_{k}", doc, labels=["tier"])
            for k, doc in (
                ("bytes", "Bytes held by the tier."),
                ("capacity_bytes", "Byte capacity of the tier."),
                ("entries", "Entries held by the tier."),
            )
        }
        counters = {
            k: CounterMetricFamily(f"promptcache_store_{k}", doc, labels=["tier"])
            for k, doc in (
                ("hits", "Store reads that found their entry."),
                ("misses", "Store reads that found nothing (or a corrupt entry)."),
                ("evictions", "Entries the tier evicted to stay within capacity."),
            )
        }
        try:
            tiers = tier_stats(self.cache)
        except PromptCacheError:
            tiers = []
        for tier in tiers:
            name = str(tier.get("tier", "store"))
            for k, family in (*gauges.items(), *counters.items()):
                if isinstance(tier.get(k), (int, float)):
                    family.add_metric([name], tier[k])
        yield from gauges.values()
        yield from counters.values()


def _labelled(
    family: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    label: str,
    values: dict[str, int],
) -> Metric:
    """One series per label value."""
    out = family(name, doc, labels=[label])
    for key, n in values.items():
        out.add_metric([key], n)
    return out


def _event_metrics(stats: dict[str, Any]) -> Iterator[Metric]:
    """The KV-event publisher's counters (kv_events.KVEventPublisher.stats)."""
    counter, gauge = CounterMetricFamily, GaugeMetricFamily
    yield _labelled(
        counter, "promptcache_kv_events", "KV events published, by type.", "type", stats["events"]
    )
    yield counter(
        "promptcache_kv_event_batches", "KV-event batches published.", value=stats["batches"]
    )
    blocks = {"stored": stats["blocks_stored"], "removed": stats["blocks_removed"]}
    yield _labelled(
        counter,
        "promptcache_kv_event_blocks",
        "Blocks announced stored or removed.",
        "event",
        blocks,
    )
    yield _labelled(
        gauge,
        "promptcache_kv_event_blocks_announced",
        "Blocks announced servable now, by medium (GPU: live sequences, CPU: RAM, DISK: disk).",
        "medium",
        stats["blocks_announced"],
    )


class Metrics:
    """The server's registry, plus plain counters for /v1/cache/stats."""

    def __init__(
        self,
        cache: PromptCache | None,
        pool: Callable[[], EnginePool | None],
        events: KVEventPublisher | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "promptcache_requests",
            "Requests by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "promptcache_prompt_tokens", "Prompt tokens of finished generations.", registry=r
        )
        self.tokens_reused = Counter(
            "promptcache_prompt_tokens_reused",
            "Prompt tokens not evaluated, by where their state came from.",
            ["source"],
            registry=r,
        )
        self.tokens_evaluated = Counter(
            "promptcache_prompt_tokens_evaluated",
            "Prompt tokens evaluated (prefilled).",
            registry=r,
        )
        self.completion_tokens = Counter(
            "promptcache_completion_tokens", "Tokens generated.", registry=r
        )
        self.ttft = Histogram(
            "promptcache_time_to_first_token_seconds",
            "From a request entering the queue to its first generated token.",
            ["endpoint"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        r.register(_CacheCollector(cache, pool, events))
        self._lock = threading.Lock()
        self._totals: dict[str, int] = {
            "prompt_tokens": 0,
            "tokens_reused": 0,
            "tokens_evaluated": 0,
            "completion_tokens": 0,
        }
        self._outcomes: dict[str, int] = {}
        self._reused_by_source: dict[str, int] = {}

    def request(self, endpoint: str, outcome: str) -> None:
        """Count one request: ok, cancelled, rejected (503), or an error code."""
        self.requests.labels(endpoint, outcome).inc()
        with self._lock:
            self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1

    def generation(self, endpoint: str, stats: RunStats, queue_s: float) -> None:
        """Record one generation's token counts and time to first token (queue wait included)."""
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.tokens_reused.labels(stats.source if stats.tokens_reused else "none").inc(
            stats.tokens_reused
        )
        self.tokens_evaluated.inc(stats.tokens_evaluated)
        self.completion_tokens.inc(stats.tokens_generated)
        if stats.ttft_ms > 0:
            self.ttft.labels(endpoint).observe(queue_s + stats.ttft_ms / 1000)
        with self._lock:
            self._totals["prompt_tokens"] += stats.prompt_tokens
            self._totals["tokens_reused"] += stats.tokens_reused
            self._totals["tokens_evaluated"] += stats.tokens_evaluated
            self._totals["completion_tokens"] += stats.tokens_generated
            if stats.tokens_reused:
                by_source = self._reused_by_source
                by_source[stats.source] = by_source.get(stats.source, 0) + stats.tokens_reused

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "tokens": dict(self._totals),
                # Where reused prompt tokens came from: live (a sequence this server holds), memory,
                # disk or redis (the prefix cache's tiers).
                "tokens_reused_by_source": dict(self._reused_by_source),
                "requests": dict(self._outcomes),
            }

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
