"""Byte stores behind one small protocol: get, put, delete, contains, size, capacity, and the
capabilities store.base.BaseStore declares with defaults (views, tiers, expiry, gc, listing, close).

Stores know keys and bytes only; they never parse states and never unpickle.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Store(Protocol):
    """A byte store with a byte capacity that holds at all times.

    `name` names the tier in stats and hits ("memory", "disk", "redis"). Implementations inherit
    store.base.BaseStore, which gives every capability below the `stats` line a default; the
    contract every store meets is tests/test_store_contract.py.
    """

    name: str
    capacity_bytes: int
    latency_rank: int
    corrupt: int
    """Damaged or foreign entries this store found and removed (a counter, read without I/O)."""
    mapped_reads: int
    """Values this store handed out as views of a mapped file (get_view), a counter."""

    def get(self, key: str, *, fingerprint: str | None = None) -> bytes | None:
        """The value, or None on a miss (including a corrupt or foreign entry, which is removed).

        With `fingerprint`, an entry written under another fingerprint is a (logged) miss.
        """
        ...

    def put(self, key: str, value: bytes | memoryview, *, fingerprint: str = "") -> None:
        """Store value, evicting by policy to stay within capacity. Raises CapacityError if it can never fit."""
        ...

    def delete(self, key: str) -> bool:
        """Remove key; True if it was there."""
        ...

    def contains(self, key: str) -> bool:
        """Whether get(key) would probably hit (no checksum verification)."""
        ...

    def size(self) -> int:
        """Bytes held now."""
        ...

    def __len__(self) -> int: ...

    def keys(self) -> Iterator[str]: ...

    def clear(self) -> None: ...

    def stats(self) -> dict[str, int | float | str]:
        """Counters: hits, misses, puts, evictions, bytes, entries, capacity_bytes."""
        ...

    # -- declared capabilities (defaults in BaseStore) ------------------------------------------

    def get_view(self, key: str, *, fingerprint: str | None = None) -> bytes | memoryview | None:
        """get(), without a copy where the store can: a read-only buffer of the bytes it holds or maps.

        Same checks, misses and errors as get(). Disk maps an entry of 1 MiB or more and checks it
        in place (counted in mapped_reads); RAM gives the buffer it holds; Redis its bytes; tiers
        the view of the tier that holds the key. A view never changes while it lives, whatever
        the store does next (put, delete, evict).
        """
        ...

    def get_view_with_tier(
        self, key: str, *, fingerprint: str | None = None
    ) -> tuple[bytes | memoryview | None, str]:
        """(get_view's value, name of the tier that answered); (None, "none") on a miss."""
        ...

    @property
    def persistent(self) -> bool:
        """Whether entries outlive this process and other processes see them (disk, Redis)."""
        ...

    def get_with_tier(
        self, key: str, *, fingerprint: str | None = None
    ) -> tuple[bytes | None, str]:
        """(value, name of the tier that answered); (None, "none") on a miss."""
        ...

    def tier_names(self) -> tuple[str, ...]:
        """The names of the tiers this store reads through, fastest first ("memory", "disk", ...)."""
        ...

    def tier_rank(self, tier: str) -> int:
        """Latency rank of a tier by name, fastest 0."""
        ...

    def slowest(self, tiers: Iterable[str]) -> str:
        """The slowest of the named tiers, "none" for none."""
        ...

    def expire(self) -> int:
        """Drop entries past their age limit now; returns how many."""
        ...

    def gc(self) -> dict[str, Any]:
        """Enforce age limit and capacity now, reconcile persisted state; returns counts."""
        ...

    def entries(self) -> list[dict[str, str | int | float]]:
        """One dict per entry (key, and size, fingerprint, times where known), most recent first."""
        ...

    def tier_stats(self) -> dict[str, dict[str, Any]]:
        """Each tier's stats() by tier name."""
        ...

    def close(self) -> None:
        """Release connections and files; never raises; the store may be used again after."""
        ...


from promptcache.store.base import BaseStore  # noqa: E402
from promptcache.store.disk import DiskStore  # noqa: E402
from promptcache.store.memory import MemoryStore  # noqa: E402

__all__ = ["Store", "BaseStore", "MemoryStore", "DiskStore"]
