"""The plan of a lookup: which segments hold the longest known prefix of a prompt, by their names.

Owns segment naming (content addresses over keys.py's hash chain) and the planning steps: this
process's index, then a persisted merge, then a shared store's blocks; never reads a segment's bytes.

Segments. A state covering tokens [0, n) is cut at every multiple of `block_size`. The segment
for [j*B, e) (e = (j+1)*B, or n for the tail) is keyed by chain(h_j, tokens[j*B:e]) where h_j is
the hash chain over (fingerprint, the full blocks before it): full blocks are shared by every
sequence with the same prefix (stored once), and any process can compute their keys from a
prompt alone, which is how a fresh process finds what others wrote to a shared store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from promptcache import keys as K
from promptcache.codec import StateCodec
from promptcache.index import RadixIndex
from promptcache.memo import MemoHit
from promptcache.store import Store

if TYPE_CHECKING:
    from promptcache.cache.merges import Merges


def segment_key(key: bytes) -> str:
    """The store key of the segment that a hash-chain key names."""
    return "kv-" + key.hex()


def bounds(n_tokens: int, block_size: int) -> list[int]:
    """Where a state of n_tokens tokens is cut: every multiple of block_size, and its end."""
    return list(range(0, n_tokens, block_size)) + [n_tokens]


def segment_keys(
    tokens_le: bytes, cuts: list[int], prefix: list[bytes], block_size: int
) -> list[str]:
    """The keys of the segments between `cuts`, given the prompt's block keys `prefix`
    (keys.block_keys: prefix[j] keys the first j blocks): a full block is named by its block key,
    a shorter tail by the chain over its tokens."""
    view = memoryview(tokens_le)
    out = []
    for j, (a, e) in enumerate(zip(cuts, cuts[1:])):
        full = e - a == block_size
        out.append(segment_key(prefix[j + 1] if full else K.chain(prefix[j], view[4 * a : 4 * e])))
    return out


@dataclass(frozen=True)
class SegmentPlan:
    """The segments a lookup reads: full blocks in token order, then at most one segment cut to
    `partial_len` tokens (a tail, or a block of a sequence that goes on differently)."""

    blocks: list[str]
    partial_key: str | None = None
    partial_len: int = 0
    merged: MemoHit | None = None  # a persisted merge of the first blocks, read while planning
    merged_tier: str = ""

    def tokens(self, block_size: int) -> int:
        return len(self.blocks) * block_size + self.partial_len

    def keys(self) -> list[str]:
        return self.blocks + ([self.partial_key] if self.partial_key is not None else [])

    def cut_to(self, n_blocks: int) -> SegmentPlan:
        """The plan's first n_blocks full blocks (the segments after them are not readable)."""
        return SegmentPlan(self.blocks[:n_blocks], merged=self.merged, merged_tier=self.merged_tier)

    def without_merge(self) -> SegmentPlan:
        return SegmentPlan(self.blocks, self.partial_key, self.partial_len)


class Planner:
    """Plans lookups over one store. shared: other processes write the store too, so what this
    process's index does not know is looked for in persisted merges and probed in the store."""

    def __init__(self, store: Store, block_size: int, merges: Merges, *, shared: bool) -> None:
        self.store = store
        self.block_size = block_size
        self.merges = merges
        self.shared = shared

    def plan(
        self,
        tokens_le: bytes,
        limit: int,
        fingerprint: str,
        codec: StateCodec,
        prefix: list[bytes],
        index: RadixIndex | None,
    ) -> SegmentPlan:
        """The segments that hold the longest known prefix of tokens_le[:limit] (index, then a
        persisted merge, then the shared store's blocks). `prefix`: the prompt's block keys, over
        all of the prompt when the store is shared (probing it needs all of them)."""
        plan = self._from_index(index, tokens_le, limit, prefix)
        if self.shared and plan.tokens(self.block_size) < limit:
            plan = self.merges.deepen(plan, limit, prefix, fingerprint, codec)
            plan = self._from_store(plan, tokens_le, limit, prefix)
        return plan

    def _from_index(
        self, index: RadixIndex | None, tokens_le: bytes, limit: int, prefix: list[bytes]
    ) -> SegmentPlan:
        B = self.block_size
        match = index.match(tokens_le[: 4 * limit]) if index is not None else None
        if index is None or match is None or not match.length:
            return SegmentPlan([])
        seq = index.terminal_below(match.node)
        index.touch(seq)
        n_full, partial_len = divmod(match.length, B)
        blocks = [segment_key(prefix[j + 1]) for j in range(n_full)]
        if not partial_len:
            return SegmentPlan(blocks)
        # The segment that covers the match's last tokens belongs to a cached sequence that goes
        # on differently (or further): its key comes from that sequence's tokens, not the prompt's.
        seq_tokens = index.tokens_of(seq)
        end = min(len(seq_tokens) // 4, (n_full + 1) * B)
        tail = memoryview(seq_tokens)[4 * n_full * B : 4 * end]
        return SegmentPlan(blocks, segment_key(K.chain(prefix[n_full], tail)), partial_len)

    def _from_store(
        self, plan: SegmentPlan, tokens_le: bytes, limit: int, prefix: list[bytes]
    ) -> SegmentPlan:
        """Other processes may have written what this index does not know: probe the prompt's own
        blocks (over all of the prompt: a block or tail that runs past `limit` is cut to it)."""
        B, n = self.block_size, len(tokens_le) // 4
        # A persisted merge's blocks are there (content-addressed): start after them.
        j = len(plan.blocks)
        while (j + 1) * B <= n and self.store.contains(segment_key(prefix[j + 1])):
            j += 1
        if j * B > plan.tokens(B):
            n_full = min(j, limit // B)
            partial_len = limit - n_full * B if j * B >= limit else 0
            partial_key = segment_key(prefix[n_full + 1]) if partial_len else None
            blocks = [segment_key(prefix[i + 1]) for i in range(n_full)]
            plan = SegmentPlan(blocks, partial_key, partial_len, plan.merged, plan.merged_tier)
        start = len(plan.blocks) * B
        if plan.partial_key is not None or start >= limit:
            return plan
        view = memoryview(tokens_le)
        for r in range(min(B - 1, n - start), 0, -1):
            key = segment_key(K.chain(prefix[len(plan.blocks)], view[4 * start : 4 * (start + r)]))
            if self.store.contains(key):
                return SegmentPlan(
                    plan.blocks, key, min(r, limit - start), plan.merged, plan.merged_tier
                )
        return plan


__all__ = ["Planner", "SegmentPlan", "bounds", "segment_key", "segment_keys"]
