"""The ledger: which sequences are cached (a RadixIndex per fingerprint) and which segments they use.

Owns the segments' reference counts and sizes, the bytes held, eviction (leaf sequences, least
recently used first) and telling listeners (holdings.py) which sequences come and go; never plans
a lookup, reads a segment or writes one (the coordinator does).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from promptcache.cache.stats import CacheStats
from promptcache.errors import PromptCacheError
from promptcache.holdings import HoldingsListener
from promptcache.index import Node, RadixIndex
from promptcache.memo import PersistedMerges
from promptcache.store import Store


@dataclass
class Record:
    """What one cached sequence holds: its segment keys (in token order) and their sizes, and the
    persisted merge its insert wrote (key, key of the merge's last block), if any."""

    keys: list[str]
    sizes: list[int]
    merged: tuple[str, str] | None = None
    whole: str | None = None  # the key of its persisted whole state, if its insert wrote one


class Ledger:
    """The cached sequences of every fingerprint and the segments they reference.

    store: where the segments live. shared: other processes write the store too, so a segment no
    sequence here uses is left to the store's own eviction (they may use it) instead of deleted.
    persisted: the persisted merges and whole states a forgotten sequence takes with it, if any.
    """

    def __init__(
        self,
        store: Store,
        stats: CacheStats,
        *,
        shared: bool,
        persisted: PersistedMerges | None,
    ) -> None:
        self.store = store
        self.shared = shared
        self.persisted = persisted
        self.indexes: dict[str, RadixIndex] = {}
        self._stats = stats
        self._refs: dict[str, int] = {}  # segment key -> how many cached sequences use it
        self._sizes: dict[str, int] = {}
        self.nbytes = 0
        self._listeners: list[tuple[str | None, HoldingsListener]] = []

    # ------------------------------------------------ segments

    def __contains__(self, key: str) -> bool:
        return key in self._refs

    def __len__(self) -> int:
        """Segments referenced (each counted once)."""
        return len(self._refs)

    def size(self, key: str) -> int:
        return self._sizes[key]

    def hold(self, keys: Iterable[str], size: int | None = None) -> None:
        """One more sequence uses each key; with size, keys not sized yet get it (adopt: 0)."""
        for k in keys:
            self._refs[k] = self._refs.get(k, 0) + 1
            if size is not None:
                self._sizes.setdefault(k, size)

    def add(self, key: str, size: int) -> None:
        """A held segment's bytes are now cached."""
        self._sizes[key] = size
        self.nbytes += size

    def _release(self, keys: Iterable[str]) -> list[str]:
        """One sequence fewer uses each key; returns the keys no sequence uses any more."""
        freed = []
        for k in keys:
            left = self._refs.get(k, 0) - 1
            if left > 0:
                self._refs[k] = left
                continue
            self._refs.pop(k, None)
            self.nbytes -= self._sizes.pop(k, 0)
            freed.append(k)
        return freed

    # ------------------------------------------------ sequences

    def index(self, fingerprint: str) -> RadixIndex:
        """The index of `fingerprint`, made empty on first use."""
        return self.indexes.setdefault(fingerprint, RadixIndex())

    def sequences(self) -> int:
        return sum(len(ix) for ix in self.indexes.values())

    def insert(self, fingerprint: str, tokens_le: bytes, record: Record) -> tuple[Node, bool]:
        """Index a sequence (its record replaces an existing one's); returns (its node, whether it
        is new). Listeners hear a new one."""
        node, is_new = self.index(fingerprint).insert(tokens_le, record)
        if is_new:
            self._tell(fingerprint, tokens_le, tokens_le)
        return node, is_new

    def clear(self) -> None:
        """Forget every sequence and segment (the store is the caller's to clear)."""
        self.indexes.clear()
        self._refs.clear()
        self._sizes.clear()
        self.nbytes = 0
        for _, listener in self._listeners:
            listener.cleared()

    def listen(self, listener: HoldingsListener, fingerprint: str | None = None) -> None:
        """Tell `listener` every sequence cached (under `fingerprint`, or any) as it is indexed and
        as it is forgotten (holder: (fingerprint, tokens as uint32 LE bytes)), those cached now
        first."""
        self._listeners.append((fingerprint, listener))
        for fp, index in self.indexes.items():
            if fingerprint in (None, fp):
                for node in index.sequences():
                    tokens_le = index.tokens_of(node)
                    listener.holds((fp, tokens_le), tokens_le)

    def _tell(self, fingerprint: str, tokens_le: bytes, tokens: bytes) -> None:
        for fp, listener in self._listeners:
            if fp in (None, fingerprint):
                listener.holds((fingerprint, tokens_le), tokens)

    def still_cached(self, index: RadixIndex, tokens_le: bytes, fingerprint: str) -> bool:
        """Whether exactly these tokens are cached with every segment in the store (touched if so).
        When the store lost segments of it (flushed, or evicted by another process), every sequence
        using them is forgotten, so all of them are written again, those shared with others too."""
        existing = index.find(tokens_le)
        if existing is None or existing.value is None:
            return False
        index.touch(existing)
        lost = [k for k in existing.value.keys if not self.store.contains(k)]
        if not lost:
            return True
        self.drop_missing(fingerprint, lost)
        return False

    def drop_missing(self, fingerprint: str, keys: list[str]) -> None:
        """Segments vanished from the store (evicted by another process, or corrupt): forget their users."""
        index = self.indexes.get(fingerprint)
        if index is None:
            return
        gone = set(keys)
        for node in [n for n in index.sequences() if not gone.isdisjoint(n.value.keys)]:
            self.forget(fingerprint, node)

    def forget(self, fingerprint: str, node: Node) -> None:
        """Remove one cached sequence; the segments, merge and whole state only it used go too."""
        record: Record = node.value
        index = self.indexes[fingerprint]
        if self._listeners:
            self._tell(fingerprint, index.tokens_of(node), b"")
        index.remove(node)
        for key in self._release(record.keys):
            if not self.shared:
                self.store.delete(key)
        if self.persisted is None:
            return
        if record.whole is not None:
            self.persisted.drop(record.whole, "its sequence was evicted")
        if record.merged is not None:
            merge_key, last_block = record.merged
            if last_block not in self:  # no sequence of this process reads it any more
                self.persisted.drop(merge_key, "its sequences were evicted")

    def make_room(self, new_bytes: int, capacity: int, protect: Node) -> None:
        """Evict least recently used leaf sequences (never `protect`) until new_bytes fit in
        capacity: a shared prefix outlives its branches."""
        while self.nbytes + new_bytes > capacity:
            victim = None
            for fingerprint, index in self.indexes.items():
                leaf = index.lru_leaf(exclude=protect)
                if leaf is not None and (
                    victim is None or leaf.last_access < victim[1].last_access
                ):
                    victim = (fingerprint, leaf)
            if victim is None:  # unreachable: the caller checked new_bytes <= capacity
                raise PromptCacheError("nothing left to evict")
            self.forget(*victim)
            self._stats.evicted_sequences += 1


__all__ = ["Ledger", "Record"]
