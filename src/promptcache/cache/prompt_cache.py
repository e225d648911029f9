"""PromptCache: the one entry point engines use; longest cached prefix in, state for exactly those tokens out.

Owns the coordination (the lock, the byte budget, the order of the steps) of its rooms; it does not
run models (engines do) and does not lay out bytes on disk (stores do).

A lookup hashes the prompt's block keys once (keys.PromptKeys: insert and adopt reuse them), then
asks, in order: the whole states (wholes.py) when the caller trims, the plan (plan.py: index, then a
persisted merge, then a shared store's blocks) and the read (read.py: a merged prefix first, the
store for the rest). An insert cuts the state into segments (plan.py names them), records the
sequence in the ledger (ledger.py: references, sizes, eviction), writes the new segments, and
hands the state to the merges (merges.py) and the whole states.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from promptcache import keys as K
from promptcache.cache.hit import Hit
from promptcache.cache.ledger import Ledger, Record
from promptcache.cache.merges import Merges
from promptcache.cache.plan import Planner, bounds, segment_keys
from promptcache.cache.read import Reader
from promptcache.cache.stats import CacheStats
from promptcache.cache.wholes import WholeStates, whole_state_key
from promptcache.codec import OpaqueCodec, StateCodec
from promptcache.errors import CapacityError, CodecError
from promptcache.holdings import HoldingsListener
from promptcache.index import RadixIndex
from promptcache.store import MemoryStore, Store

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 8


class PromptCache:
    """Longest-prefix cache of engine states over a byte store.

    store: any Store (MemoryStore by default, DiskStore, a tiered store); capacity_bytes sizes the
    default MemoryStore and is otherwise the store's own. codec: how states are cut and joined
    (engines pass theirs; a non-splittable codec means whole states only). block_size: tokens per
    block (DEFAULT_BLOCK_SIZE, chosen by bench/index_bench.py: see BENCHMARKS.md). shared: whether
    other processes write the store too (default: the store's `persistent`, True for disk and Redis); a shared
    store is probed for the prompt's blocks on lookup, and eviction leaves its segments to the store.
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
        self._stats = CacheStats()
        self._keys = K.PromptKeys(block_size)
        if memo_bytes is None:
            memo_bytes = min(256 << 20, self.capacity_bytes // 4)
        persist = self._probe_store and persist_merges
        self._merges = Merges(store, block_size, memo_bytes, self._stats, persist=persist)
        self._ledger = Ledger(
            store, self._stats, shared=self._probe_store, persisted=self._merges.persisted
        )
        self._indexes: dict[str, RadixIndex] = self._ledger.indexes
        self._planner = Planner(store, block_size, self._merges, shared=self._probe_store)
        self._reader = Reader(store, block_size, self._merges, self._ledger, self._stats)
        self._wholes = WholeStates(
            store, block_size, self._ledger, self._merges, self._stats, shared=self._probe_store
        )
        self._lock = threading.RLock()

    @property
    def capacity_bytes(self) -> int:
        return self.store.capacity_bytes

    @property
    def memo_bytes(self) -> int:
        """RAM bound of the merged prefixes (PrefixMemo), outside capacity_bytes."""
        return self._merges.memo.capacity_bytes

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
        much already) and None is returned without counting a lookup. With align, whole states a
        shared store may hold are probed at the multiples of align up to max_tokens (deepest first,
        at most WHOLE_PROBES of them), where engines on an aligned schedule write their checkpoints.
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
                    # Every block key of the prompt, hashed once: probing a shared store needs all.
                    prefix = self._keys.block_keys(
                        fingerprint, tb, (n if self._probe_store else limit) // self.block_size
                    )
                    hit = (
                        self._wholes.persisted_hit(tb, limit, fingerprint, codec, prefix)
                        if trim
                        else None
                    )
                    if hit is None:
                        index = self._indexes.get(fingerprint)
                        plan = self._planner.plan(tb, limit, fingerprint, codec, prefix, index)
                        if 0 < plan.tokens(self.block_size) <= min_tokens:
                            return None  # the caller already holds as much (its live context): fetch nothing
                        hit = self._reader.read(plan, fingerprint, codec)
                elif limit:
                    hit = self._wholes.opaque_hit(tb, limit, fingerprint, codec, align)
            except CodecError as exc:
                log.warning("cached state failed to join (%s); treating as a miss", exc)
            if hit is not None and hit.tokens_reused <= min_tokens:
                return None
            return self._stats.count_lookup(n, hit)

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
        cuts, keys = self._insert_keys(tb, state, fingerprint, codec)
        with self._lock:
            index = self._ledger.index(fingerprint)
            if self._ledger.still_cached(index, tb, fingerprint):
                return 0
            new = [i for i, k in enumerate(keys) if k not in self._ledger]
            segments, sizes = self._segments_and_sizes(state, codec, cuts, keys, new)
            new_bytes = sum(sizes[i] for i in new)
            if new_bytes > self.capacity_bytes:
                raise CapacityError(
                    f"a {n}-token state needs {new_bytes} bytes, more than the cache's capacity of "
                    f"{self.capacity_bytes}; raise capacity_bytes"
                )
            node, _ = self._ledger.insert(fingerprint, tb, Record(keys, sizes))
            self._ledger.hold(keys)
            self._ledger.make_room(new_bytes, self.capacity_bytes, protect=node)
            written = self._write_new(keys, new, segments, sizes, fingerprint)
            self._stats.chunks_deduplicated += len(keys) - len(new)
            if codec.splittable and new:
                merged = self._merges.remember(state, codec, keys, n)
                self._wholes.persist(state, codec, keys[-1], n, fingerprint, node.value)
                self._merges.persist(state, codec, keys, n, fingerprint, node.value, merged)
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
        """Index `tokens` without a state when a shared store already holds every segment of it
        (another process wrote them); True if adopted. Saves an engine reading and splitting a state
        it just restored. Segment sizes are not read back: a shared store holds its own capacity.
        """
        codec = codec or self.codec
        tb = K.token_bytes(tokens)
        if not tb or not self._probe_store or not codec.splittable:
            return False
        keys = self._segment_keys(tb, fingerprint, bounds(len(tb) // 4, self.block_size))
        with self._lock:
            if not all(k in self._ledger or self.store.contains(k) for k in keys):
                return False
            node, is_new = self._ledger.insert(fingerprint, tb, Record(keys, [0] * len(keys)))
            if is_new:
                self._ledger.hold(keys, size=0)
            return True

    def remove(self, tokens: Sequence[int], fingerprint: str) -> bool:
        """Forget one cached sequence (segments it alone used are deleted); True if it was cached."""
        tb = K.token_bytes(tokens)
        with self._lock:
            index = self._indexes.get(fingerprint)
            node = index.find(tb) if index else None
            if node is None:
                return False
            self._ledger.forget(fingerprint, node)
            return True

    def listen(self, listener: HoldingsListener, fingerprint: str | None = None) -> None:
        """Tell `listener` which sequences this cache's index holds (under `fingerprint`, or any),
        now and as they are inserted, evicted, removed and cleared (holdings.py; the ledger, which
        stores and evicts, tells it)."""
        with self._lock:
            self._ledger.listen(listener, fingerprint)

    def clear(self) -> None:
        """Forget everything and empty the store."""
        with self._lock:
            self._ledger.clear()
            self._merges.clear()
            self.store.clear()

    def __len__(self) -> int:
        with self._lock:
            return self._ledger.sequences()

    @property
    def nbytes(self) -> int:
        """Bytes of state this cache's index references (each segment counted once)."""
        return self._ledger.nbytes

    def stats(self) -> dict[str, object]:
        """Counters of this cache (one consistent snapshot, taken under the lock) and of its store
        (read after the lock is released: a remote store's stats never hold up lookups).
        "chunks" counts the segments the index references (see stats.py for the name)."""
        with self._lock:
            out: dict[str, object] = {
                "sequences": len(self),
                "chunks": len(self._ledger),
                "bytes": self._ledger.nbytes,
                "capacity_bytes": self.capacity_bytes,
                "block_size": self.block_size,
                **self._stats.snapshot(),
                "memo_bytes": self._merges.memo.nbytes,
            }
        out["store"] = self.store.stats()
        return out

    # ---------------------------------------------------------------- insert's steps

    def _segment_keys(self, tb: bytes, fingerprint: str, cuts: list[int]) -> list[str]:
        prefix = self._keys.block_keys(fingerprint, tb, len(cuts) - 1)
        return segment_keys(tb, cuts, prefix, self.block_size)

    def _insert_keys(
        self, tb: bytes, state: bytes, fingerprint: str, codec: StateCodec
    ) -> tuple[list[int], list[str]]:
        """Where an inserted state is cut and its segments' keys; one whole state for an opaque codec."""
        n = len(tb) // 4
        if not codec.splittable:
            return [0, n], [whole_state_key(fingerprint, tb)]
        have = codec.n_tokens(state)
        if have != n:
            raise ValueError(f"state covers {have} tokens but {n} tokens were given")
        cuts = bounds(n, self.block_size)
        return cuts, self._segment_keys(tb, fingerprint, cuts)

    def _segments_and_sizes(
        self,
        state: bytes,
        codec: StateCodec,
        cuts: list[int],
        keys: list[str],
        new: list[int],
    ) -> tuple[list[bytes], list[int]]:
        """The state cut at `cuts` (nothing when no segment is new) and every segment's size."""
        if not new:
            return [], [self._ledger.size(k) for k in keys]
        segments = codec.split(bytes(state), cuts) if codec.splittable else [bytes(state)]
        return segments, [len(s) for s in segments]

    def _write_new(
        self,
        keys: list[str],
        new: list[int],
        segments: list[bytes],
        sizes: list[int],
        fingerprint: str,
    ) -> int:
        """Put the segments at positions `new` in the store; returns the bytes written."""
        written = 0
        # Tail first, root block last: a shared prefix ends up the most recently used.
        for i in reversed(new):
            key = keys[i]
            self._ledger.add(key, sizes[i])
            if self._probe_store and self.store.contains(key):
                self._stats.chunks_deduplicated += 1
                continue
            self.store.put(key, segments[i], fingerprint=fingerprint)
            written += sizes[i]
            self._stats.chunks_written += 1
        return written


__all__ = ["PromptCache", "DEFAULT_BLOCK_SIZE"]
