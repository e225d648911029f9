"""CacheManager: one CacheConfig's tiers and artefact caches, named caches and their entries; it
coordinates the background cleanup (cleanup.py) and the reporting (reporting.py).

Owns the lifecycle (open, start/stop sync or awaited, close) and the entries' keys; stores keep
bytes, PromptCache keeps prefixes, values.py turns entry values into bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
from typing import TYPE_CHECKING, Any

from promptcache.cache import DEFAULT_BLOCK_SIZE, PromptCache
from promptcache.config import ARTEFACT_CACHES, CacheConfig
from promptcache.config.factory import DEFAULT_CACHE_NAME, tiered_cache
from promptcache.errors import CorruptEntryError
from promptcache.manager import reporting
from promptcache.manager.cleanup import DONE, Cleanup, Done
from promptcache.manager.reporting import EntryInfo
from promptcache.store.tiered import NamespacedStore, TieredStore
from promptcache.values import decode_value, encode_value

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from promptcache.artefacts import ArtefactStore

log = logging.getLogger(__name__)

DEFAULT_CACHE = DEFAULT_CACHE_NAME
# Keys of this alphabet are stored as written (readable in `inspect`); any other string, and any
# key starting with the hash prefix, is stored as the prefix + a blake2b-128 hex digest of its UTF-8.
_PLAIN_KEY = re.compile(r"[0-9a-z_:-]{1,160}")
HASHED_KEY_PREFIX = "hash-"


def storage_key(key: str) -> str:
    """The key an entry is stored under: `key` itself when it is 1 to 160 characters of [0-9a-z_:-]
    (and does not start with "hash-"), else "hash-" + blake2b-128 of its UTF-8. Raises TypeError for a non-str."""
    if not isinstance(key, str):
        raise TypeError(f"entry keys are strings, got {type(key).__name__}")
    if _PLAIN_KEY.fullmatch(key) and not key.startswith(HASHED_KEY_PREFIX):
        return key
    return HASHED_KEY_PREFIX + hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


class CacheManager:
    """The tiers of one CacheConfig (RAM -> disk -> Redis), shared by named caches, and its artefact caches.

    `cache(name)` is the PromptCache an engine uses (`LLM(cache=manager.cache())`); every name is a
    key prefix, so names share the tiers' capacity but not entries. get/put/remove/contains/clear
    work on entries of a named cache (LlamaHome's CacheManager API): any string key, values that
    are bytes, numpy arrays or pyarrow Tables (stored without pickle, see promptcache.values).
    `model_cache`, `training_cache` and `system_cache` are the artefact caches the config's
    sections describe (ModelCache, DatasetCache, SystemCache), opened on first use.

    A daemon thread cleans each KV tier every `config.tier_cleanup_interval(tier)` seconds and the
    artefact caches this manager opened every `config.cleanup_interval`: it expires entries older than max_age, evicts
    down to capacity (other processes may have written under larger capacities) and reconciles
    accounting. start() and stop() work called plainly or awaited; get_metrics() and cleanup() are
    coroutines. close(), or leaving a `with` / `async with` block, stops it and closes everything.
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
        self._artefacts: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._cleanup = Cleanup(
            self.store,
            self.config,
            existing=lambda: list(self.artefact_stores().items()),
            opened=self._opened_artefact_stores,
        )
        if cleanup:
            self.start()

    def __repr__(self) -> str:
        return f"CacheManager({self.store!r})"

    # -- named caches ---------------------------------------------------------------------------

    def _view(self, name: str) -> NamespacedStore:
        if name in ARTEFACT_CACHES:
            raise ValueError(
                f"{name!r} is the name of an artefact cache; use manager.{name} for it, "
                "or another name for a prompt cache"
            )
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
        self._view(name)  # checks the name, and lists it in names
        with self._lock:
            cache = self._caches.get(name)
            if cache is None:
                cache = self._caches[name] = tiered_cache(self.store, name, block_size=block_size)
            return cache

    @property
    def names(self) -> list[str]:
        """Names of the caches this manager has handed out or touched."""
        return sorted(self._views)

    # -- entries --------------------------------------------------------------------------------

    def get(
        self, key: str, *, cache: str = DEFAULT_CACHE, fingerprint: str | None = None
    ) -> bytes | np.ndarray | pa.Table | None:
        """The value stored under key in cache `cache` (from the fastest tier, promoted), or None.

        The value comes back as it was put: bytes, a numpy array or a pyarrow Table. With
        `fingerprint`, an entry stored under another fingerprint is a miss; so is (logged) a stored
        value that does not parse. Raises TypeError for a non-str key, ValueError for a bad cache name.
        """
        blob = self._view(cache).get(storage_key(key), fingerprint=fingerprint)
        if blob is None:
            return None
        try:
            return decode_value(blob)
        except CorruptEntryError as exc:
            log.warning(
                "entry %r of cache %r is unusable, treating it as a miss: %s", key, cache, exc
            )
            return None

    def put(
        self,
        key: str,
        value: bytes | np.ndarray | pa.Table,
        *,
        cache: str = DEFAULT_CACHE,
        fingerprint: str = "",
    ) -> None:
        """Store value under key in every tier (write-through); never pickles.

        value: bytes (bytearray, memoryview), a numpy array (np.save, allow_pickle=False) or a
        pyarrow Table (Arrow IPC stream). Raises TypeError for another value or a non-str key,
        ValueError for a bad cache name, and CapacityError when no tier can hold it.
        """
        stored = storage_key(key)
        self._view(cache).put(stored, encode_value(value), fingerprint=fingerprint)

    def remove(self, key: str, *, cache: str = DEFAULT_CACHE) -> bool:
        """Remove key from every tier; True if any tier held it. Raises TypeError, ValueError for a bad name."""
        return self._view(cache).delete(storage_key(key))

    def contains(self, key: str, *, cache: str = DEFAULT_CACHE) -> bool:
        """Whether any tier holds key (no checksum check). Raises TypeError, ValueError for a bad name."""
        return self._view(cache).contains(storage_key(key))

    # -- artefact caches ------------------------------------------------------------------------

    def _artefact(self, kind: str) -> Any:
        with self._lock:
            built = self._artefacts.get(kind)
            if built is None:
                built = self._artefacts[kind] = self.config.artefact_cache(kind)
            return built

    @property
    def model_cache(self) -> Any:
        """The ModelCache of config's model_cache section (opened, and its directory made, on first use)."""
        return self._artefact("model_cache")

    @property
    def training_cache(self) -> Any:
        """The DatasetCache of config's training_cache section (opened on first use)."""
        return self._artefact("training_cache")

    @property
    def system_cache(self) -> Any:
        """The SystemCache of config's system_cache section (opened on first use)."""
        return self._artefact("system_cache")

    def artefact_stores(self) -> dict[str, ArtefactStore]:
        """The ArtefactStore of each artefact cache this manager opened or whose directory exists
        (another process made it); caches never used anywhere are left uncreated."""
        out = {}
        for kind in ARTEFACT_CACHES:
            opened = kind in self._artefacts
            if opened or (self.config.artefact(kind).path / "index.sqlite").exists():
                out[kind] = self._artefact(kind).store
        return out

    def clear(self, cache: str | None = None) -> None:
        """Remove every entry of cache `cache` (a prompt cache's name or an artefact cache's:
        model_cache, training_cache, system_cache), or of every cache when None: every tier and
        every artefact cache that exists.

        The disk and Redis tiers and the artefact caches are cleared for every process that shares them.
        """
        with self._lock:
            caches = list(self._caches.items())
        if cache in ARTEFACT_CACHES:
            self._artefact(cache).store.clear()
            return
        if cache is None:
            self.store.clear()
            for store in self.artefact_stores().values():
                store.clear()
            for _name, prompt_cache in caches:
                prompt_cache.clear()  # forgets its index; its (now empty) view has nothing left to delete
            return
        prompt_cache = self._caches.get(cache)
        if prompt_cache is not None:
            prompt_cache.clear()
        else:
            self._view(cache).clear()

    def _opened_artefact_stores(self) -> list[tuple[str, ArtefactStore]]:
        with self._lock:
            return [(kind, cache.store) for kind, cache in self._artefacts.items()]

    def _named_caches(self) -> list[tuple[str, PromptCache]]:
        with self._lock:
            return list(self._caches.items())

    # -- reporting (reporting.py) ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """hit_rate, memory_usage, disk_usage, redis_usage (bytes; None without that tier),
        eviction_count (all tiers), and per tier under "tiers": entries, bytes, capacity_bytes,
        usage (bytes / capacity), hits, misses, hit_rate, eviction_count, expirations (and for
        Redis: unavailable, outages). "caches" holds each named PromptCache's lookups and reuse,
        "artefacts" each artefact cache that exists (model_cache, training_cache, system_cache:
        entries, bytes, capacity_bytes, usage, policy, hits, misses, hit_rate, eviction_count,
        expirations, path), "cleanup" the background cleanup's runs and totals.
        """
        return reporting.stats(
            self.store, self._named_caches(), self.artefact_stores(), self._cleanup.report()
        )

    async def get_metrics(self) -> dict[str, Any]:
        """LlamaHome's metrics: hit_rate, memory_usage (bytes in the RAM tier; artefacts live on disk,
        memory-mapped) and eviction_count over every cache type, and the same per type under
        "by_type": "prompt" (the KV tiers) and each artefact cache that exists, with their bytes,
        capacity_bytes and usage. Reads the stores in a worker thread (the event loop is not blocked).
        """
        return await asyncio.to_thread(self.metrics)

    def metrics(self) -> dict[str, Any]:
        """What get_metrics() returns, for synchronous callers."""
        return reporting.metrics(self.stats())

    def inspect(self, limit: int | None = None, *, tier: str | None = None) -> list[EntryInfo]:
        """The entries of every tier and artefact cache (or of `tier`: memory, disk, redis,
        model_cache, training_cache, system_cache), most recently used first, at most `limit` each.

        Each listed KV entry is read to count its tokens (a KV segment says how many it covers), so
        it counts as a hit and refreshes its recency; artefacts are listed from their index only
        (tokens None, fingerprint ""). Tiers that cannot be listed are skipped.
        """
        return reporting.inspect(self.store, self.artefact_stores(), limit, tier)

    # -- cleanup (cleanup.py) -------------------------------------------------------------------

    @property
    def cleanup_runs(self) -> int:
        return self._cleanup.runs

    @property
    def cleanup_errors(self) -> int:
        return self._cleanup.errors

    @property
    def last_cleanup(self) -> dict[str, Any]:
        return self._cleanup.last

    def run_cleanup(self, parts: list[str] | None = None) -> dict[str, Any]:
        """Enforce max_age and capacity now in every tier and every artefact cache that exists (or in
        `parts`: tier names, and "artefacts" for the artefact caches this manager opened); returns
        the counts by tier and artefact cache name (see DiskStore.gc, ArtefactStore.gc),
        {"error": ...} for one that failed."""
        return self._cleanup.run(parts)

    async def cleanup(self) -> dict[str, Any]:
        """run_cleanup() in a worker thread, for event loops (LlamaHome schedules `cleanup`)."""
        return await asyncio.to_thread(self.run_cleanup)

    def start(self) -> Done:
        """Start the background cleanup (no-op when it runs already). Call it or await it."""
        return self._cleanup.start()

    @property
    def running(self) -> bool:
        return self._cleanup.running

    def stop(self, timeout: float | None = 30.0) -> Done:
        """Stop the background cleanup, waiting for a run in progress to finish. Call it or await it."""
        return self._cleanup.stop(timeout)

    def close(self) -> Done:
        """Stop the cleanup and close the tiers' and artefact caches' connections. Never raises; the
        manager may not be used after. Call it or await it."""
        self.stop()
        self.store.close()
        with self._lock:
            artefacts = list(self._artefacts.values())
        for artefact in artefacts:
            try:
                artefact.close()
            except Exception as exc:  # noqa: BLE001 - close never raises
                log.debug("closing an artefact cache: %s", exc)
        return DONE

    async def __aenter__(self) -> CacheManager:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> CacheManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["CacheManager", "Done", "EntryInfo", "DEFAULT_CACHE", "HASHED_KEY_PREFIX", "storage_key"]
