"""Whole states: states stored uncut, found by the exact tokens they cover.

Owns the whole states of an opaque codec (and the aligned schedule's checkpoints) and the
persisted whole states of long inserted sequences; never cuts or joins segments (plan.py, read.py).
"""

from __future__ import annotations

from promptcache import keys as K
from promptcache.cache.hit import Hit
from promptcache.cache.ledger import Ledger, Record
from promptcache.cache.merges import Merges
from promptcache.cache.plan import segment_key
from promptcache.cache.stats import CacheStats
from promptcache.codec import StateCodec
from promptcache.store import Store

WHOLE_PROBES = 8  # aligned whole states probed per lookup in a shared store (one get each)


def whole_state_key(fingerprint: str, tokens_le: bytes) -> str:
    """The store key of the whole state (opaque codec) that covers exactly these tokens."""
    return segment_key(K.chain(K.root_key(fingerprint), tokens_le)) + "-w"


class WholeStates:
    """The whole states of one PromptCache's store.

    shared: other processes write the store too, so a lookup probes it for whole states this
    process's index does not know. The persisted whole states live in merges.persisted
    (memo.PersistedMerges, which bounds them), present only over a shared store.
    """

    def __init__(
        self,
        store: Store,
        block_size: int,
        ledger: Ledger,
        merges: Merges,
        stats: CacheStats,
        *,
        shared: bool,
    ) -> None:
        self.store = store
        self.block_size = block_size
        self.ledger = ledger
        self.merges = merges
        self.shared = shared
        self._stats = stats

    def opaque_hit(
        self, tokens_le: bytes, limit: int, fingerprint: str, codec: StateCodec, align: int = 0
    ) -> Hit | None:
        """The deepest whole state (an opaque codec's only kind) that is a prefix of
        tokens_le[:limit]: the index's sequences, and over a shared store `limit` itself and, with
        align, its multiples of align below it (at most WHOLE_PROBES, deepest first)."""
        index = self.ledger.indexes.get(fingerprint)
        candidates: list[int] = []
        if index is not None:
            candidates = [t.depth for t in index.match(tokens_le[: 4 * limit]).terminals]
        if self.shared:
            candidates.append(limit)
            if align > 0:
                candidates += range(limit - limit % align, 0, -align)[:WHOLE_PROBES]
        for depth in sorted(set(candidates), reverse=True):
            key = whole_state_key(fingerprint, tokens_le[: 4 * depth])
            value, tier = self.store.get_with_tier(key, fingerprint=fingerprint)
            if value is None:
                continue
            if index is not None and (node := index.find(tokens_le[: 4 * depth])) is not None:
                index.touch(node)
            return Hit(depth, codec.join([value]), tier, fingerprint)
        return None

    def persisted_hit(
        self,
        tokens_le: bytes,
        limit: int,
        fingerprint: str,
        codec: StateCodec,
        prefix: list[bytes],
    ) -> Hit | None:
        """A persisted whole state of a sequence the prompt repeats up to `limit` or further (the
        longest first), for a caller that trims; None where this process's RAM serves the prefix
        (its index and memo) or the store holds no such state. `prefix`: the prompt's block keys."""
        persisted = self.merges.persisted
        if persisted is None or not persisted.whole_bytes:
            return None
        B, n = self.block_size, len(tokens_le) // 4
        index = self.ledger.indexes.get(fingerprint)
        if index is not None:
            match = index.match(tokens_le[: 4 * limit])
            if match is not None and match.length >= limit:
                blocks = [segment_key(prefix[j + 1]) for j in range(limit // B)]
                if self.merges.holds(codec, blocks):
                    return None  # in RAM: the memo's segment and a few blocks join faster
        view = memoryview(tokens_le)
        candidates = []
        for length in range(n, limit - 1, -1):
            j = length // B
            key = prefix[j] if length % B == 0 else K.chain(prefix[j], view[4 * j * B : 4 * length])
            candidates.append((length, segment_key(key)))
        found = persisted.find_whole(codec, candidates, fingerprint)
        if found is None:
            return None
        length, state, tier = found
        self._stats.wholes_read += 1
        return Hit(limit, state, tier, fingerprint, state_tokens=length)

    def persist(
        self,
        state: bytes,
        codec: StateCodec,
        last_key: str,
        n: int,
        fingerprint: str,
        record: Record,
    ) -> None:
        """Over a shared store, the n-token `state` as it is, named by its last segment's key
        `last_key`, so that a fresh process repeating the sequence loads it with one read and no
        join; noted in `record` (its sequence's eviction deletes it)."""
        persisted = self.merges.persisted
        if persisted is None:
            return
        whole = persisted.persist_whole(codec, last_key, state, n, fingerprint)
        if whole is not None:
            record.whole = whole[0]
            self._stats.wholes_written += whole[1] > 0
            self._stats.bytes_written += whole[1]


__all__ = ["WHOLE_PROBES", "WholeStates", "whole_state_key"]
