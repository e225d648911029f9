"""Eviction policies as a small table: which entry goes first, and whether a read refreshes it.

Policies pick victims; they never hold values or count bytes (the store does).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """`victim` picks the key to evict from entries kept in insertion/recency order."""

    name: str
    refresh_on_read: bool
    victim: Callable[[OrderedDict[str, Entry]], str]


@dataclass
class Entry:
    value: bytes
    size: int
    created: float
    accessed: float


def _oldest(entries: OrderedDict[str, Entry]) -> str:
    return next(iter(entries))


def _largest(entries: OrderedDict[str, Entry]) -> str:
    return max(entries.items(), key=lambda kv: kv[1].size)[0]


POLICIES: dict[str, Policy] = {
    "lru": Policy("lru", refresh_on_read=True, victim=_oldest),
    "fifo": Policy("fifo", refresh_on_read=False, victim=_oldest),
    # ttl: entries expire after max_age; under pressure the oldest-written goes first.
    "ttl": Policy("ttl", refresh_on_read=False, victim=_oldest),
    "size": Policy("size", refresh_on_read=True, victim=_largest),
}


def get_policy(name: str) -> Policy:
    """The policy called `name`. Raises ValueError naming the accepted values."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; use one of {sorted(POLICIES)}") from None
