"""What the artefact caches (DatasetCache, ModelCache, SystemCache) share: opening their store and housekeeping.

Owns the store each cache opens and the housekeeping calls; never a cache's defaults or keys."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from promptcache.artefacts.store import ArtefactStore
from promptcache.files import user_cache_dir


class StoreHousekeeping:
    """Opening, clear, stats and close of a cache kept in `self.store`, an ArtefactStore."""

    store: ArtefactStore
    default_dir: ClassVar[str]  # under the user cache dir, where no path is given

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        capacity_bytes: int,
        policy: str,
        max_age: float | None,
        eviction_threshold: float,
        fsync: bool,
        store_options: dict[str, Any],
        /,
    ) -> None:
        """Open the ArtefactStore at `path` (default: the user cache dir / default_dir).

        Each cache's own __init__ carries its defaults and passes them here, in this order. Raises
        ValueError for bad sizes or policy, StoreUnavailableError when the directory cannot be used.
        """
        self.store = ArtefactStore(
            path if path is not None else user_cache_dir(self.default_dir),
            capacity_bytes,
            policy=policy,
            max_age=max_age,
            eviction_threshold=eviction_threshold,
            fsync=fsync,
            **store_options,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.store!r})"

    def clear(self) -> int:
        """Remove every artefact of this cache; returns how many. Raises StoreUnavailableError."""
        return self.store.clear()

    def stats(self) -> dict[str, Any]:
        """Entries, bytes and counters (ArtefactStore.stats). Raises StoreUnavailableError."""
        return self.store.stats()

    def close(self) -> None:
        """Close this thread's index connection; idempotent."""
        self.store.close()


class KeyedHousekeeping(StoreHousekeeping):
    """StoreHousekeeping plus remove(key) and gc, for the caches addressed by key."""

    def remove(self, key: str) -> bool:
        """Remove the artefact under `key` (or a name); True if it was stored. Raises ValueError, StoreUnavailableError."""
        return self.store.remove(key)

    def gc(self) -> dict[str, int]:
        """Expire, evict to capacity and remove dead writers' leftovers (ArtefactStore.gc). Raises StoreUnavailableError."""
        return self.store.gc()
