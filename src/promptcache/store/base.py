"""BaseStore: the optional capabilities every store declares, with their defaults.

Owns the names and defaults of get_view, get_with_tier, tier ranks, persistence, the corrupt and
mapped_reads counters, expire, gc, entries, tier_stats and close, so callers never probe a store
with getattr; never holds values itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar


class BaseStore:
    """Defaults for the capabilities a store has beyond get/put/delete/contains/size/keys/clear/stats.

    `latency_rank` orders tiers from fastest (0, RAM) to slowest (2, Redis): a hit joined from
    several tiers costs what its slowest tier costs. `persistent` says whether entries outlive the
    process and other processes can see them (disk, Redis), so a cache over it probes it on lookup.
    """

    name: str = "store"
    latency_rank: ClassVar[int] = 0
    corrupt: int = 0
    mapped_reads: int = 0

    def get(self, key: str, *, fingerprint: str | None = None) -> bytes | None:  # pragma: no cover
        raise NotImplementedError

    def keys(self) -> Iterator[str]:  # pragma: no cover
        raise NotImplementedError

    def stats(self) -> dict[str, int | float | str]:  # pragma: no cover
        raise NotImplementedError

    @property
    def persistent(self) -> bool:
        """Whether entries outlive this process and other processes see them."""
        return False

    def get_view(self, key: str, *, fingerprint: str | None = None) -> bytes | memoryview | None:
        """get(): a store that holds no buffer it could share (Redis) gives the bytes it read."""
        return self.get(key, fingerprint=fingerprint)

    def get_with_tier(
        self, key: str, *, fingerprint: str | None = None
    ) -> tuple[bytes | None, str]:
        """(value, name of the tier that answered); (None, "none") on a miss."""
        value = self.get(key, fingerprint=fingerprint)
        return value, (self.name if value is not None else "none")

    def get_view_with_tier(
        self, key: str, *, fingerprint: str | None = None
    ) -> tuple[bytes | memoryview | None, str]:
        """(get_view's value, name of the tier that answered); (None, "none") on a miss."""
        value = self.get_view(key, fingerprint=fingerprint)
        return value, (self.name if value is not None else "none")

    def tier_names(self) -> tuple[str, ...]:
        """The names of this store's tiers, fastest first (a single store is its one tier)."""
        return (self.name,)

    def tier_rank(self, tier: str) -> int:
        """Latency rank of one of this store's tiers by name (a single store has one tier)."""
        return self.latency_rank if tier == self.name else 99

    def slowest(self, tiers: Iterable[str]) -> str:
        """The slowest of the named tiers (what a hit joined from them cost), "none" for none."""
        names = [t for t in tiers if t != "none"]
        return max(names, key=self.tier_rank) if names else "none"

    def expire(self) -> int:
        """Drop entries past their max_age now; returns how many. Stores without an age drop none."""
        return 0

    def gc(self) -> dict[str, Any]:
        """Enforce max_age and capacity now and reconcile persisted state; returns counts."""
        return {"expired": self.expire()}

    def entries(self) -> list[dict[str, str | int | float]]:
        """One dict per entry, most recently used first: "key", and where the store knows them
        "size", "fingerprint", "ctime" and "atime" (wall clock). The default knows keys only."""
        return [{"key": key} for key in reversed(list(self.keys()))]

    def tier_stats(self) -> dict[str, dict[str, Any]]:
        """Each tier's own stats(), by tier name (a single store is its one tier)."""
        return {self.name: dict(self.stats())}

    def close(self) -> None:
        """Release connections and files. Never raises; the store may be used again after."""


__all__ = ["BaseStore"]
