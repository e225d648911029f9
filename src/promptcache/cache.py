"""PromptCache: the one entry point engines use; longest cached prefix in, state for exactly those tokens out.

Owns the index, the chunking of states into content-addressed blocks and the byte budget;
it does not run models (engines do) and does not lay out bytes on disk (stores do).

Chunking. A state covering tokens [0, n) is cut at every multiple of `block_size`. The chunk
for [j*B, e) (e = (j+1)*B, or n for the tail) is keyed by chain(h_j, tokens[j*B:e]) where h_j is
the hash chain over (fingerprint, the full blocks before it): full blocks are shared by every
sequence with the same prefix (stored once), and any process can compute their keys from a
prompt alone, which is how a fresh process finds what others wrote to a shared store.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from promptcache import keys as K
from promptcache.codec import FixedWidthCodec, OpaqueCodec, StateCodec
from promptcache.errors import CapacityError, CodecError, PromptCacheError
from promptcache.index import Node, RadixIndex
from promptcache.store import MemoryStore, Store

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 8
_MEMO_MIN_BLOCKS = 4  # below this a prefix joins fast enough on its own
_MEMO_ALIAS_EVERY = 16  # a merged prefix answers for its earlier prefixes at every 16th block
_SKIPPED = object()  # lookup found no more than min_tokens: not a hit, not a miss


@dataclass(frozen=True)
class Hit:
    """A cached prefix: `state` covers exactly the first `tokens_reused` tokens of the prompt."""

    tokens_reused: int
    state: bytes
    source: str
    fingerprint: str


@dataclass
class _Record:
    """What one cached sequence holds: its chunk keys (in token order) and their sizes."""

    keys: list[str]
    sizes: list[int]
    opaque: bool = False


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    tokens_looked_up: int = 0
    tokens_reused: int = 0
    inserts: int = 0
    bytes_written: int = 0
    chunks_written: int = 0
    chunks_deduplicated: int = 0
    evicted_sequences: int = 0
    missing_chunks: int = 0
    memo_hits: int = 0
    hits_by_tier: dict[str, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


def _hex(key: bytes) -> str:
    return "kv-" + key.hex()


class PromptCache:
    """Longest-prefix cache of engine states over a byte store.

    store: any Store (MemoryStore by default, DiskStore, a tiered store); capacity_bytes sizes the
    default MemoryStore and is otherwise the store's own. codec: how states are cut and joined
    (engines pass theirs; a non-splittable codec means whole entries only). block_size: tokens per
    chunk (DEFAULT_BLOCK_SIZE, chosen by bench/index_bench.py: see BENCHMARKS.md). shared: whether
    other processes write the store too (default: True for any store but a MemoryStore); a shared
    store is probed for the prompt's blocks on lookup, and eviction leaves its chunks to the store.
    memo_bytes: RAM for merged prefixes (a conversation's state as one segment, so its next turn joins
    two segments instead of hundreds), outside capacity_bytes; default min(256 MiB, capacity / 4).
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        capacity_bytes: int | None = None,
        codec: StateCodec | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        shared: bool | None = None,
        memo_bytes: int | None = None,
    ) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError("block_size must be a positive int")
        if store is None:
            store = MemoryStore(capacity_bytes if capacity_bytes is not None else 2 << 30)
        elif capacity_bytes is not None and capacity_bytes != store.capacity_bytes:
            raise ValueError("give capacity_bytes to the store, not to PromptCache, when passing a store")
        self.store = store
        self.codec: StateCodec = codec if codec is not None else OpaqueCodec()
        self.block_size = block_size
        # A store this cache alone writes holds nothing the index does not know; a shared one
        # (disk, Redis, or any store passed with shared=True) may, so lookups probe it.
        self._probe_store = shared if shared is not None else not isinstance(store, MemoryStore)
        self._indexes: dict[str, RadixIndex] = {}
        self._refs: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self._lock = threading.RLock()
        self._stats = CacheStats()
        self._memo: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._memo_used = 0
        self._memo_alias: dict[tuple[str, str], tuple[tuple[str, str], int]] = {}
        self._memo_aliases_of: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self.memo_bytes = memo_bytes if memo_bytes is not None else min(256 << 20, self.capacity_bytes // 4)
        self._memo_seen: OrderedDict[tuple[str, str], None] = OrderedDict()

    # ---------------------------------------------------------------- public API

    @property
    def capacity_bytes(self) -> int:
        return self.store.capacity_bytes

    def lookup(
        self,
        tokens: Sequence[int],
        fingerprint: str,
        *,
        max_tokens: int | None = None,
        min_tokens: int = 0,
        codec: StateCodec | None = None,
    ) -> Hit | None:
        """The longest cached prefix of `tokens` (at most `max_tokens` long), or None.

        With min_tokens, a prefix of at most that many tokens is not fetched (the caller holds as
        much already) and None is returned without counting a lookup.
        Raises TypeError/ValueError for malformed tokens or fingerprint; store faults are misses.
        """
        tb = K.token_bytes(tokens)
        K.root_key(fingerprint)
        codec = codec or self.codec
        n = len(tb) // 4
        limit = n if max_tokens is None else max(0, min(n, int(max_tokens)))
        with self._lock:
            found: Hit | object | None = None
            if limit > min_tokens:
                try:
                    if codec.splittable:
                        found = self._lookup_chunks(tb, limit, fingerprint, codec, min_tokens)
                    else:
                        found = self._lookup_whole(tb, limit, fingerprint, codec)
                except CodecError as exc:
                    log.warning("cached state failed to join (%s); treating as a miss", exc)
            if found is _SKIPPED or (found is None and 0 < limit <= min_tokens):
                return None
            if isinstance(found, Hit) and found.tokens_reused <= min_tokens:
                return None
            self._stats.lookups += 1
            self._stats.tokens_looked_up += n
            if not isinstance(found, Hit):
                self._stats.misses += 1
                return None
            self._stats.hits += 1
            self._stats.tokens_reused += found.tokens_reused
            self._stats.hits_by_tier[found.source] = self._stats.hits_by_tier.get(found.source, 0) + 1
            return found

    def insert(
        self,
        tokens: Sequence[int],
        state: bytes,
        fingerprint: str,
        *,
        codec: StateCodec | None = None,
    ) -> int:
        """Cache `state`, which covers exactly `tokens`; returns the bytes newly written.

        Raises TypeError/ValueError for malformed input, CodecError if the codec cannot read the
        state, CapacityError if the sequence alone exceeds the capacity.
        """
        tb = K.token_bytes(tokens)
        K.root_key(fingerprint)
        if not tb:
            raise ValueError("cannot cache an empty token sequence")
        if not isinstance(state, (bytes, bytearray, memoryview)):
            raise TypeError(f"state must be bytes, not {type(state).__name__}")
        codec = codec or self.codec
        n = len(tb) // 4
        if codec.splittable:
            have = codec.n_tokens(state)
            if have != n:
                raise ValueError(f"state covers {have} tokens but {n} tokens were given")
            bounds = self._bounds(n)
            chunk_keys = self._chunk_keys(tb, fingerprint, bounds)
        else:
            bounds = [0, n]
            chunk_keys = [_hex(K.chain(K.root_key(fingerprint), tb)) + "-w"]
        with self._lock:
            index = self._indexes.setdefault(fingerprint, RadixIndex())
            existing = index.find(tb)
            if existing is not None and existing.value is not None:
                index.touch(existing)
                if all(self.store.contains(k) for k in existing.value.keys):
                    return 0
                self._forget(index, existing)
            new = [i for i, k in enumerate(chunk_keys) if k not in self._refs]
            if codec.splittable:
                segments = codec.split(bytes(state), bounds) if new else []
            else:
                segments = [bytes(state)]
            sizes = [len(s) for s in segments] if segments else [self._sizes[k] for k in chunk_keys]
            new_bytes = sum(sizes[i] for i in new)
            if new_bytes > self.capacity_bytes:
                raise CapacityError(
                    f"a {n}-token state needs {new_bytes} bytes, more than the cache's capacity of "
                    f"{self.capacity_bytes}; raise capacity_bytes"
                )
            node, _ = index.insert(tb, _Record(chunk_keys, sizes, not codec.splittable))
            for k in chunk_keys:
                self._refs[k] = self._refs.get(k, 0) + 1
            self._make_room(new_bytes, keep=node)
            written = 0
            # Tail first, root block last: a shared prefix ends up the most recently used.
            for i in reversed(new):
                key = chunk_keys[i]
                self._sizes[key] = sizes[i]
                self._bytes += sizes[i]
                if self._probe_store and self.store.contains(key):
                    self._stats.chunks_deduplicated += 1
                    continue
                self.store.put(key, segments[i], fingerprint=fingerprint)
                written += sizes[i]
                self._stats.chunks_written += 1
            self._stats.chunks_deduplicated += len(chunk_keys) - len(new)
            n_full = n // self.block_size
            if codec.splittable and new and n_full >= _MEMO_MIN_BLOCKS:
                # A conversation's next turn extends this state: keep its full blocks as one segment.
                self._remember_merged(
                    (codec.name, chunk_keys[n_full - 1]),
                    codec.split(bytes(state), [0, n_full * self.block_size])[0],
                    chunk_keys[:n_full],
                )
            self._stats.inserts += 1
            self._stats.bytes_written += written
            return written

    def contains(self, tokens: Sequence[int], fingerprint: str) -> bool:
        """Whether exactly this token sequence is cached under `fingerprint` (by this process's index)."""
        tb = K.token_bytes(tokens)
        with self._lock:
            index = self._indexes.get(fingerprint)
            return bool(tb) and index is not None and index.find(tb) is not None

    def adopt(self, tokens: Sequence[int], fingerprint: str, *, codec: StateCodec | None = None) -> bool:
        """Index `tokens` without a state when a shared store already holds every chunk of it
        (another process wrote them); True if adopted. Saves an engine reading and splitting a state
        it just restored. Chunk sizes are not read back: a shared store holds its own capacity.
        """
        codec = codec or self.codec
        tb = K.token_bytes(tokens)
        if not tb or not self._probe_store or not codec.splittable:
            return False
        chunk_keys = self._chunk_keys(tb, fingerprint, self._bounds(len(tb) // 4))
        with self._lock:
            if not all(k in self._refs or self.store.contains(k) for k in chunk_keys):
                return False
            index = self._indexes.setdefault(fingerprint, RadixIndex())
            node, is_new = index.insert(tb, _Record(chunk_keys, [0] * len(chunk_keys)))
            if is_new:
                for k in chunk_keys:
                    self._refs[k] = self._refs.get(k, 0) + 1
                    self._sizes.setdefault(k, 0)
            return True

    def remove(self, tokens: Sequence[int], fingerprint: str) -> bool:
        """Forget one cached sequence (chunks it alone used are deleted); True if it was cached."""
        tb = K.token_bytes(tokens)
        with self._lock:
            index = self._indexes.get(fingerprint)
            node = index.find(tb) if index else None
            if node is None:
                return False
            self._forget(index, node)
            return True

    def clear(self) -> None:
        """Forget everything and empty the store."""
        with self._lock:
            self._indexes.clear()
            self._refs.clear()
            self._sizes.clear()
            self._bytes = 0
            self._memo.clear()
            self._memo_alias.clear()
            self._memo_aliases_of.clear()
            self._memo_used = 0
            self._memo_seen.clear()
            self.store.clear()

    def __len__(self) -> int:
        return sum(len(ix) for ix in self._indexes.values())

    @property
    def nbytes(self) -> int:
        """Bytes of state this cache's index references (each chunk counted once)."""
        return self._bytes

    def stats(self) -> dict[str, object]:
        """Counters of this cache and of its store."""
        s = self._stats
        return {
            "sequences": len(self),
            "chunks": len(self._refs),
            "bytes": self._bytes,
            "capacity_bytes": self.capacity_bytes,
            "block_size": self.block_size,
            "lookups": s.lookups,
            "hits": s.hits,
            "misses": s.misses,
            "hit_rate": s.hit_rate,
            "tokens_looked_up": s.tokens_looked_up,
            "tokens_reused": s.tokens_reused,
            "inserts": s.inserts,
            "bytes_written": s.bytes_written,
            "chunks_written": s.chunks_written,
            "chunks_deduplicated": s.chunks_deduplicated,
            "evicted_sequences": s.evicted_sequences,
            "missing_chunks": s.missing_chunks,
            "memo_hits": s.memo_hits,
            "hits_by_tier": dict(s.hits_by_tier),
            "store": self.store.stats(),
        }

    # ---------------------------------------------------------------- internals

    def _bounds(self, n: int) -> list[int]:
        b = self.block_size
        return list(range(0, n, b)) + [n]

    def _chunk_keys(self, tb: bytes, fingerprint: str, bounds: list[int]) -> list[str]:
        prefix = K.block_keys(fingerprint, tb, self.block_size, (len(bounds) - 1))
        view = memoryview(tb)
        out = []
        for j, (a, e) in enumerate(zip(bounds, bounds[1:])):
            full = e - a == self.block_size
            out.append(_hex(prefix[j + 1] if full else K.chain(prefix[j], view[4 * a : 4 * e])))
        return out

    def _fetch(self, key: str, fingerprint: str) -> tuple[bytes | None, str]:
        return self.store.get_with_tier(key, fingerprint=fingerprint)

    def _lookup_chunks(
        self, tb: bytes, limit: int, fingerprint: str, codec: StateCodec, min_tokens: int = 0
    ) -> Hit | object | None:
        B = self.block_size
        index = self._indexes.get(fingerprint)
        match = index.match(tb[: 4 * limit]) if index else None
        length = match.length if match else 0
        if length:
            assert index is not None and match is not None
            index.touch(index.terminal_below(match.node))
        n_full = length // B
        n = len(tb) // 4
        # Every block key of the whole prompt, hashed once: probing a shared store needs all of them.
        prefix = K.block_keys(fingerprint, tb, B, (n if self._probe_store else limit) // B)
        chunk_keys = [_hex(prefix[j + 1]) for j in range(n_full)]
        partial_key, partial_len = None, length - n_full * B
        if partial_len:
            assert index is not None and match is not None
            # The chunk that covers the match's last tokens belongs to a cached sequence that goes on
            # differently (or further): its key comes from that sequence's tokens, not the prompt's.
            seq_tokens = index.tokens_of(index.terminal_below(match.node))
            end = min(len(seq_tokens) // 4, (n_full + 1) * B)
            partial_key = _hex(K.chain(prefix[n_full], memoryview(seq_tokens)[4 * n_full * B : 4 * end]))
        if self._probe_store and length < limit:
            # Other processes may have written what this index does not know: probe the prompt's own
            # blocks (over the whole prompt: a block or tail that runs past `limit` is cut to it).
            j = n_full
            while (j + 1) * B <= n and self.store.contains(_hex(prefix[j + 1])):
                j += 1
            if j * B > length:
                whole = min(j, limit // B)
                chunk_keys = [_hex(prefix[i + 1]) for i in range(whole)]
                partial_len = limit - whole * B if j * B >= limit else 0
                partial_key = _hex(prefix[whole + 1]) if partial_len else None
                n_full = whole
            if partial_key is None and n_full * B < limit:
                view = memoryview(tb)
                start = n_full * B
                for r in range(min(B - 1, n - start), 0, -1):
                    key = _hex(K.chain(prefix[n_full], view[4 * start : 4 * (start + r)]))
                    if self.store.contains(key):
                        partial_key, partial_len = key, min(r, limit - start)
                        break
        n_blocks = len(chunk_keys)
        if partial_key is not None:
            chunk_keys.append(partial_key)
        if not chunk_keys:
            return None
        if n_blocks * B + partial_len <= min_tokens:
            return _SKIPPED  # the caller already holds as much (its live context): fetch nothing
        # The deepest prefix merged before comes from the memo as one segment: the hash chain makes
        # the key of its last block name all of its blocks. Only the blocks after it are fetched.
        # A merged prefix also answers for its earlier blocks every _MEMO_ALIAS_EVERY blocks (cut
        # to them): a new question after a cached system prompt starts from it too.
        m, merged = 0, None
        if n_blocks >= _MEMO_MIN_BLOCKS and self._memo:
            for i in range(n_blocks - 1, _MEMO_MIN_BLOCKS - 2, -1):
                key = (codec.name, chunk_keys[i])
                found = self._memo.get(key)
                if found is None and key in self._memo_alias:
                    main, count = self._memo_alias[key]
                    whole = self._memo.get(main)
                    if whole is not None:
                        key, found = main, codec.cut(whole, count * B)
                if found is not None:
                    m, merged = i + 1, found
                    self._memo.move_to_end(key)
                    self._stats.memo_hits += 1
                    break
        segments: list[bytes] = [b""] * len(chunk_keys)
        tiers = {"memory"} if merged is not None else set()
        usable = len(chunk_keys)
        for i in reversed(range(m, len(chunk_keys))):  # deepest first: the root block ends most recent
            value, tier = self._fetch(chunk_keys[i], fingerprint)
            if value is None:
                usable = i
                continue
            segments[i] = value
            tiers.add(tier)
        if usable < len(chunk_keys):
            self._stats.missing_chunks += len(chunk_keys) - usable
            self._drop_missing(fingerprint, chunk_keys[usable])
            n_blocks, partial_len = min(n_blocks, usable), 0
            if n_blocks == 0:
                return None
        parts = ([merged] if merged is not None else []) + segments[m:n_blocks]
        if len(parts) > 2 and n_blocks >= _MEMO_MIN_BLOCKS:
            # Merge on the second hit of a prefix: a first hit would pay the merge for nothing.
            key = (codec.name, chunk_keys[n_blocks - 1])
            if key in self._memo_seen:
                merged_all = codec.split(codec.join(parts), [0, n_blocks * B])[0]
                parts = [self._remember_merged(key, merged_all, chunk_keys[:n_blocks])]
            else:
                self._memo_seen[key] = None
                while len(self._memo_seen) > 64:
                    self._memo_seen.popitem(last=False)
        if partial_len:
            parts.append(codec.cut(segments[n_blocks], partial_len))
        reused = n_blocks * B + partial_len
        return Hit(reused, codec.join(parts), self.store.slowest(tiers), fingerprint)

    def _remember_merged(
        self, key: tuple[str, str], merged: bytes, block_keys: Sequence[str] = ()
    ) -> bytes:
        """Keep a merged prefix in the memo, least recently used out first, within memo_bytes.
        block_keys (the keys of its blocks, in order) register it for its earlier prefixes too."""
        self._forget_merged(key)
        if len(merged) <= self.memo_bytes:
            self._memo[key] = merged
            self._memo_used += len(merged)
            aliases = []
            for i in range(_MEMO_ALIAS_EVERY - 1, len(block_keys) - 1, _MEMO_ALIAS_EVERY):
                alias = (key[0], block_keys[i])
                self._memo_alias[alias] = (key, i + 1)
                aliases.append(alias)
            self._memo_aliases_of[key] = aliases
        while self._memo_used > self.memo_bytes:
            self._forget_merged(next(iter(self._memo)))
        return merged

    def _forget_merged(self, key: tuple[str, str]) -> None:
        old = self._memo.pop(key, None)
        if old is not None:
            self._memo_used -= len(old)
        for alias in self._memo_aliases_of.pop(key, ()):
            if self._memo_alias.get(alias, (None,))[0] == key:
                del self._memo_alias[alias]

    def _lookup_whole(self, tb: bytes, limit: int, fingerprint: str, codec: StateCodec) -> Hit | None:
        index = self._indexes.get(fingerprint)
        candidates: list[int] = []
        if index is not None:
            candidates = [t.depth for t in index.match(tb[: 4 * limit]).terminals]
        if self._probe_store and limit not in candidates:
            candidates.append(limit)
        root = K.root_key(fingerprint)
        for depth in sorted(set(candidates), reverse=True):
            key = _hex(K.chain(root, tb[: 4 * depth])) + "-w"
            value, tier = self._fetch(key, fingerprint)
            if value is None:
                continue
            if index is not None and (node := index.find(tb[: 4 * depth])) is not None:
                index.touch(node)
            return Hit(depth, codec.join([value]), tier, fingerprint)
        return None

    def _drop_missing(self, fingerprint: str, key: str) -> None:
        """A chunk vanished from the store (evicted by another process, or corrupt): forget its users."""
        index = self._indexes.get(fingerprint)
        if index is None:
            return
        for node in [n for n in index.sequences() if key in n.value.keys]:
            self._forget(index, node)

    def _forget(self, index: RadixIndex, node: Node) -> None:
        record: _Record = node.value
        index.remove(node)
        for k in record.keys:
            left = self._refs.get(k, 0) - 1
            if left > 0:
                self._refs[k] = left
                continue
            self._refs.pop(k, None)
            self._bytes -= self._sizes.pop(k, 0)
            if not self._probe_store:
                self.store.delete(k)

    def _make_room(self, new_bytes: int, keep: Node) -> None:
        """Evict least recently used leaf sequences until new_bytes fit (a shared prefix outlives its branches)."""
        while self._bytes + new_bytes > self.capacity_bytes:
            victim = None
            for index in self._indexes.values():
                leaf = index.lru_leaf(exclude=keep)
                if leaf is not None and (victim is None or leaf.last_access < victim[1].last_access):
                    victim = (index, leaf)
            if victim is None:
                raise PromptCacheError("nothing left to evict")  # unreachable: new_bytes <= capacity
            self._forget(*victim)
            self._stats.evicted_sequences += 1


__all__ = ["PromptCache", "Hit", "CacheStats", "DEFAULT_BLOCK_SIZE", "FixedWidthCodec"]
