"""Merged prefixes kept as single segments, so a long prefix joins from one part, not hundreds.

Owns which merged prefixes are kept (PrefixMemo in RAM, PersistedMerges in a shared store), their
bounds, recency and the prefixes seen once; never decides which chunks a prompt has (PromptCache does).

A merged prefix is named by the key of its last block: the block keys are a hash chain, so that
one key names every block before it too (keys.py). It also answers for its earlier prefixes at
every `alias_every`-th block, cut to them, so a new question after a cached system prompt starts
from the system prompt's merged state. Segments live in `_segments` (a cachetools LRUCache bounded
in bytes) behind `_get`/`_drop` and remember() only: the seam where a store could later back them
(issue 15), keyed by plain strings.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachetools import FIFOCache, LRUCache

from promptcache.codec import StateCodec
from promptcache.errors import CodecError, PromptCacheError
from promptcache.store import Store

log = logging.getLogger(__name__)

MEMO_MIN_BLOCKS = 4  # below this a prefix joins fast enough on its own
MEMO_ALIAS_EVERY = 16  # a merged prefix answers for its earlier prefixes at every 16th block
MEMO_SEEN_LIMIT = 64  # prefixes remembered as seen once, oldest forgotten first

PERSIST_MIN_BLOCKS = 32  # a fresh process joins fewer blocks than this fast enough (256 tokens)
PERSIST_EVERY = (
    16  # persisted merges end at multiples of 16 blocks: sequences that share them share one
)

WHOLE_BYTES = 256 << 20  # whole states a PromptCache keeps in a shared store (its own writes, FIFO)

# A merged segment's name: codec name and its last block's key. A str, so a store could hold it.
MemoKey = str


def memo_key(codec_name: str, block_key: str) -> MemoKey:
    return f"memo-{codec_name}-{block_key}"


def whole_key(codec_name: str, chunk_key: str) -> str:
    """The name of a sequence's whole state: codec name and the key of the sequence's last chunk
    (the hash chain names every token before it, the tail's too)."""
    return f"whole-{codec_name}-{chunk_key}"


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
        # Least recently used out first; remember() makes room itself, so that aliases go too.
        self._segments: LRUCache[MemoKey, bytes] = LRUCache(capacity_bytes, getsizeof=len)
        # alias -> (its length in blocks, the kept prefixes it is an earlier part of, oldest first)
        self._alias: dict[MemoKey, tuple[int, list[MemoKey]]] = {}
        self._aliases_of: dict[MemoKey, list[MemoKey]] = {}
        self._seen: FIFOCache[MemoKey, None] = FIFOCache(max(seen_limit, 1))

    @property
    def nbytes(self) -> int:
        """Bytes of the merged segments kept (never more than capacity_bytes)."""
        return self._segments.currsize

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

    def holds(self, codec: StateCodec, block_keys: Sequence[str]) -> bool:
        """Whether find() would answer for `block_keys`, without cutting or touching anything."""
        if len(block_keys) < self.min_blocks or not self._segments:
            return False
        for i in range(len(block_keys) - 1, self.min_blocks - 2, -1):
            key = memo_key(codec.name, block_keys[i])
            if key in self._segments or any(
                m in self._segments for m in self._alias.get(key, (0, []))[1]
            ):
                return True
        return False

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
        while self._segments.currsize + len(segment) > self.capacity_bytes:
            self._drop(self._segments.popitem()[0])
        self._segments[key] = segment
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
        if self.seen_limit > 0:
            self._seen[key] = None  # past seen_limit, the oldest sighting is forgotten
        return False

    def forget(self, key: MemoKey) -> None:
        """Forget one merged segment (a persisted merge found broken), its aliases with it."""
        self._drop(key)

    def clear(self) -> None:
        """Forget every segment and every sighting."""
        self._segments.clear()
        self._alias.clear()
        self._aliases_of.clear()
        self._seen.clear()

    # ------------------------------------------------ segment storage (the seam for a store)

    def _get(self, key: MemoKey) -> bytes | None:
        return self._segments.get(key)  # a hit makes it recent

    def _drop(self, key: MemoKey) -> None:
        self._segments.pop(key, None)
        for alias in self._aliases_of.pop(key, ()):
            mains = self._alias[alias][1]
            mains.remove(key)
            if not mains:
                del self._alias[alias]


class PersistedMerges:
    """Merged prefixes in a shared store (disk, Redis), so that a fresh process reads one segment
    and a few blocks instead of every block of a long prefix (issue 15).

    Content-addressed like the blocks: a merge is named by memo_key(codec, key of its last block),
    written with the fingerprint and checked on read (envelope checksum, then its token count);
    a damaged or foreign one is a logged miss, deleted, and the blocks answer instead.

    Bytes. A merge duplicates blocks the store holds already, so it is bounded three ways: only
    inserted sequences of at least `min_blocks` blocks get one; it ends at the last multiple of
    `every` blocks, so the sequences of one long system prompt (which diverge after it) share one
    merge instead of one each; and it counts toward the store's capacity like any entry, so the
    store's eviction holds the total (a merge no later prompt reads ages out first under LRU, and
    PromptCache deletes a merge when it forgets the last sequence using its last block).

    Whole states. A merge still leaves a fresh process a join (the merge, the blocks after it,
    a copy of the whole state into new memory: 20 ms of page faults for 30 MB here). So each
    long inserted sequence's state is also kept whole, in the engine's own format, named by its
    last chunk's key (whole_key): a fresh process asking for that sequence again (or for all but
    its last tokens, which an engine re-evaluates) maps that one file and loads it as it is.
    These duplicate their sequence's blocks, so they are bounded apart: the whole states one
    PromptCache wrote stay within `whole_bytes` (WHOLE_BYTES), its oldest deleted first, and
    inside the store's capacity like any entry.
    """

    def __init__(
        self,
        store: Store,
        block_size: int,
        *,
        min_blocks: int = PERSIST_MIN_BLOCKS,
        every: int = PERSIST_EVERY,
        whole_bytes: int = WHOLE_BYTES,
    ) -> None:
        if block_size <= 0 or min_blocks <= 0 or every <= 0 or whole_bytes < 0:
            raise ValueError("block_size, min_blocks and every must be > 0, whole_bytes >= 0")
        self.store = store
        self.block_size = block_size
        self.min_blocks = min_blocks
        self.every = every
        self.whole_bytes = whole_bytes
        # The whole states this instance wrote (key, bytes), oldest first.
        self._wholes: deque[tuple[str, int]] = deque()
        self._whole_used = 0

    def depth(self, n_blocks: int) -> int:
        """Blocks of the merge kept for a prefix of n_blocks full blocks (0: none)."""
        d = n_blocks // self.every * self.every
        return d if d >= self.min_blocks else 0

    def find(
        self, codec: StateCodec, block_keys: Sequence[str], fingerprint: str
    ) -> tuple[MemoHit, str] | None:
        """The deepest persisted merge of a prefix of `block_keys` and the tier that held it, or None.

        A merge whose bytes do not hold exactly its tokens is deleted and skipped (never raises)."""
        for d in range(self.depth(len(block_keys)), self.min_blocks - 1, -self.every):
            key = memo_key(codec.name, block_keys[d - 1])
            found = self._load(codec, key, d * self.block_size, fingerprint)
            if found is False:
                return None
            if found is not None:
                return MemoHit(d, found[0]), found[1]
        return None

    def _load(
        self, codec: StateCodec, key: str, n_tokens: int, fingerprint: str
    ) -> tuple[bytes | memoryview, str] | None | bool:
        """(value, tier) of key if it holds exactly n_tokens; None if absent or dropped (it held
        another count); False if the store cannot be read. Read as a view: a disk tier maps a
        large value instead of copying it, so a fresh process's first hit pays no page faults for it."""
        try:
            value, tier = self.store.get_view_with_tier(key, fingerprint=fingerprint)
        except PromptCacheError as exc:
            log.warning("cannot read merged prefix %s (%s); reading its blocks", key, exc)
            return False
        if value is None:
            return None
        try:
            covers = codec.n_tokens(value)
        except CodecError:
            covers = -1
        if covers != n_tokens:
            self.drop(key, f"it holds {covers} tokens, not {n_tokens}")
            return None
        return value, tier

    # ------------------------------------------------ whole states (a fresh process's repeat)

    def persist_whole(
        self, codec: StateCodec, chunk_key: str, state: bytes, n_tokens: int, fingerprint: str
    ) -> tuple[str, int] | None:
        """Write `state`, the engine's own state of a whole n_tokens-token sequence whose last
        chunk is `chunk_key`, as it is (no split, no copy): a fresh process that asks for this
        sequence again loads it in one read, with no join, and drops the cells past its prefix.
        Only sequences of at least min_blocks blocks; the whole states this instance wrote stay
        within whole_bytes (oldest deleted first). Returns (key, bytes written) or None."""
        if n_tokens < self.min_blocks * self.block_size or len(state) > self.whole_bytes:
            return None
        key = whole_key(codec.name, chunk_key)
        try:
            if self.store.contains(key):
                return key, 0
            self.store.put(key, state, fingerprint=fingerprint)
        except PromptCacheError as exc:
            log.info("whole state %s not persisted: %s", key, exc)
            return None
        self._wholes.append((key, len(state)))
        self._whole_used += len(state)
        while self._whole_used > self.whole_bytes:
            old, size = self._wholes.popleft()
            self._whole_used -= size
            self.drop(old, "newer whole states took its room")
        return key, len(state)

    def find_whole(
        self, codec: StateCodec, candidates: Sequence[tuple[int, str]], fingerprint: str
    ) -> tuple[int, bytes | memoryview, str] | None:
        """(tokens, state, tier) of the first persisted whole state among `candidates` ((sequence
        length, key of its last chunk), preferred first) that holds its tokens, or None."""
        for n_tokens, chunk_key in candidates:
            if n_tokens < self.min_blocks * self.block_size:
                continue
            key = whole_key(codec.name, chunk_key)
            try:
                if not self.store.contains(key):
                    continue
            except PromptCacheError:
                return None
            found = self._load(codec, key, n_tokens, fingerprint)
            if found is False:
                return None
            if found is not None:
                return n_tokens, found[0], found[1]
        return None

    def persist(
        self,
        codec: StateCodec,
        block_keys: Sequence[str],
        cut: Callable[[int], bytes],
        fingerprint: str,
    ) -> tuple[str, int] | None:
        """Write the merge of the first depth(len(block_keys)) blocks unless the store holds it;
        `cut(n_tokens)` makes its segment. Returns (its key, bytes written: 0 if it was there)
        when the store holds it now, else None. A store that refuses it (full, too small, down)
        is logged, not raised: a merge only saves time."""
        d = self.depth(len(block_keys))
        if not d:
            return None
        key = memo_key(codec.name, block_keys[d - 1])
        try:
            if self.store.contains(key):
                return key, 0
            segment = cut(d * self.block_size)
            self.store.put(key, segment, fingerprint=fingerprint)
        except PromptCacheError as exc:
            log.info("merged prefix %s not persisted: %s", key, exc)
            return None
        return key, len(segment)

    def drop(self, key: str, why: str) -> None:
        """Delete a merge (damaged, or no sequence of this process uses it any more)."""
        log.info("dropping merged prefix %s: %s", key, why)
        try:
            self.store.delete(key)
        except PromptCacheError as exc:
            log.warning("cannot delete merged prefix %s: %s", key, exc)


__all__ = [
    "PrefixMemo",
    "PersistedMerges",
    "MemoHit",
    "MemoKey",
    "memo_key",
    "whole_key",
    "WHOLE_BYTES",
    "MEMO_MIN_BLOCKS",
    "MEMO_ALIAS_EVERY",
    "PERSIST_MIN_BLOCKS",
    "PERSIST_EVERY",
]
