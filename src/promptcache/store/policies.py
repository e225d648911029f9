"""Eviction policies as one table: each row says which entry goes first in RAM, on disk and in Redis.

Owns every store's notion of a policy (RAM map class, SQL order, Redis score, read refresh); never holds
values or counts bytes (the stores and their maps do). Modelled on python-diskcache's EVICTION_POLICY
table; the RAM column is cachetools' classes (LRUCache, FIFOCache) and one of a dozen lines here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cachetools import Cache, FIFOCache, LRUCache


@dataclass
class Entry:
    """A RAM entry. fingerprint "" means unknown (promoted without one): it matches any.
    flags: the compression flags of value (0: stored as given)."""

    value: bytes | memoryview
    size: int
    created: float
    accessed: float
    fingerprint: str = ""
    flags: int = 0


@dataclass(frozen=True)
class Policy:
    """One row of the policy table.

    ram: MemoryStore's bounded map (a cachetools class, made with maxsize and getsizeof): its
    popitem() is the victim, its own lookup refreshes what the policy refreshes.
    refresh_on_read: a read makes the entry recent (RAM: the map's lookup; disk: rewrites atime).
    disk_order: DiskStore's SQL ORDER BY over (key, size, ctime, atime), first victim first, so that
    one query picks victims across every process sharing a directory.
    redis_score: RedisStore's score at write (now, entry bytes) in its order zset, lowest evicted first.
    redis_touch: a read rescores the entry with the read time (the zset then holds access times).
    needs_max_age: the policy is meaningless without an age limit.
    """

    name: str
    ram: type[Cache]
    refresh_on_read: bool
    disk_order: str
    redis_score: Callable[[float, int], float]
    redis_touch: bool = False
    needs_max_age: bool = False


class LargestFirstCache(Cache):
    """The "size" policy's map of Entry: the largest entry leaves first (equal sizes: the least
    recently used)."""

    def popitem(self) -> tuple[str, Entry]:
        if not self:
            raise KeyError(f"{type(self).__name__} is empty")
        key = max(self, key=lambda k: _largest_first(Cache.__getitem__(self, k)))
        return key, self.pop(key)


def _largest_first(entry: Entry) -> tuple[int, float]:
    return entry.size, -entry.accessed


def _by_time(now: float, size: int) -> float:
    return now


def _by_size(now: float, size: int) -> float:
    return -float(size)


POLICIES: dict[str, Policy] = {
    policy.name: policy
    for policy in (
        Policy("lru", LRUCache, True, "atime, ctime", _by_time, redis_touch=True),
        Policy("fifo", FIFOCache, False, "ctime, atime", _by_time),
        # ttl: entries expire after max_age; under pressure the oldest-written goes first.
        Policy("ttl", FIFOCache, False, "ctime, atime", _by_time, needs_max_age=True),
        Policy("size", LargestFirstCache, True, "size DESC, atime", _by_size),
    )
}

POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)
"""The accepted policy names, in the table's order (what config.py validates against)."""


def get_policy(name: str, max_age: float | None = None, *, age_setting: str = "max_age") -> Policy:
    """The policy called `name`, checked against `max_age` (seconds or None; `age_setting` names it).

    Raises ValueError naming the accepted values, when the policy needs max_age and has none, or
    when max_age is not positive.
    """
    try:
        policy = POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy {name!r}; use one of {', '.join(POLICY_NAMES)}") from None
    if policy.needs_max_age and not max_age:
        raise ValueError(f"policy {name!r} needs {age_setting} (seconds)")
    if max_age is not None and max_age <= 0:
        raise ValueError(f"{age_setting} must be positive seconds or None")
    return policy


__all__ = ["Entry", "Policy", "POLICIES", "POLICY_NAMES", "LargestFirstCache", "get_policy"]
