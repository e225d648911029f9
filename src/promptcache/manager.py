"""CacheManager: one CacheConfig's tiers, named caches over them, raw entries, stats and background cleanup.

Owns the lifecycle (cleanup thread, close) and the reporting; stores keep bytes, PromptCache keeps prefixes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from promptcache.cache import DEFAULT_BLOCK_SIZE, PromptCache
from promptcache.config import CacheConfig
from promptcache.errors import CodecError, PromptCacheError
from promptcache.store.tiered import NamespacedStore, TieredStore

log = logging.getLogger(__name__)

DEFAULT_CACHE = "default"
_KEY = re.compile(r"[0-9a-z_:-]{1,160}")


@dataclass(frozen=True)
class EntryInfo:
    """One stored entry as `inspect` shows it. tokens: None when the value is not a KV segment."""

    tier: str
    cache: str
    key: str
    fingerprint: str
    bytes: int
    tokens: int | None
    age_s: float | None


class CacheManager:
    """The tiers of one CacheConfig (RAM -> disk -> Redis), shared by named caches.

    `cache(name)` is the PromptCache an engine uses (`LLM(cache=manager.cache())`); every name is a
    key prefix, so names share the tiers' capacity but not entries. get/put/remove/contains/clear
    work on raw byte entries of a named cache (LlamaHome's CacheManager API, bytes only).

    A daemon thread runs `run_cleanup()` every `config.cleanup_interval` seconds: it expires entries
    older than max_age in every tier, evicts the disk and Redis tiers down to their capacity (other
    processes may have written them under larger capacities) and reconciles their accounting.
    close(), or leaving a `with` block, stops it and closes the tiers.
    """

    def __init__(
        self,
        config: CacheConfig | None = None,
        *,
        store: TieredStore | None = None,
        cleanup: bool = True,
    ) -> None:
        """Build the tiers of `config` (default: CacheConfig() from the file and environment).

        store: use these tiers instead of building them. cleanup: start the background thread.
        Raises ConfigError for an invalid environment or file, StoreUnavailableError when the disk
        directory cannot be created.
        """
        self.config = config if config is not None else CacheConfig()
        self.store = store if store is not None else self.config.build_store()
        self._caches: dict[str, PromptCache] = {}
        self._views: dict[str, NamespacedStore] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cleanup_runs = self.cleanup_errors = 0
        self.last_cleanup: dict[str, Any] = {}
        self._cleanup_totals = {"expired": 0, "evicted": 0}
        if cleanup:
            self.start()

    def __repr__(self) -> str:
        return f"CacheManager({self.store!r})"

    # -- named caches ---------------------------------------------------------------------------

    def _view(self, name: str) -> NamespacedStore:
        with self._lock:
            view = self._views.get(name)
            if view is None:
                view = self._views[name] = NamespacedStore(self.store, name)
            return view

    def cache(
        self, name: str = DEFAULT_CACHE, *, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> PromptCache:
        """The PromptCache called `name` (the same object on every call), for an engine.

        Its keys are "<name>:..." in every tier, so processes that use the same tiers and name share
        prefixes. Raises ValueError for a name outside [0-9a-z_-]{1,32}.
        """
        view = self._view(name)
        with self._lock:
            cache = self._caches.get(name)
            if cache is None:
                cache = self._caches[name] = PromptCache(
                    view, block_size=block_size, shared=self.config.shared
                )
            return cache

    @property
    def names(self) -> list[str]:
        """Names of the caches this manager has handed out or touched."""
        return sorted(self._views)

    # -- raw entries ----------------------------------------------------------------------------

    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(
                f"entry keys are 1 to 160 characters of [0-9a-z_:-], got {key!r}; "
                "hash other keys first, e.g. hashlib.blake2b(key.encode(), digest_size=16).hexdigest()"
            )

    def get(
        self, key: str, *, cache: str = DEFAULT_CACHE, fingerprint: str | None = None
    ) -> bytes | None:
        """The bytes stored under key in cache `cache` (from the fastest tier, promoted), or None.

        With `fingerprint`, an entry stored under another fingerprint is a miss. Raises ValueError for a bad key or name.
        """
        self._check_key(key)
        return self._view(cache).get(key, fingerprint=fingerprint)

    def put(
        self, key: str, value: bytes, *, cache: str = DEFAULT_CACHE, fingerprint: str = ""
    ) -> None:
        """Store bytes under key in every tier (write-through).

        Raises ValueError for a bad key or name, TypeError for a value that is not bytes, and
        CapacityError when no tier can hold it.
        """
        self._check_key(key)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"entries are bytes, got {type(value).__name__}; serialize values first (never pickle)"
            )
        self._view(cache).put(key, bytes(value), fingerprint=fingerprint)

    def remove(self, key: str, *, cache: str = DEFAULT_CACHE) -> bool:
        """Remove key from every tier; True if any tier held it. Raises ValueError for a bad key or name."""
        self._check_key(key)
        return self._view(cache).delete(key)

    def contains(self, key: str, *, cache: str = DEFAULT_CACHE) -> bool:
        """Whether any tier holds key (no checksum check). Raises ValueError for a bad key or name."""
        self._check_key(key)
        return self._view(cache).contains(key)

    def clear(self, cache: str | None = None) -> None:
        """Remove every entry of cache `cache`, or of every cache in every tier when None.

        The disk and Redis tiers are cleared for every process that shares them.
        """
        with self._lock:
            caches = list(self._caches.items())
        if cache is None:
            self.store.clear()
            for _name, prompt_cache in caches:
                prompt_cache.clear()  # forgets its index; its (now empty) view has nothing left to delete
            return
        prompt_cache = self._caches.get(cache)
        if prompt_cache is not None:
            prompt_cache.clear()
        else:
            self._view(cache).clear()

    # -- reporting ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """hit_rate, memory_usage, disk_usage, redis_usage (bytes; None without that tier),
        eviction_count (all tiers), and per tier under "tiers": entries, bytes, capacity_bytes,
        usage (bytes / capacity), hits, misses, hit_rate, eviction_count, expirations (and for
        Redis: unavailable, outages). "caches" holds each named PromptCache's lookups and reuse,
        "cleanup" the background cleanup's runs and totals.
        """
        store = self.store.stats()
        tiers: dict[str, dict[str, Any]] = {}
        for name, raw in self.store.tier_stats().items():
            row = dict(raw)
            hits, misses = int(row.get("hits", 0)), int(row.get("misses", 0))
            nbytes, capacity = int(row.get("bytes", 0)), int(row.get("capacity_bytes", 0))
            row["hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
            row["usage"] = nbytes / capacity if capacity and nbytes >= 0 else 0.0
            row["eviction_count"] = int(row.pop("evictions", 0))
            tiers[name] = row
        caches = self._cache_stats()

        def usage(tier: str) -> int | None:
            nbytes = int(tiers[tier]["bytes"]) if tier in tiers else -1
            return nbytes if nbytes >= 0 else None  # -1: the tier could not be asked (Redis away)

        return {
            "hit_rate": store["hit_rate"],
            "hits": store["hits"],
            "misses": store["misses"],
            "promotions": store["promotions"],
            "memory_usage": usage("memory"),
            "disk_usage": usage("disk"),
            "redis_usage": usage("redis"),
            "eviction_count": sum(t["eviction_count"] for t in tiers.values()),
            "tiers": tiers,
            "caches": caches,
            "cleanup": {
                "interval_s": self.config.cleanup_interval,
                "running": self.running,
                "runs": self.cleanup_runs,
                "errors": self.cleanup_errors,
                **self._cleanup_totals,
                "last": self.last_cleanup,
            },
        }

    _CACHE_STATS = (
        "sequences",
        "lookups",
        "hits",
        "hit_rate",
        "tokens_looked_up",
        "tokens_reused",
        "hits_by_tier",
        "bytes_written",
    )

    def _cache_stats(self) -> dict[str, dict[str, Any]]:
        """Each named PromptCache's lookups and reuse (a subset of its stats())."""
        with self._lock:
            named = list(self._caches.items())
        out = {}
        for name, cache in named:
            s = cache.stats()
            out[name] = {k: s[k] for k in self._CACHE_STATS}
        return out

    def inspect(self, limit: int | None = None, *, tier: str | None = None) -> list[EntryInfo]:
        """The entries of every tier (or of `tier`), most recently used first, at most `limit` per tier.

        Each listed entry is read to count its tokens (a KV segment says how many it covers), so it
        counts as a hit and refreshes its recency. Tiers that cannot be listed are skipped.
        """
        from promptcache.codec.llama_state import LlamaStateCodec

        codec = LlamaStateCodec()
        now = time.time()
        out: list[EntryInfo] = []
        for store in self.store.tiers:
            if tier is not None and store.name != tier:
                continue
            try:
                rows = store.entries()
            except PromptCacheError as exc:
                log.warning("cannot list the %s tier: %s", store.name, exc)
                continue
            for row in rows[:limit] if limit is not None else rows:
                key = str(row["key"])
                value = store.get(key)
                tokens = None
                if value is not None:
                    try:
                        tokens = codec.n_tokens(value)
                    except CodecError:
                        tokens = None
                name, _, _rest = key.partition(":")
                ctime = row.get("ctime")
                out.append(
                    EntryInfo(
                        tier=store.name,
                        cache=name if _rest else "",
                        key=key,
                        fingerprint=str(row.get("fingerprint", "")),
                        bytes=int(row.get("size") or (len(value) if value is not None else 0)),
                        tokens=tokens,
                        age_s=now - float(ctime) if ctime is not None else None,
                    )
                )
        return out

    # -- cleanup --------------------------------------------------------------------------------

    def run_cleanup(self) -> dict[str, Any]:
        """Enforce max_age and capacity in every tier now; returns each tier's counts (see TieredStore.gc)."""
        t0 = time.perf_counter()
        try:
            counts: dict[str, Any] = self.store.gc()
        except Exception as exc:  # noqa: BLE001 - the cleanup thread must outlive any one failure
            self.cleanup_errors += 1
            log.warning("cache cleanup failed: %s", exc)
            return {"error": str(exc)}
        for tier_counts in counts.values():
            if "error" in tier_counts:
                self.cleanup_errors += 1
            self._cleanup_totals["expired"] += int(tier_counts.get("expired", 0))
            self._cleanup_totals["evicted"] += int(tier_counts.get("evicted", 0))
        self.cleanup_runs += 1
        self.last_cleanup = {**counts, "at": time.time(), "ms": (time.perf_counter() - t0) * 1000}
        return counts

    def _cleanup_loop(self) -> None:
        while not self._stop.wait(self.config.cleanup_interval):
            self.run_cleanup()

    def start(self) -> None:
        """Start the background cleanup (no-op when it runs already)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._cleanup_loop, name="promptcache-cleanup", daemon=True
            )
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the background cleanup, waiting for a run in progress to finish."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    def close(self) -> None:
        """Stop the cleanup and close the tiers' connections. Never raises; the manager may not be used after."""
        self.stop()
        self.store.close()

    def __enter__(self) -> CacheManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["CacheManager", "EntryInfo", "DEFAULT_CACHE"]
