"""What the artefact caches (DatasetCache, ModelCache, SystemCache) share: opening their store and housekeeping."""

from __future__ import annotations

import os
from typing import Any

from promptcache.artefacts.store import ArtefactStore
from promptcache.files import user_cache_dir


def open_store(
    path: str | os.PathLike[str] | None, default_dir: str, capacity_bytes: int, **options: Any
) -> ArtefactStore:
    """The ArtefactStore at `path` (default: the user cache dir / `default_dir`). Raises ValueError, StoreUnavailableError."""
    return ArtefactStore(
        path if path is not None else user_cache_dir(default_dir), capacity_bytes, **options
    )


class StoreHousekeeping:
    """clear, stats and close of a cache kept in `self.store`."""

    store: ArtefactStore

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
