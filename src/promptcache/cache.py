"""PromptCache: the one entry point engines use; longest cached prefix in, state for exactly those tokens out.

Owns the index, the chunking of states into content-addressed blocks and the byte budget;
it does not run models (engines do) and does not lay out bytes on disk (stores do).

Chunking. A state covering tokens [0, n) is cut at every multiple of `block_size`. The chunk
for [j*B, e) (e = (j+1)*B, or n for the tail) is keyed by chain(h_j, tokens[j*B:e]) where h_j is
the hash chain over (fingerprint, the full blocks before it): full blocks are shared by every
sequence with the same prefix (stored once), and any process can compute their keys from a
prompt alone, which is how a fresh process finds what others wrote to a shared store.

PromptCache coordinates four parts: a RadixIndex per fingerprint (which sequences are cached),
a _ChunkLedger (which chunks they use, their sizes, the bytes held), a PrefixMemo (merged
prefixes in RAM) and, over a shared store, PersistedMerges (merged prefixes in the store, for a
fresh process). A lookup plans the chunks to read (index, then a persisted merge, then a shared
store's probe), then reads them (memo first, store for the rest), then merges a prefix seen twice.
A request hashes its prompt's block keys once: insert and adopt reuse the keys lookup computed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from promptcache import keys as K
from promptcache.codec import FixedWidthCodec, OpaqueCodec, StateCodec
from promptcache.errors import CapacityError, CodecError, PromptCacheError
from promptcache.index import Node, RadixIndex
from promptcache.memo import MemoHit, PersistedMerges, PrefixMemo, memo_key
from promptcache.store import MemoryStore, Store

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 8
WHOLE_PROBES = 8  # aligned whole entries probed per lookup in a shared store (one get each)


@dataclass(frozen=True)
class Hit:
    """A cached prefix: `state` covers exactly the first `tokens_reused` tokens of the prompt, or,
    for a lookup with trim=True, `state_tokens` tokens of which the first tokens_reused are the
    prompt's (the caller drops the cells past them after loading). `state` may be a read-only
    view of a mapped file (disk): load it, do not keep it past the next lookup."""

    tokens_reused: int
    state: bytes | memoryview
    source: str
    fingerprint: str
    state_tokens: int = 0  # 0: tokens_reused

    @property
    def trimmed(self) -> bool:
        """Whether the state covers more than tokens_reused tokens (see trim in lookup)."""
        return self.state_tokens > self.tokens_reused

    def cut(self, n: int, codec: StateCodec) -> Hit | None:
        """This hit cut to its first n tokens with `codec` (which must be splittable), or None,
        logged, when its state does not cut."""
        try:
            state = codec.join([codec.split(self.state, [0, n])[0]])
        except CodecError as exc:
            log.warning("could not cut a cached state to %d tokens: %s", n, exc)
            return None
        return Hit(n, state, self.source, self.fingerprint)


@dataclass
class _Record:
    """What one cached sequence holds: its chunk keys (in token order) and their sizes, and the
    persisted merge its insert wrote (key, key of the merge's last block), if any."""

    keys: list[str]
    sizes: list[int]
    merged: tuple[str, str] | None = None
    whole: str | None = None  # the key of its persisted whole state, if its insert wrote one


@dataclass(frozen=True)
class _ChunkPlan:
    """The chunks a lookup reads: whole blocks in token order, then at most one chunk cut to
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

    def cut_to(self, n_chunks: int) -> _ChunkPlan:
        """The plan's first n_chunks whole blocks (the chunks after them are not readable)."""
        return _ChunkPlan(self.blocks[:n_chunks], merged=self.merged, merged_tier=self.merged_tier)

    def without_merge(self) -> _ChunkPlan:
        return _ChunkPlan(self.blocks, self.partial_key, self.partial_len)


class _ChunkLedger:
    """Which chunks the index references: how many cached sequences use each, and their bytes."""

    def __init__(self) -> None:
        self.refs: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.nbytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self.refs

    def __len__(self) -> int:
        return len(self.refs)

    def size(self, key: str) -> int:
        return self.sizes[key]

    def hold(self, keys: Iterable[str], size: int | None = None) -> None:
        """One more sequence uses each key; with size, keys not sized yet get it (adopt: 0)."""
        for k in keys:
            self.refs[k] = self.refs.get(k, 0) + 1
            if size is not None:
                self.sizes.setdefault(k, size)

    def add(self, key: str, size: int) -> None:
        """A held chunk's bytes are now cached."""
        self.sizes[key] = size
        self.nbytes += size

    def release(self, keys: Iterable[str]) -> list[str]:
        """One sequence fewer uses each key; returns the keys no sequence uses any more."""
        freed = []
        for k in keys:
            left = self.refs.get(k, 0) - 1
            if left > 0:
                self.refs[k] = left
                continue
            self.refs.pop(k, None)
            self.nbytes -= self.sizes.pop(k, 0)
            freed.append(k)
        return freed

    def clear(self) -> None:
        self.refs.clear()
        self.sizes.clear()
        self.nbytes = 0


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
    merges_read: int = 0
    merges_written: int = 0
    wholes_read: int = 0
    wholes_written: int = 0
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
    other processes write the store too (default: the store's `persistent`, True for disk and Redis); a shared
    store is probed for the prompt's blocks on lookup, and eviction leaves its chunks to the store.
    memo_bytes: RAM for merged prefixes (a conversation's state as one segment, so its next turn joins
    two segments instead of hundreds), outside capacity_bytes; default min(256 MiB, capacity / 4).
    persist_merges: over a shared store, also write merged prefixes of long inserted sequences to the
    store (memo.PersistedMerges: bounded there, inside the store's capacity), so that a fresh
    process's first hit reads one segment and a few blocks, and the whole states of long inserted
    sequences, so that a fresh process repeating one loads it with one mapped read and no join
    (lookup's trim); default True (ignored unless shared).
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
        persist_merges: bool = True,
    ) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError("block_size must be a positive int")
        if store is None:
            store = MemoryStore(capacity_bytes if capacity_bytes is not None else 2 << 30)
        elif capacity_bytes is not None and capacity_bytes != store.capacity_bytes:
            raise ValueError(
                "give capacity_bytes to the store, not to PromptCache, when passing a store"
            )
        self.store = store
        self.codec: StateCodec = codec if codec is not None else OpaqueCodec()
        self.block_size = block_size
        # A store this cache alone writes holds nothing the index does not know; a shared one
        # (disk, Redis, or any store passed with shared=True) may, so lookups probe it.
        self._probe_store = shared if shared is not None else store.persistent
        self._indexes: dict[str, RadixIndex] = {}
        self._chunks = _ChunkLedger()
        if memo_bytes is None:
            memo_bytes = min(256 << 20, self.capacity_bytes // 4)
        self._memo = PrefixMemo(memo_bytes, block_size)
        self._merges = (
            PersistedMerges(store, block_size) if self._probe_store and persist_merges else None
        )
        # (fingerprint, token bytes, block keys) of the last prompt hashed: one hash per request.
        self._last_keys: tuple[str, bytes, list[bytes]] = ("", b"", [])
        self._lock = threading.RLock()
        self._stats = CacheStats()

    # ---------------------------------------------------------------- public API

    @property
    def capacity_bytes(self) -> int:
        return self.store.capacity_bytes

    @property
    def memo_bytes(self) -> int:
        """RAM bound of the merged prefixes (PrefixMemo), outside capacity_bytes."""
        return self._memo.capacity_bytes

    def lookup(
        self,
        tokens: Sequence[int],
        fingerprint: str,
        *,
        max_tokens: int | None = None,
        min_tokens: int = 0,
        codec: StateCodec | None = None,
        align: int = 0,
        trim: bool = False,
    ) -> Hit | None:
        """The longest cached prefix of `tokens` (at most `max_tokens` long), or None.

        With trim, the caller drops the state's cells past hit.tokens_reused itself (an engine
        truncates its context after loading), so a longer state may answer (Hit.state_tokens):
        over a shared store, the whole state of a cached sequence of max_tokens to len(tokens)
        tokens is read as it is, one file and no join (PersistedMerges, "Whole states").

        With min_tokens, a prefix of at most that many tokens is not fetched (the caller holds as
        much already) and None is returned without counting a lookup. With align, whole entries a
        shared store may hold are probed at the multiples of align up to max_tokens (deepest first,
        at most WHOLE_PROBES of them), where engines on an aligned schedule keep their checkpoints.
        Raises TypeError/ValueError for malformed tokens or fingerprint; store faults are misses.
        """
        tb = K.token_bytes(tokens)
        K.root_key(fingerprint)
        codec = codec or self.codec
        n = len(tb) // 4
        limit = n if max_tokens is None else max(0, min(n, int(max_tokens)))
        with self._lock:
            if 0 < limit <= min_tokens:
                return None
            hit = None
            try:
                if codec.splittable and limit:
                    hit = self._whole_hit(tb, limit, fingerprint, codec) if trim else None
                    if hit is None:
                        plan = self._plan(tb, limit, fingerprint, codec)
                        if 0 < plan.tokens(self.block_size) <= min_tokens:
                            return None  # the caller already holds as much (its live context): fetch nothing
                        hit = self._read(plan, fingerprint, codec)
                elif limit:
                    hit = self._lookup_whole(tb, limit, fingerprint, codec, align)
            except CodecError as exc:
                log.warning("cached state failed to join (%s); treating as a miss", exc)
            if hit is not None and hit.tokens_reused <= min_tokens:
                return None
            return self._count_lookup(n, hit)

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
        bounds, chunk_keys = self._insert_keys(tb, state, fingerprint, codec)
        with self._lock:
            index = self._indexes.setdefault(fingerprint, RadixIndex())
            if self._still_cached(index, tb, fingerprint):
                return 0
            new = [i for i, k in enumerate(chunk_keys) if k not in self._chunks]
            segments, sizes = self._segments_and_sizes(state, codec, bounds, chunk_keys, new)
            new_bytes = sum(sizes[i] for i in new)
            if new_bytes > self.capacity_bytes:
                raise CapacityError(
                    f"a {n}-token state needs {new_bytes} bytes, more than the cache's capacity of "
                    f"{self.capacity_bytes}; raise capacity_bytes"
                )
            node, _ = index.insert(tb, _Record(chunk_keys, sizes))
            self._chunks.hold(chunk_keys)
            self._make_room(new_bytes, keep=node)
            written = self._write_new(chunk_keys, new, segments, sizes, fingerprint)
            self._stats.chunks_deduplicated += len(chunk_keys) - len(new)
            if codec.splittable and new:
                self._remember_inserted(state, codec, chunk_keys, n, fingerprint, node.value)
            self._stats.inserts += 1
            self._stats.bytes_written += written
            return written

    def contains(self, tokens: Sequence[int], fingerprint: str) -> bool:
        """Whether exactly this token sequence is cached under `fingerprint` (by this process's index)."""
        tb = K.token_bytes(tokens)
        with self._lock:
            index = self._indexes.get(fingerprint)
            return bool(tb) and index is not None and index.find(tb) is not None

    def adopt(
        self, tokens: Sequence[int], fingerprint: str, *, codec: StateCodec | None = None
    ) -> bool:
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
            if not all(k in self._chunks or self.store.contains(k) for k in chunk_keys):
                return False
            index = self._indexes.setdefault(fingerprint, RadixIndex())
            node, is_new = index.insert(tb, _Record(chunk_keys, [0] * len(chunk_keys)))
            if is_new:
                self._chunks.hold(chunk_keys, size=0)
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
            self._chunks.clear()
            self._memo.clear()
            self.store.clear()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(ix) for ix in self._indexes.values())

    @property
    def nbytes(self) -> int:
        """Bytes of state this cache's index references (each chunk counted once)."""
        return self._chunks.nbytes

    def stats(self) -> dict[str, object]:
        """Counters of this cache (one consistent snapshot, taken under the lock) and of its store
        (read after the lock is released: a remote store's stats never hold up lookups)."""
        with self._lock:
            s = self._stats
            out: dict[str, object] = {
                "sequences": len(self),
                "chunks": len(self._chunks),
                "bytes": self._chunks.nbytes,
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
                "merges_read": s.merges_read,
                "merges_written": s.merges_written,
                "wholes_read": s.wholes_read,
                "wholes_written": s.wholes_written,
                "memo_bytes": self._memo.nbytes,
                "hits_by_tier": dict(s.hits_by_tier),
            }
        out["store"] = self.store.stats()
        return out

    # ---------------------------------------------------------------- keys

    def _bounds(self, n: int) -> list[int]:
        b = self.block_size
        return list(range(0, n, b)) + [n]

    def _block_keys(self, fingerprint: str, tb: bytes, n_blocks: int) -> list[bytes]:
        """K.block_keys, reusing the keys of the last prompt hashed for the full blocks it shares
        with tb: a request's lookup, insert and adopt hash its prompt once between them."""
        last_fp, last_tb, last = self._last_keys
        have = 0
        if last_fp == fingerprint and last:
            step = 4 * self.block_size
            have = min(n_blocks, len(last) - 1, len(tb) // step, len(last_tb) // step)
            if last_tb[: have * step] != tb[: have * step]:
                a = np.frombuffer(last_tb, np.uint8, have * step)
                b = np.frombuffer(tb, np.uint8, have * step)
                have = int(np.argmax(a != b)) // step
        keys = last[: have + 1] if have else [K.root_key(fingerprint)]
        view, step = memoryview(tb), 4 * self.block_size
        for i in range(len(keys) - 1, n_blocks):
            keys.append(K.chain(keys[-1], view[i * step : (i + 1) * step]))
        if len(keys) >= len(last) or last_fp != fingerprint:
            self._last_keys = (fingerprint, tb, keys)
        return keys

    def _chunk_keys(self, tb: bytes, fingerprint: str, bounds: list[int]) -> list[str]:
        prefix = self._block_keys(fingerprint, tb, len(bounds) - 1)
        view = memoryview(tb)
        out = []
        for j, (a, e) in enumerate(zip(bounds, bounds[1:])):
            full = e - a == self.block_size
            out.append(_hex(prefix[j + 1] if full else K.chain(prefix[j], view[4 * a : 4 * e])))
        return out

    def _insert_keys(
        self, tb: bytes, state: bytes, fingerprint: str, codec: StateCodec
    ) -> tuple[list[int], list[str]]:
        """Where an inserted state is cut and its chunks' keys; one whole key for an opaque codec."""
        n = len(tb) // 4
        if not codec.splittable:
            return [0, n], [_hex(K.chain(K.root_key(fingerprint), tb)) + "-w"]
        have = codec.n_tokens(state)
        if have != n:
            raise ValueError(f"state covers {have} tokens but {n} tokens were given")
        bounds = self._bounds(n)
        return bounds, self._chunk_keys(tb, fingerprint, bounds)

    # ---------------------------------------------------------------- lookup: plan, read, merge

    def _whole_hit(self, tb: bytes, limit: int, fingerprint: str, codec: StateCodec) -> Hit | None:
        """A persisted whole state of a sequence the prompt repeats up to `limit` or further (the
        longest first), for a caller that trims; None where this process's RAM serves the prefix
        (its index and memo) or the store holds no such state."""
        if self._merges is None or not self._merges.whole_bytes:
            return None
        B, n = self.block_size, len(tb) // 4
        prefix = self._block_keys(fingerprint, tb, n // B)
        index = self._indexes.get(fingerprint)
        if index is not None:
            match = index.match(tb[: 4 * limit])
            if match is not None and match.length >= limit:
                blocks = [_hex(prefix[j + 1]) for j in range(limit // B)]
                if self._memo.holds(codec, blocks):
                    return None  # in RAM: the memo's segment and a few blocks join faster
        view = memoryview(tb)
        candidates = []
        for length in range(n, limit - 1, -1):
            j = length // B
            key = prefix[j] if length % B == 0 else K.chain(prefix[j], view[4 * j * B : 4 * length])
            candidates.append((length, _hex(key)))
        found = self._merges.find_whole(codec, candidates, fingerprint)
        if found is None:
            return None
        length, state, tier = found
        self._stats.wholes_read += 1
        return Hit(limit, state, tier, fingerprint, state_tokens=length)

    def _plan(self, tb: bytes, limit: int, fingerprint: str, codec: StateCodec) -> _ChunkPlan:
        """The chunks that hold the longest known prefix of tb[:limit] (index, then a persisted
        merge, then the shared store's blocks)."""
        n = len(tb) // 4
        # Every block key of the whole prompt, hashed once: probing a shared store needs all of them.
        prefix = self._block_keys(
            fingerprint, tb, (n if self._probe_store else limit) // self.block_size
        )
        plan = self._plan_from_index(self._indexes.get(fingerprint), tb, limit, prefix)
        if self._probe_store and plan.tokens(self.block_size) < limit:
            plan = self._plan_from_merge(plan, limit, prefix, fingerprint, codec)
            plan = self._plan_from_store(plan, tb, limit, prefix)
        return plan

    def _plan_from_merge(
        self, plan: _ChunkPlan, limit: int, prefix: list[bytes], fingerprint: str, codec: StateCodec
    ) -> _ChunkPlan:
        """A fresh process knows nothing of what others wrote: a persisted merge deeper than the
        plan (and than the RAM memo) covers its first blocks with one read."""
        if self._merges is None or not codec.splittable:
            return plan
        depth = self._merges.depth(limit // self.block_size)
        if depth <= len(plan.blocks):
            return plan
        full = [_hex(prefix[j + 1]) for j in range(depth)]
        in_ram = self._memo.find(codec, full)
        if in_ram is not None and in_ram.n_blocks >= depth:
            return plan
        found = self._merges.find(codec, full, fingerprint)
        if found is None:
            return plan
        merged, tier = found
        self._stats.merges_read += 1
        self._memo.remember(codec, full[: merged.n_blocks], merged.segment)
        return _ChunkPlan(full[: merged.n_blocks], merged=merged, merged_tier=tier)

    def _plan_from_index(
        self, index: RadixIndex | None, tb: bytes, limit: int, prefix: list[bytes]
    ) -> _ChunkPlan:
        B = self.block_size
        match = index.match(tb[: 4 * limit]) if index is not None else None
        if index is None or match is None or not match.length:
            return _ChunkPlan([])
        seq = index.terminal_below(match.node)
        index.touch(seq)
        n_full, partial_len = divmod(match.length, B)
        blocks = [_hex(prefix[j + 1]) for j in range(n_full)]
        if not partial_len:
            return _ChunkPlan(blocks)
        # The chunk that covers the match's last tokens belongs to a cached sequence that goes on
        # differently (or further): its key comes from that sequence's tokens, not the prompt's.
        seq_tokens = index.tokens_of(seq)
        end = min(len(seq_tokens) // 4, (n_full + 1) * B)
        partial_key = _hex(
            K.chain(prefix[n_full], memoryview(seq_tokens)[4 * n_full * B : 4 * end])
        )
        return _ChunkPlan(blocks, partial_key, partial_len)

    def _plan_from_store(
        self, plan: _ChunkPlan, tb: bytes, limit: int, prefix: list[bytes]
    ) -> _ChunkPlan:
        """Other processes may have written what this index does not know: probe the prompt's own
        blocks (over the whole prompt: a block or tail that runs past `limit` is cut to it)."""
        B, n = self.block_size, len(tb) // 4
        j = len(
            plan.blocks
        )  # a persisted merge's blocks are there (content-addressed): start after
        while (j + 1) * B <= n and self.store.contains(_hex(prefix[j + 1])):
            j += 1
        if j * B > plan.tokens(B):
            whole = min(j, limit // B)
            partial_len = limit - whole * B if j * B >= limit else 0
            partial_key = _hex(prefix[whole + 1]) if partial_len else None
            blocks = [_hex(prefix[i + 1]) for i in range(whole)]
            plan = _ChunkPlan(blocks, partial_key, partial_len, plan.merged, plan.merged_tier)
        start = len(plan.blocks) * B
        if plan.partial_key is not None or start >= limit:
            return plan
        view = memoryview(tb)
        for r in range(min(B - 1, n - start), 0, -1):
            key = _hex(K.chain(prefix[len(plan.blocks)], view[4 * start : 4 * (start + r)]))
            if self.store.contains(key):
                return _ChunkPlan(
                    plan.blocks, key, min(r, limit - start), plan.merged, plan.merged_tier
                )
        return plan

    def _read(self, plan: _ChunkPlan, fingerprint: str, codec: StateCodec) -> Hit | None:
        """The state of the plan's chunks: the deepest merged prefix from the memo (the hash chain
        makes its last block's key name all of its blocks), the chunks after it from the store.
        A missing chunk cuts the hit short before it. Raises CodecError if the parts do not join."""
        if not plan.tokens(self.block_size):
            return None
        if plan.merged is not None:
            try:
                return self._read_parts(plan, plan.merged, {plan.merged_tier}, fingerprint, codec)
            except CodecError as exc:  # checksummed, yet it does not join: never a wrong answer
                key = self._memo_drop(codec, plan.merged, plan.blocks)
                self._merges.drop(key, f"it does not join ({exc})")  # type: ignore[union-attr]
                plan = plan.without_merge()
        memo_hit = self._memo.find(codec, plan.blocks)
        tiers = {"memory"} if memo_hit is not None else set()
        if memo_hit is not None:
            self._stats.memo_hits += 1
        return self._read_parts(plan, memo_hit, tiers, fingerprint, codec)

    def _memo_drop(self, codec: StateCodec, merged: MemoHit, blocks: list[str]) -> str:
        """Forget a merge in RAM too; returns its key."""
        key = memo_key(codec.name, blocks[merged.n_blocks - 1])
        self._memo._drop(key)
        return key

    def _read_parts(
        self,
        plan: _ChunkPlan,
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
            self._drop_missing(fingerprint, [keys[missing]])
            plan = plan.cut_to(missing)
            if not plan.blocks:
                return None
        n_blocks = len(plan.blocks)
        parts = [memo_hit.segment] if memo_hit is not None else []
        parts += [v for v in values[: n_blocks - start] if v is not None]
        parts = self._merge_on_second_hit(codec, plan.blocks, parts)
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
            values[i], tier = self._fetch(keys[i], fingerprint)
            if values[i] is not None:
                tiers.add(tier)
        return values

    def _fetch(self, key: str, fingerprint: str) -> tuple[bytes | None, str]:
        return self.store.get_with_tier(key, fingerprint=fingerprint)

    def _merge_on_second_hit(
        self, codec: StateCodec, blocks: list[str], parts: list[bytes]
    ) -> list[bytes]:
        """`parts` (the state of `blocks`), merged into one remembered segment when the prefix is
        hit the second time: a first hit would pay the merge for nothing."""
        if len(parts) <= 2 or not self._memo.seen_twice(codec, blocks):
            return parts
        merged = codec.split(codec.join(parts), [0, len(blocks) * self.block_size])[0]
        self._memo.remember(codec, blocks, merged)
        return [merged]

    def _lookup_whole(
        self, tb: bytes, limit: int, fingerprint: str, codec: StateCodec, align: int = 0
    ) -> Hit | None:
        index = self._indexes.get(fingerprint)
        candidates: list[int] = []
        if index is not None:
            candidates = [t.depth for t in index.match(tb[: 4 * limit]).terminals]
        if self._probe_store:
            candidates.append(limit)
            if align > 0:
                candidates += range(limit - limit % align, 0, -align)[:WHOLE_PROBES]
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

    def _count_lookup(self, n: int, hit: Hit | None) -> Hit | None:
        self._stats.lookups += 1
        self._stats.tokens_looked_up += n
        if hit is None:
            self._stats.misses += 1
            return None
        self._stats.hits += 1
        self._stats.tokens_reused += hit.tokens_reused
        self._stats.hits_by_tier[hit.source] = self._stats.hits_by_tier.get(hit.source, 0) + 1
        return hit

    # ---------------------------------------------------------------- insert, forget, evict

    def _still_cached(self, index: RadixIndex, tb: bytes, fingerprint: str) -> bool:
        """Whether exactly tb is cached with every chunk in the store (touched if so). When the store
        lost chunks of it (flushed, or evicted by another process), every sequence using them is
        forgotten, so all of them are written again, those shared with other sequences too."""
        existing = index.find(tb)
        if existing is None or existing.value is None:
            return False
        index.touch(existing)
        lost = [k for k in existing.value.keys if not self.store.contains(k)]
        if not lost:
            return True
        self._drop_missing(fingerprint, lost)
        return False

    def _segments_and_sizes(
        self,
        state: bytes,
        codec: StateCodec,
        bounds: list[int],
        chunk_keys: list[str],
        new: list[int],
    ) -> tuple[list[bytes], list[int]]:
        """The state cut at bounds (nothing when no chunk is new) and every chunk's size."""
        if not new:
            return [], [self._chunks.size(k) for k in chunk_keys]
        segments = codec.split(bytes(state), bounds) if codec.splittable else [bytes(state)]
        return segments, [len(s) for s in segments]

    def _remember_inserted(
        self,
        state: bytes,
        codec: StateCodec,
        chunk_keys: list[str],
        n: int,
        fingerprint: str,
        record: _Record,
    ) -> None:
        """A conversation's next turn extends this n-token state: keep its full blocks as one
        segment in RAM, and (over a shared store) a persisted merge for other processes."""
        n_full = n // self.block_size
        merged = None
        if self._memo.keeps(n_full):
            merged = codec.split(bytes(state), [0, n_full * self.block_size])[0]
            self._memo.remember(codec, chunk_keys[:n_full], merged)
        if self._merges is None:
            return

        def cut(n_tokens: int) -> bytes:
            if merged is not None and n_tokens == n_full * self.block_size:
                return merged
            return codec.split(bytes(state), [0, n_tokens])[0]

        whole = self._merges.persist_whole(codec, chunk_keys[-1], state, n, fingerprint)
        if whole is not None:
            record.whole = whole[0]
            self._stats.wholes_written += whole[1] > 0
            self._stats.bytes_written += whole[1]
        persisted = self._merges.persist(codec, chunk_keys[:n_full], cut, fingerprint)
        if persisted is not None:
            key, written = persisted
            record.merged = (key, chunk_keys[self._merges.depth(n_full) - 1])
            self._stats.merges_written += written > 0
            self._stats.bytes_written += written

    def _write_new(
        self,
        chunk_keys: list[str],
        new: list[int],
        segments: list[bytes],
        sizes: list[int],
        fingerprint: str,
    ) -> int:
        """Put the chunks at positions `new` in the store; returns the bytes written."""
        written = 0
        # Tail first, root block last: a shared prefix ends up the most recently used.
        for i in reversed(new):
            key = chunk_keys[i]
            self._chunks.add(key, sizes[i])
            if self._probe_store and self.store.contains(key):
                self._stats.chunks_deduplicated += 1
                continue
            self.store.put(key, segments[i], fingerprint=fingerprint)
            written += sizes[i]
            self._stats.chunks_written += 1
        return written

    def _drop_missing(self, fingerprint: str, keys: list[str]) -> None:
        """Chunks vanished from the store (evicted by another process, or corrupt): forget their users."""
        index = self._indexes.get(fingerprint)
        if index is None:
            return
        gone = set(keys)
        for node in [n for n in index.sequences() if not gone.isdisjoint(n.value.keys)]:
            self._forget(index, node)

    def _forget(self, index: RadixIndex, node: Node) -> None:
        record: _Record = node.value
        index.remove(node)
        for key in self._chunks.release(record.keys):
            if not self._probe_store:
                self.store.delete(key)
        if record.whole is not None and self._merges is not None:
            self._merges.drop(record.whole, "its sequence was evicted")
        if record.merged is not None and self._merges is not None:
            merge_key, last_block = record.merged
            if last_block not in self._chunks:  # no sequence of this process reads it any more
                self._merges.drop(merge_key, "its sequences were evicted")

    def _make_room(self, new_bytes: int, keep: Node) -> None:
        """Evict least recently used leaf sequences until new_bytes fit (a shared prefix outlives its branches)."""
        while self._chunks.nbytes + new_bytes > self.capacity_bytes:
            victim = None
            for index in self._indexes.values():
                leaf = index.lru_leaf(exclude=keep)
                if leaf is not None and (
                    victim is None or leaf.last_access < victim[1].last_access
                ):
                    victim = (index, leaf)
            if victim is None:
                raise PromptCacheError(
                    "nothing left to evict"
                )  # unreachable: new_bytes <= capacity
            self._forget(*victim)
            self._stats.evicted_sequences += 1


__all__ = ["PromptCache", "Hit", "CacheStats", "DEFAULT_BLOCK_SIZE", "FixedWidthCodec"]
