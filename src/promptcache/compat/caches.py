"""The drop-in caches: BaseLlamaCache, the longest-prefix lookup they share, and LlamaRAMCache.

Owns the llama-cpp-python cache interface over promptcache's RadixIndex (one per model fingerprint
and state shape) and a store that holds the bytes and evicts (LRU within capacity_bytes); never
holds bytes itself, never pickles, never prints.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import llama_cpp.llama_cache
import numpy as np
from llama_cpp.llama import LlamaState

from promptcache.compat.adapter import adapt_getitem, adapt_setitem
from promptcache.compat.entry import Entry, scope_of
from promptcache.compat.identity import Caller, Shape, resolve_caller
from promptcache.errors import CapacityError, CorruptEntryError, StoreUnavailableError
from promptcache.index import Node, RadixIndex
from promptcache.keys import token_bytes
from promptcache.store import Store
from promptcache.store.memory import MemoryStore

log = logging.getLogger(__name__)

__all__ = ["BaseLlamaCache", "LlamaCache", "LlamaRAMCache", "StoreCache"]


class BaseLlamaCache(llama_cpp.llama_cache.BaseLlamaCache):
    """The interface llama-cpp-python's Llama.set_cache expects, plus `__len__` and an always-true `__bool__`.

    Subclasses implement `__getitem__`, `__contains__`, `__setitem__` and, to be counted,
    `__len__` and `cache_size`. It subclasses llama_cpp.llama_cache.BaseLlamaCache, so isinstance
    checks against llama-cpp-python's base pass. A subclass written for llama-cpp-python works
    as is: `__getitem__` may return None on a miss, `__setitem__` receives a PortableLlamaState
    (JSON-ready), states of another model read back are misses, and `__init__` need not call
    super (capacity_bytes defaults to 2 GiB).
    """

    capacity_bytes: int = 2 << 30
    _adapt_methods = True  # wrap a subclass's __getitem__/__setitem__ (off for promptcache's own)

    def __init__(self, capacity_bytes: int = (2 << 30)) -> None:
        super().__init__(capacity_bytes)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("_adapt_methods", cls._adapt_methods):
            return
        if "__getitem__" in cls.__dict__:
            cls.__getitem__ = adapt_getitem(cls.__dict__["__getitem__"])  # type: ignore[method-assign]
        if "__setitem__" in cls.__dict__:
            cls.__setitem__ = adapt_setitem(cls.__dict__["__setitem__"])  # type: ignore[method-assign]

    @property
    def cache_size(self) -> int:
        """Bytes held; 0 unless a subclass counts them."""
        return 0

    def __bool__(self) -> bool:
        # Llama._create_completion tests `if self.cache:`; with __len__ defined, an empty cache
        # would be false and never consulted nor filled.
        return True

    def __len__(self) -> int:
        """Number of cached entries. Raises NotImplementedError unless a subclass implements it."""
        raise NotImplementedError(f"{type(self).__name__} does not count its entries")


class StoreCache(BaseLlamaCache):
    """Longest-prefix lookup over a RadixIndex per scope (fingerprint and shape), entries in a store.

    An entry is one store payload under `<entry id>-s` (entry.py's format); the store holds
    capacity_bytes and evicts by its policy (LRU), and this cache forgets what it evicted.
    Subclasses set `self._store` and may implement `_refresh` (bring the index up to date with
    entries other processes added or evicted) and `_before` (run first in every call, under the lock).
    """

    _adapt_methods = False

    def __init__(self, capacity_bytes: int, fingerprint: str | None) -> None:
        if (
            isinstance(capacity_bytes, bool)
            or not isinstance(capacity_bytes, int)
            or capacity_bytes <= 0
        ):
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint must be a str or None, got {type(fingerprint).__name__}")
        super().__init__(capacity_bytes)
        self.fingerprint = fingerprint
        self.shape: Shape | None = None  # of the last state stored: the shape hand calls are served
        self.hits = 0
        self.misses = 0
        self._store: Store  # set by the subclass
        self._indexes: dict[str, RadixIndex] = {}  # scope (fingerprint and shape) -> index
        self._scopes: dict[str, tuple[str, Shape]] = {}  # scope -> (fingerprint, shape)
        self._ids: dict[str, tuple[str, bytes]] = {}  # entry id -> (scope, key tokens)
        self._lock = threading.RLock()
        self._told_unknown = False
        self._last_llama: tuple[str, Shape] | None = None  # the last Llama that called this cache

    def _caller(self) -> Caller | None:
        """(fingerprint, shape) this call is served under (None: refuse); a hand call gets the last Llama's."""
        caller = resolve_caller(self.fingerprint)
        if caller is None:
            return None
        fingerprint, shape = caller
        if shape is not None:
            self._last_llama = (fingerprint, shape)
        elif self._last_llama is not None and self.shape in (None, self._last_llama[1]):
            if self.fingerprint is None or self.fingerprint == self._last_llama[0]:
                return self._last_llama
        return caller

    # -- hooks ----------------------------------------------------------------------------------

    def _read_entry(self, entry_id: str) -> Entry | None:
        """The entry stored under entry_id, None when it is gone; an unusable one is logged and deleted."""
        scope, tokens_le = self._ids[entry_id]
        fingerprint, shape = self._scopes[scope]
        payload = self._store.get(f"{entry_id}-s", fingerprint=scope)
        if payload is None:
            return None
        try:
            entry = Entry.decode(payload, fingerprint)
            if entry.tokens_le != tokens_le or entry.shape != shape:
                raise CorruptEntryError("state payload holds another key or shape than its name")
        except CorruptEntryError as exc:
            log.warning("%r: entry %s is unusable, removing it: %s", self, entry_id, exc)
            self._delete(entry_id)
            return None
        return entry

    def _write_entry(self, entry: Entry) -> bool:
        """Store the entry's state payload; False (logged) when the store cannot take it."""
        try:
            self._store.put(f"{entry.entry_id}-s", entry.encode(), fingerprint=entry.scope)
        except (CapacityError, StoreUnavailableError) as exc:
            log.warning("%r is not caching a state: %s", self, exc)
            return False
        return True

    def _delete(self, entry_id: str) -> None:
        self._forget(entry_id)
        try:
            self._store.delete(f"{entry_id}-s")
        except StoreUnavailableError as exc:
            log.warning("%r cannot remove entry %s: %s", self, entry_id, exc)

    def _refresh(self, force: bool = False) -> None:
        """Bring the index up to date with entries others added or evicted; RAM needs nothing."""

    def _before(self) -> None:
        """Run first in every lookup or store, under the lock; RAM needs nothing."""

    def _forget_all(self) -> None:
        self._indexes.clear()
        self._scopes.clear()
        self._ids.clear()

    # -- index ----------------------------------------------------------------------------------

    def _add(self, entry_id: str, fingerprint: str, shape: Shape, tokens_le: bytes) -> None:
        scope = scope_of(fingerprint, shape)
        self._scopes[scope] = (fingerprint, shape)
        index = self._indexes.setdefault(scope, RadixIndex())
        index.insert(tokens_le, entry_id)
        self._ids[entry_id] = (scope, tokens_le)

    def _forget(self, entry_id: str) -> None:
        known = self._ids.pop(entry_id, None)
        if known is None:
            return
        scope, tokens_le = known
        index = self._indexes.get(scope)
        node = index.find(tokens_le) if index is not None else None
        if node is not None:
            index.remove(node)
            if not len(index):
                del self._indexes[scope]
                del self._scopes[scope]

    def _serving_index(self, caller: Caller) -> RadixIndex | None:
        fingerprint, shape = caller
        if shape is None:
            shape = self.shape
        if shape is not None:
            return self._indexes.get(scope_of(fingerprint, shape))
        mine = [i for i, (fp, _s) in self._scopes.items() if fp == fingerprint]
        if self.fingerprint is not None and len(mine) == 1:
            return self._indexes[mine[0]]
        if mine and not self._told_unknown:
            self._told_unknown = True
            log.info(
                "%s was called without a Llama and has stored no state yet, so it does not know the "
                "model's shape; it misses until it has (or pass fingerprint=llama_fingerprint(llm))",
                type(self).__name__,
            )
        return None

    def _match(self, tokens_le: bytes, caller: Caller) -> tuple[RadixIndex, Node] | None:
        """The index and cached sequence sharing the longest prefix with tokens_le, if any token."""
        index = self._serving_index(caller)
        if index is None or not tokens_le:
            return None
        m = index.match(tokens_le)
        if m.length == 0:
            return None
        return index, index.terminal_below(m.node)

    def _longest(self, tokens_le: bytes) -> tuple[RadixIndex, Node] | None:
        """_match for the calling model, the index brought up to date first (None: refused or none)."""
        caller = self._caller()
        if caller is None:
            return None
        with self._lock:
            self._before()
            self._refresh()
            return self._match(tokens_le, caller)

    # -- the llama-cpp-python interface ----------------------------------------------------------

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        """The state stored under the key sharing the longest prefix with `key`, for the calling model.

        Raises KeyError when no entry of the caller's fingerprint and shape shares a first token
        (unusable entries, such as corrupt files, are misses that are logged and removed), and
        TypeError when `key` is not a sequence of token ids.
        """
        tokens_le = token_bytes(key)
        caller = self._caller()
        with self._lock:
            self._before()
            self._refresh()
            while caller is not None and (found := self._match(tokens_le, caller)) is not None:
                index, node = found
                entry = self._read_entry(node.value)
                if entry is None:
                    self._forget(node.value)
                    continue
                index.touch(node)
                self.hits += 1
                return entry.to_state()
            self.misses += 1
        raise KeyError("no cached state shares a prefix with this key")

    def __contains__(self, key: Sequence[int]) -> bool:
        """Whether some entry for the calling model shares at least the first token with `key` (as llama-cpp-python's caches)."""
        return self._longest(token_bytes(key)) is not None

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        """Store `value` under `key` for the calling model, evicting least recently used entries to stay within capacity_bytes.

        A state that cannot be stored (larger than the whole capacity, disk full) is logged and
        dropped: llama-cpp-python calls this after every completion and must not fail there.
        Raises TypeError when `key` is not token ids or `value` is not a LlamaState.
        """
        tokens_le = token_bytes(key)
        caller = self._caller()
        entry = Entry.from_state(tokens_le, value, caller[0] if caller else "")
        if caller is None:
            return
        with self._lock:
            self._before()
            self.shape = entry.shape
            if not tokens_le:
                log.debug("not caching a state under an empty key")
                return
            if self._write_entry(entry):
                self._add(entry.entry_id, entry.fingerprint, entry.shape, tokens_le)
                self._refresh(force=True)

    def __len__(self) -> int:
        """Number of entries: of this cache's fingerprint if it has one, else of every model."""
        with self._lock:
            self._before()
            self._refresh(force=True)
            if self.fingerprint is None:
                return len(self._ids)
            return sum(
                1 for scope, _t in self._ids.values() if self._scopes[scope][0] == self.fingerprint
            )

    def _find_longest_prefix_key(self, key: tuple[int, ...]) -> tuple[int, ...] | None:
        """The stored key sharing the longest prefix with `key`, or None (llama-cpp-python's helper)."""
        with self._lock:  # the node is read under the lock that found it
            found = self._longest(token_bytes(key))
            if found is None:
                return None
            index, node = found
            return tuple(np.frombuffer(index.tokens_of(node), "<u4").tolist())

    def stats(self) -> dict[str, int | str | None]:
        """hits, misses, entries, bytes, capacity_bytes and fingerprint."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "entries": len(self),
            "bytes": self.cache_size,
            "capacity_bytes": self.capacity_bytes,
            "fingerprint": self.fingerprint,
        }


class LlamaRAMCache(StoreCache):
    """In-process cache of llama.cpp states: longest-prefix lookup through a radix index, LRU within capacity_bytes.

    A thin layer over a MemoryStore, which holds the entries' bytes and evicts the least recently
    used. fingerprint: optional model identity (see llama_fingerprint); entries are served only to
    a cache of the same fingerprint and state shape. `hits` and `misses` count lookups.
    """

    def __init__(self, capacity_bytes: int = (2 << 30), *, fingerprint: str | None = None) -> None:
        """Raises ValueError for a capacity that is not a positive int, TypeError for a non-str fingerprint."""
        super().__init__(capacity_bytes, fingerprint)
        self._store = MemoryStore(capacity_bytes, on_evict=self._evicted)

    def __repr__(self) -> str:
        return f"LlamaRAMCache(capacity_bytes={self.capacity_bytes}, entries={len(self._ids)})"

    @property
    def cache_size(self) -> int:
        """Bytes held: the entries' payloads (state bytes, kept score rows, token ids, a header)."""
        return self._store.size()

    @property
    def evictions(self) -> int:
        """Entries evicted to stay within capacity_bytes."""
        return self._store.evictions

    def _evicted(self, key: str) -> None:
        """The store dropped `key` (called under its lock, within one of ours): forget its entry."""
        self._forget(key.removesuffix("-s"))

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._store.clear()
            self._forget_all()


LlamaCache = LlamaRAMCache
"""Alias kept for llama-cpp-python's backward-compatible name."""
