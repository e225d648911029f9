"""PrefixMemo: merged prefixes kept as single segments, so a long prefix joins from one part, not hundreds.

Owns which merged prefixes are kept, their byte bound, recency and the prefixes seen once;
never reads or writes a store and never decides which chunks a prompt has (PromptCache does).

A merged prefix is named by the key of its last block: the block keys are a hash chain, so that
one key names every block before it too (keys.py). It also answers for its earlier prefixes at
every `alias_every`-th block, cut to them, so a new question after a cached system prompt starts
from the system prompt's merged state. Segments live in `_segments` behind `_get`/`_put`/`_drop`
only: that is the seam where a store could later back them (issue 15), keyed by plain strings.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from promptcache.codec import StateCodec

MEMO_MIN_BLOCKS = 4  # below this a prefix joins fast enough on its own
MEMO_ALIAS_EVERY = 16  # a merged prefix answers for its earlier prefixes at every 16th block
MEMO_SEEN_LIMIT = 64  # prefixes remembered as seen once, oldest forgotten first

# A merged segment's name: codec name and its last block's key. A str, so a store could hold it.
MemoKey = str


def memo_key(codec_name: str, block_key: str) -> MemoKey:
    return f"memo-{codec_name}-{block_key}"


@dataclass(frozen=True)
class MemoHit:
    """A merged segment covering exactly the first `n_blocks` blocks of the keys given to find()."""

    n_blocks: int
    segment: bytes


class PrefixMemo:
    """Merged prefixes within `capacity_bytes`, least recently used out first.

    block_size: tokens per block (an alias's segment is cut to n_blocks * block_size tokens).
    min_blocks: prefixes shorter than this are neither kept nor found.
    """

    def __init__(
        self,
        capacity_bytes: int,
        block_size: int,
        *,
        min_blocks: int = MEMO_MIN_BLOCKS,
        alias_every: int = MEMO_ALIAS_EVERY,
        seen_limit: int = MEMO_SEEN_LIMIT,
    ) -> None:
        if capacity_bytes < 0 or block_size <= 0 or min_blocks <= 0 or alias_every <= 0:
            raise ValueError("capacity_bytes must be >= 0; block_size, min_blocks, alias_every > 0")
        self.capacity_bytes = capacity_bytes
        self.block_size = block_size
        self.min_blocks = min_blocks
        self.alias_every = alias_every
        self.seen_limit = seen_limit
        self._segments: OrderedDict[MemoKey, bytes] = OrderedDict()
        self._used = 0
        # alias -> (its length in blocks, the kept prefixes it is an earlier part of, oldest first)
        self._alias: dict[MemoKey, tuple[int, list[MemoKey]]] = {}
        self._aliases_of: dict[MemoKey, list[MemoKey]] = {}
        self._seen: OrderedDict[MemoKey, None] = OrderedDict()

    @property
    def nbytes(self) -> int:
        """Bytes of the merged segments kept (never more than capacity_bytes)."""
        return self._used

    def __len__(self) -> int:
        return len(self._segments)

    def keeps(self, n_blocks: int) -> bool:
        """Whether a prefix of n_blocks blocks is worth merging at all (callers skip the split if not)."""
        return n_blocks >= self.min_blocks and self.capacity_bytes > 0

    def find(self, codec: StateCodec, block_keys: Sequence[str]) -> MemoHit | None:
        """The deepest kept prefix of `block_keys` (a prompt's full blocks, in order), or None.

        An alias hit is its merged segment cut to the alias's length (codec.cut raises CodecError).
        """
        if len(block_keys) < self.min_blocks or not self._segments:
            return None
        for i in range(len(block_keys) - 1, self.min_blocks - 2, -1):
            key = memo_key(codec.name, block_keys[i])
            segment = self._get(key)
            if segment is not None:
                return MemoHit(i + 1, segment)
            n_blocks, mains = self._alias.get(key, (0, []))
            for main in reversed(
                mains
            ):  # any prefix that goes on past this block holds it: the newest
                whole = self._get(main)
                if whole is not None:
                    return MemoHit(n_blocks, codec.cut(whole, n_blocks * self.block_size))
        return None

    def remember(self, codec: StateCodec, block_keys: Sequence[str], segment: bytes) -> bool:
        """Keep `segment`, the merged state of exactly `block_keys`; True if kept.

        Too short a prefix, or a segment larger than capacity_bytes, is not kept. Older segments
        leave, least recently used first, until the bound holds.
        """
        if len(block_keys) < self.min_blocks:
            return False
        key = memo_key(codec.name, block_keys[-1])
        self._drop(key)
        if len(segment) > self.capacity_bytes:
            return False
        while self._used + len(segment) > self.capacity_bytes:
            self._drop(next(iter(self._segments)))
        self._put(key, segment)
        aliases = []
        for i in range(self.alias_every - 1, len(block_keys) - 1, self.alias_every):
            alias = memo_key(codec.name, block_keys[i])
            self._alias.setdefault(alias, (i + 1, []))[1].append(key)
            aliases.append(alias)
        self._aliases_of[key] = aliases
        return True

    def seen_twice(self, codec: StateCodec, block_keys: Sequence[str]) -> bool:
        """True if this prefix was seen before (among the last seen_limit first sightings); else
        record this sighting. Merging on the second hit spares a first hit a merge it may never use."""
        if len(block_keys) < self.min_blocks:
            return False
        key = memo_key(codec.name, block_keys[-1])
        if key in self._seen:
            return True
        self._seen[key] = None
        while len(self._seen) > self.seen_limit:
            self._seen.popitem(last=False)
        return False

    def clear(self) -> None:
        """Forget every segment and every sighting."""
        self._segments.clear()
        self._alias.clear()
        self._aliases_of.clear()
        self._seen.clear()
        self._used = 0

    # ------------------------------------------------ segment storage (the seam for a store)

    def _get(self, key: MemoKey) -> bytes | None:
        segment = self._segments.get(key)
        if segment is not None:
            self._segments.move_to_end(key)
        return segment

    def _put(self, key: MemoKey, segment: bytes) -> None:
        self._segments[key] = segment
        self._used += len(segment)

    def _drop(self, key: MemoKey) -> None:
        old = self._segments.pop(key, None)
        if old is not None:
            self._used -= len(old)
        for alias in self._aliases_of.pop(key, ()):
            mains = self._alias[alias][1]
            mains.remove(key)
            if not mains:
                del self._alias[alias]


__all__ = ["PrefixMemo", "MemoHit", "MemoKey", "memo_key", "MEMO_MIN_BLOCKS", "MEMO_ALIAS_EVERY"]
