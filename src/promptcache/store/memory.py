"""RAM tier: a byte-capacity store with a pluggable eviction policy (LRU by default) and max_age.

Holds bytes only; thread-safe; get_view never copies a value (get copies only a held view into bytes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from cachetools import Cache

from promptcache.errors import CapacityError
from promptcache.store.base import BaseStore
from promptcache.store.compression import Compressor, decompress
from promptcache.store.counters import base_stats
from promptcache.store.policies import Entry, get_policy

log = logging.getLogger(__name__)


def _entry_size(entry: Entry) -> int:
    return entry.size


class MemoryStore(BaseStore):
    """In-process store. `capacity_bytes` holds after every operation.

    policy: "lru" (default), "fifo", "ttl" or "size"; max_age (seconds) expires entries under any policy
    and is required by "ttl". `on_evict(key)` is called for each entry evicted or expired.

    max_items caps the number of entries (None: no cap). eviction_threshold (0 < t <= 1): when a put
    would exceed capacity_bytes, entries are evicted until the total with the new one is at most
    t x capacity_bytes (1.0, the default, evicts only what the put needs). compression (a
    Compressor, default none) compresses values on put; capacity counts the compressed bytes and
    a read then returns a decompressed copy.

    put() holds the buffer it is given, not a copy: bytes, or a read-only view such as the mapped
    disk entry a TieredStore promotes (its pages are the page cache's, see TieredStore).

    An entry put under one fingerprint and read under another is a logged miss and is removed, as
    in the persisted tiers; an entry put without one ("", e.g. promoted by an unchecked read)
    matches any.
    """

    name = "memory"
    latency_rank = 0

    def __init__(
        self,
        capacity_bytes: int = 2 << 30,
        *,
        policy: str = "lru",
        max_age: float | None = None,
        on_evict: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_items: int | None = None,
        eviction_threshold: float = 1.0,
        compression: Compressor | None = None,
    ) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be a positive int")
        if max_items is not None and (not isinstance(max_items, int) or max_items <= 0):
            raise ValueError(f"max_items must be a positive int or None, got {max_items!r}")
        if not 0 < eviction_threshold <= 1:
            raise ValueError(f"eviction_threshold must be in (0, 1], got {eviction_threshold!r}")
        self.max_items = max_items
        self.eviction_threshold = eviction_threshold
        self.compressor = compression if compression is not None else Compressor()
        self.policy = get_policy(policy, max_age)
        self.capacity_bytes = capacity_bytes
        self.max_age = max_age
        self.on_evict = on_evict
        self._clock = clock
        # The policy's bounded map (cachetools): its popitem() is the victim rule, its currsize the
        # bytes held. put() makes room itself first (threshold, max_items, counters, on_evict).
        self._entries: Cache = self.policy.ram(capacity_bytes, getsizeof=_entry_size)
        self._lock = threading.RLock()
        self.hits = self.misses = self.puts = self.evictions = self.expirations = self.corrupt = 0

    def _drop(self, key: str) -> None:
        del self._entries[key]
        if self.on_evict is not None:
            self.on_evict(key)

    def _evict(self) -> None:
        key, _entry = self._entries.popitem()  # the policy's victim
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(key)

    def _peek(self, key: str) -> Entry | None:
        """key's entry without making it recent: cachetools.Cache's own lookup (LRUCache's moves
        the key to the end)."""
        try:
            return Cache.__getitem__(self._entries, key)
        except KeyError:
            return None

    def _expired(self, entry: Entry, now: float) -> bool:
        return self.max_age is not None and now - entry.created > self.max_age

    @staticmethod
    def _foreign(entry: Entry, fingerprint: str | None) -> bool:
        return bool(fingerprint) and bool(entry.fingerprint) and entry.fingerprint != fingerprint

    def get(self, key: str, *, fingerprint: str | None = None) -> bytes | None:
        """The value, or None on a miss (an expired or foreign entry is removed). A value put as a
        view (a tier promoting a mapped disk entry) comes back as a copy: get() gives bytes."""
        value = self.get_view(key, fingerprint=fingerprint)
        return value if value is None or isinstance(value, bytes) else bytes(value)

    def get_view(self, key: str, *, fingerprint: str | None = None) -> bytes | memoryview | None:
        """The buffer held, not a copy (a compressed value is decompressed: a new buffer); None on
        a miss, as get()."""
        with self._lock:
            entry = self._entries.get(key)  # a read, as the policy counts one (LRU: now recent)
            now = self._clock()
            if entry is not None and self._expired(entry, now):
                self._drop(key)
                self.expirations += 1
                entry = None
            elif entry is not None and self._foreign(entry, fingerprint):
                log.warning(
                    "memory cache entry %s was written for another fingerprint; removed it", key
                )
                self._drop(key)
                self.corrupt += 1
                entry = None
            if entry is None:
                self.misses += 1
                return None
            entry.accessed = now
            self.hits += 1
            return decompress(entry.value, entry.flags) if entry.flags else entry.value

    def put(self, key: str, value: bytes | memoryview, *, fingerprint: str = "") -> None:
        flags = 0
        if self.compressor.name != "none":
            value, flags = self.compressor.compress(value)
        size = len(value)
        if size > self.capacity_bytes:
            raise CapacityError(
                f"value of {size} bytes exceeds the memory store's capacity of {self.capacity_bytes}; "
                "raise capacity_bytes"
            )
        with self._lock:
            if key in self._entries:
                del self._entries[key]  # written again: a new entry (FIFO counts it from now)
            if self._entries.currsize + size > self.capacity_bytes:
                target = int(self.eviction_threshold * self.capacity_bytes)
                while self._entries and self._entries.currsize + size > target:
                    self._evict()
            while self.max_items is not None and len(self._entries) >= self.max_items:
                self._evict()
            now = self._clock()
            self._entries[key] = Entry(
                value, size, now, now, fingerprint, flags
            )  # fits: no eviction
            self.puts += 1

    def delete(self, key: str) -> bool:
        with self._lock:
            if key not in self._entries:
                return False
            del self._entries[key]
            return True

    def contains(self, key: str) -> bool:
        with self._lock:
            entry = self._peek(key)
            return entry is not None and not self._expired(entry, self._clock())

    def expire(self) -> int:
        """Remove entries older than max_age now; returns how many."""
        if self.max_age is None:
            return 0
        with self._lock:
            now = self._clock()
            old = [k for k in list(self._entries) if self._expired(self._peek(k), now)]  # type: ignore[arg-type]
            for key in old:
                self._drop(key)
            self.expirations += len(old)
            return len(old)

    def size(self) -> int:
        return self._entries.currsize

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._entries))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def entries(self) -> list[dict[str, str | int | float]]:
        """Every entry's key, size and fingerprint, most recently used (or written) first.

        No times: this store's clock is monotonic, not wall-clock."""
        with self._lock:
            rows = [(key, self._peek(key)) for key in reversed(list(self._entries))]
        if self.policy.refresh_on_read:  # else written order is the policy's order
            rows.sort(key=lambda row: row[1].accessed, reverse=True)  # type: ignore[union-attr]
        return [
            {"key": key, "size": entry.size, "fingerprint": entry.fingerprint}  # type: ignore[union-attr]
            for key, entry in rows
        ]

    def stats(self) -> dict[str, int | float | str]:
        return {
            **base_stats(self, len(self._entries), self._entries.currsize),
            "max_items": self.max_items if self.max_items is not None else "none",
            "compression": self.compressor.name,
        }
