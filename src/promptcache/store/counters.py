"""The counters every store keeps and the stats they report in common.

Formats numbers only; counting is each store's own business.
"""

from __future__ import annotations

from typing import Any


def base_stats(store: Any, entries: int, nbytes: int) -> dict[str, int | float | str]:
    """tier, policy, entries, bytes, capacity_bytes, hits, misses, puts, evictions, expirations,
    corrupt, mapped_reads."""
    return {
        "tier": store.name,
        "policy": store.policy.name,
        "entries": entries,
        "bytes": nbytes,
        "capacity_bytes": store.capacity_bytes,
        "hits": store.hits,
        "misses": store.misses,
        "puts": store.puts,
        "evictions": store.evictions,
        "expirations": store.expirations,
        "corrupt": store.corrupt,
        "mapped_reads": store.mapped_reads,
    }
