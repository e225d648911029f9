"""Merges: a PromptCache's merged prefixes, PrefixMemo in RAM and PersistedMerges in a shared store.

Owns when a prefix is merged (on its second hit, and on insert), when a persisted merge answers a
plan, and dropping a broken one; never names segments or decides which ones a prompt has (plan.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from promptcache.cache.ledger import Record
from promptcache.cache.plan import SegmentPlan, segment_key
from promptcache.cache.stats import CacheStats
from promptcache.codec import StateCodec
from promptcache.memo import MemoHit, PersistedMerges, PrefixMemo, memo_key
from promptcache.store import Store


class Merges:
    """Merged prefixes of one PromptCache: a conversation's state as one segment, so its next turn
    joins two segments instead of hundreds.

    memo_bytes: RAM of the PrefixMemo. persist: also write merges (and whole states, see
    wholes.py) in the store, for a fresh process (PersistedMerges; only over a shared store).
    """

    def __init__(
        self, store: Store, block_size: int, memo_bytes: int, stats: CacheStats, *, persist: bool
    ) -> None:
        self.block_size = block_size
        self.memo = PrefixMemo(memo_bytes, block_size)
        self.persisted = PersistedMerges(store, block_size) if persist else None
        self._stats = stats

    def clear(self) -> None:
        """Forget the merges in RAM (persisted ones stay the store's)."""
        self.memo.clear()

    def holds(self, codec: StateCodec, blocks: Sequence[str]) -> bool:
        """Whether RAM holds a merge of a prefix of `blocks`."""
        return self.memo.holds(codec, blocks)

    # ------------------------------------------------ lookup

    def deepen(
        self,
        plan: SegmentPlan,
        limit: int,
        prefix: list[bytes],
        fingerprint: str,
        codec: StateCodec,
    ) -> SegmentPlan:
        """A fresh process knows nothing of what others wrote: a persisted merge deeper than the
        plan (and than the RAM memo) covers its first blocks with one read."""
        if self.persisted is None or not codec.splittable:
            return plan
        depth = self.persisted.depth(limit // self.block_size)
        if depth <= len(plan.blocks):
            return plan
        full = [segment_key(prefix[j + 1]) for j in range(depth)]
        in_ram = self.memo.find(codec, full)
        if in_ram is not None and in_ram.n_blocks >= depth:
            return plan
        found = self.persisted.find(codec, full, fingerprint)
        if found is None:
            return plan
        merged, tier = found
        self._stats.merges_read += 1
        self.memo.remember(codec, full[: merged.n_blocks], merged.segment)
        return SegmentPlan(full[: merged.n_blocks], merged=merged, merged_tier=tier)

    def start(self, codec: StateCodec, blocks: list[str]) -> MemoHit | None:
        """The deepest merge in RAM of a prefix of `blocks` (counted as a memo hit), or None."""
        found = self.memo.find(codec, blocks)
        if found is not None:
            self._stats.memo_hits += 1
        return found

    def drop_broken(self, codec: StateCodec, merged: MemoHit, blocks: list[str], why: str) -> None:
        """A persisted merge that passed its checksum yet does not join: forget it in RAM and
        delete it from the store (never a wrong answer)."""
        key = memo_key(codec.name, blocks[merged.n_blocks - 1])
        self.memo.forget(key)
        if self.persisted is not None:
            self.persisted.drop(key, why)

    def merge_on_second_hit(
        self, codec: StateCodec, blocks: list[str], parts: list[bytes]
    ) -> list[bytes]:
        """`parts` (the state of `blocks`), merged into one remembered segment when the prefix is
        hit the second time: a first hit would pay the merge for nothing."""
        if len(parts) <= 2 or not self.memo.seen_twice(codec, blocks):
            return parts
        merged = codec.split(codec.join(parts), [0, len(blocks) * self.block_size])[0]
        self.memo.remember(codec, blocks, merged)
        return [merged]

    # ------------------------------------------------ insert

    def remember(self, state: bytes, codec: StateCodec, keys: list[str], n: int) -> bytes | None:
        """A conversation's next turn extends this n-token state (segment keys `keys`): its full
        blocks, as one segment in RAM. Returns that segment, or None when it is not worth one."""
        n_full = n // self.block_size
        if not self.memo.keeps(n_full):
            return None
        merged = codec.split(bytes(state), [0, n_full * self.block_size])[0]
        self.memo.remember(codec, keys[:n_full], merged)
        return merged

    def persist(
        self,
        state: bytes,
        codec: StateCodec,
        keys: list[str],
        n: int,
        fingerprint: str,
        record: Record,
        merged: bytes | None,
    ) -> None:
        """Over a shared store, a merge of the state's first blocks for other processes, noted in
        `record` (its sequence's eviction deletes it). `merged`: remember()'s segment, if any."""
        if self.persisted is None:
            return
        n_full = n // self.block_size

        def cut(n_tokens: int) -> bytes:
            if merged is not None and n_tokens == n_full * self.block_size:
                return merged
            return codec.split(bytes(state), [0, n_tokens])[0]

        persisted = self.persisted.persist(codec, keys[:n_full], cut, fingerprint)
        if persisted is not None:
            key, written = persisted
            record.merged = (key, keys[self.persisted.depth(n_full) - 1])
            self._stats.merges_written += written > 0
            self._stats.bytes_written += written


__all__ = ["Merges"]
