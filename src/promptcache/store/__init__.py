"""Byte stores behind one small protocol: get, put, delete, contains, size, capacity.

Stores know keys and bytes only; they never parse states and never unpickle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable


@runtime_checkable
class Store(Protocol):
    """A byte store with a byte capacity that holds at all times.

    `name` names the tier in stats and hits ("memory", "disk", "redis").
    """

    name: str
    capacity_bytes: int

    def get(self, key: str, *, fingerprint: str | None = None) -> bytes | None:
        """The value, or None on a miss (including a corrupt or foreign entry, which is removed).

        With `fingerprint`, an entry written under another fingerprint is a (logged) miss.
        """
        ...

    def put(self, key: str, value: bytes, *, fingerprint: str = "") -> None:
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


from promptcache.store.disk import DiskStore  # noqa: E402
from promptcache.store.memory import MemoryStore  # noqa: E402

__all__ = ["Store", "MemoryStore", "DiskStore"]
