"""The read of a plan: its segments fetched (a merged prefix first, the store for the rest) and joined.

Owns fetching, cutting the hit short before a missing segment and the join; never decides which
segments to read (plan.py) nor which merges to remember (merges.py).
"""

from __future__ import annotations

from promptcache.cache.hit import Hit
from promptcache.cache.ledger import Ledger
from promptcache.cache.merges import Merges
from promptcache.cache.plan import SegmentPlan
from promptcache.cache.stats import CacheStats
from promptcache.codec import StateCodec
from promptcache.errors import CodecError
from promptcache.memo import MemoHit
from promptcache.store import Store


class Reader:
    """Reads plans from one store, with the merged prefixes of `merges` and the `ledger` to tell
    when a planned segment is gone."""

    def __init__(
        self, store: Store, block_size: int, merges: Merges, ledger: Ledger, stats: CacheStats
    ) -> None:
        self.store = store
        self.block_size = block_size
        self.merges = merges
        self.ledger = ledger
        self._stats = stats

    def read(self, plan: SegmentPlan, fingerprint: str, codec: StateCodec) -> Hit | None:
        """The state of the plan's segments: the deepest merged prefix (the hash chain makes its
        last block's key name all of its blocks), the segments after it from the store. A missing
        segment cuts the hit short before it. Raises CodecError if the parts do not join."""
        if not plan.tokens(self.block_size):
            return None
        if plan.merged is not None:
            try:
                return self._read_parts(plan, plan.merged, {plan.merged_tier}, fingerprint, codec)
            except CodecError as exc:  # checksummed, yet it does not join: never a wrong answer
                self.merges.drop_broken(
                    codec, plan.merged, plan.blocks, f"it does not join ({exc})"
                )
                plan = plan.without_merge()
        memo_hit = self.merges.start(codec, plan.blocks)
        tiers = {"memory"} if memo_hit is not None else set()
        return self._read_parts(plan, memo_hit, tiers, fingerprint, codec)

    def _read_parts(
        self,
        plan: SegmentPlan,
        memo_hit: MemoHit | None,
        tiers: set[str],
        fingerprint: str,
        codec: StateCodec,
    ) -> Hit | None:
        start = memo_hit.n_blocks if memo_hit is not None else 0
        keys = plan.keys()
        values = self._fetch_all(keys[start:], fingerprint, tiers)
        missing = next((start + i for i, v in enumerate(values) if v is None), None)
        if missing is not None:
            self._stats.missing_chunks += len(keys) - missing
            self.ledger.drop_missing(fingerprint, [keys[missing]])
            plan = plan.cut_to(missing)
            if not plan.blocks:
                return None
        n_blocks = len(plan.blocks)
        parts = [memo_hit.segment] if memo_hit is not None else []
        parts += [v for v in values[: n_blocks - start] if v is not None]
        parts = self.merges.merge_on_second_hit(codec, plan.blocks, parts)
        if plan.partial_len:
            tail = values[n_blocks - start]
            assert tail is not None
            parts.append(codec.cut(tail, plan.partial_len))
        return Hit(
            plan.tokens(self.block_size), codec.join(parts), self.store.slowest(tiers), fingerprint
        )

    def _fetch_all(self, keys: list[str], fingerprint: str, tiers: set[str]) -> list[bytes | None]:
        """Every key's value (None where missing); the tiers that answered are added to `tiers`."""
        values: list[bytes | None] = [None] * len(keys)
        for i in reversed(range(len(keys))):  # deepest first: the root block ends most recent
            values[i], tier = self.store.get_with_tier(keys[i], fingerprint=fingerprint)
            if values[i] is not None:
                tiers.add(tier)
        return values


__all__ = ["Reader"]
