"""SystemCache: temporary artefacts (files or directories) under temp_dir, expired after max_age by the time policy.

Owns named temporary artefacts and their expiry; never derives keys (callers name what they store).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from promptcache.artefacts.base import StoreHousekeeping


class SystemCache(StoreHousekeeping):
    """Named temporary artefacts; an artefact older than max_age is a miss and cleanup() deletes it.

    Defaults follow the system cache users know: capacity 256 MiB, max_age 86,400 s (a day), policy
    "time" (under pressure the oldest written goes first). Names are 1 to 200 characters of
    [0-9a-z_.:-]; storing under a name that is taken replaces the old artefact.
    """

    default_dir = "temp"

    def __init__(
        self,
        temp_dir: str | os.PathLike[str] | None = None,
        capacity_bytes: int = 256 << 20,
        *,
        max_age: float = 86400.0,
        policy: str = "time",
        eviction_threshold: float = 0.9,
        fsync: bool = False,
        **store_options: Any,
    ) -> None:
        """Open the cache at `temp_dir` (default: the user cache dir / "temp"). Raises ValueError, StoreUnavailableError."""
        super().__init__(
            temp_dir, capacity_bytes, policy, max_age, eviction_threshold, fsync, store_options
        )

    def __repr__(self) -> str:
        return f"SystemCache({self.store!r}, max_age={self.store.max_age})"

    def put(self, name: str, content: bytes | str, *, filename: str = "content") -> Path:
        """Store `content` as one file under `name`; returns its path. Raises ValueError, CapacityError, StoreUnavailableError."""
        if not filename or "/" in filename or filename.startswith("."):
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        blob = content.encode() if isinstance(content, str) else content
        with self.store.writing(name, replace=True) as tmp:
            (tmp / filename).write_bytes(blob)
        found = self.get(name)
        if found is None:
            raise KeyError(f"temporary artefact {name} was removed as soon as it was stored")
        return found / filename

    @contextmanager
    def directory(self, name: str) -> Iterator[Path]:
        """A directory to fill; on a normal exit it is stored under `name` (replacing it), on an exception dropped.

        Raises ValueError, CapacityError, StoreUnavailableError.
        """
        with self.store.writing(name, replace=True) as tmp:
            yield tmp

    def get(self, name: str) -> Path | None:
        """The directory stored under `name`, or None when missing or older than max_age. Raises ValueError."""
        return self.store.get(name)

    def remove(self, name: str) -> bool:
        """Remove the artefact `name`; True if it was stored. Raises ValueError, StoreUnavailableError."""
        return self.store.remove(name)

    def cleanup(self) -> dict[str, int]:
        """Delete expired artefacts, evict to capacity, remove dead writers' leftovers. Raises StoreUnavailableError."""
        return self.store.gc()
