"""CacheStats: the counters of one PromptCache, one field per counter, read as one snapshot.

Owns the counters and their names in PromptCache.stats(); never counts anything by itself.
The "chunks_*" names count segments (the stored unit): they predate the word and are kept
because dashboards and benchmarks read them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from promptcache.cache.hit import Hit


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    tokens_looked_up: int = 0
    tokens_reused: int = 0
    inserts: int = 0
    bytes_written: int = 0
    chunks_written: int = 0  # segments written to the store
    chunks_deduplicated: int = 0  # segments an insert found cached already
    evicted_sequences: int = 0
    missing_chunks: int = 0  # segments a lookup planned but the store no longer held
    memo_hits: int = 0
    merges_read: int = 0
    merges_written: int = 0
    wholes_read: int = 0
    wholes_written: int = 0
    hits_by_tier: dict[str, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def count_lookup(self, n_tokens: int, hit: Hit | None) -> Hit | None:
        """Count a lookup of n_tokens tokens that gave `hit`; returns the hit."""
        self.lookups += 1
        self.tokens_looked_up += n_tokens
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        self.tokens_reused += hit.tokens_reused
        self.hits_by_tier[hit.source] = self.hits_by_tier.get(hit.source, 0) + 1
        return hit

    def snapshot(self) -> dict[str, object]:
        """Every counter by its name, and hit_rate (a copy: later counts do not change it)."""
        return {**dataclasses.asdict(self), "hit_rate": self.hit_rate}


__all__ = ["CacheStats"]
