"""Drop-in LlamaRAMCache, LlamaDiskCache, LlamaCache and BaseLlamaCache for `llama_cpp.Llama.set_cache`.

Owns how a `llama_cpp.LlamaState` becomes an index entry and bytes; never pickles, never prints.

llama-cpp-python calls a cache three ways (llama_cpp/llama.py, `_create_completion`):
`if self.cache:`, then `self.cache[prompt_tokens]` (a KeyError is a miss; any other
exception fails the completion) followed by `load_state`, and after generating
`self.cache[prompt_tokens + completion_tokens] = self.save_state()`. These classes keep
that contract and the original semantics (longest shared prefix wins, LRU within
`capacity_bytes`) and replace the parts that hurt: a linear scan over every key, pickled
disk entries, disk entries deleted when read, writes to stderr, and no model check.

Storage: an entry keeps the cache key's tokens, `input_ids[:n_tokens]`, `n_tokens`, `seed`,
the llama.cpp state bytes and only the rows of the score matrix that are not all zero
(with `logits_all=False`, llama-cpp-python 0.3.36 never writes that matrix, so a state
carries an n_tokens x n_vocab block of zeros); reads rebuild the full float32 matrix
bit for bit. On disk, an entry is two DiskStore keys: `<id>-s` (the state) and `<id>-t`
(its tokens, fingerprint and shape), so a new process rebuilds the prefix index from the
small `-t` files alone.

Model check: an entry records the cache's `fingerprint` (optional, for example
`llama_fingerprint(llm)` or `promptcache.model.file_identity(path)`) and the state's shape
(n_vocab, n_ctx). A cache serves only entries of its own fingerprint and of the shape of the
last state stored into it. A cache that has stored nothing yet knows no shape: it then serves
entries only when it has a fingerprint and they all have one shape, and otherwise misses,
because loading a state from another model or context size fails inside `load_state`.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path
from typing import Any, NamedTuple

import llama_cpp
import llama_cpp.llama_cache
import numpy as np
from llama_cpp.llama import LlamaState

from promptcache.errors import CapacityError, CorruptEntryError, StoreUnavailableError
from promptcache.index import Node, RadixIndex
from promptcache.keys import token_bytes
from promptcache.model import file_identity
from promptcache.store.disk import DiskStore

log = logging.getLogger(__name__)

__all__ = [
    "BaseLlamaCache",
    "LlamaCache",
    "LlamaDiskCache",
    "LlamaRAMCache",
    "LlamaState",
    "llama_fingerprint",
]

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_ENTRY_OVERHEAD = 256  # bytes counted per RAM entry for the record and index node

# State payload: magic, version, reserved, n_vocab, n_ctx, n_tokens, key tokens, score rows,
# kept rows, seed, llama_state_size; then key tokens (u32), input_ids[:n_tokens] (i32),
# kept row indices (u32), kept rows (f32, n_kept x n_vocab), llama.cpp state bytes (the rest).
_STATE = struct.Struct("<4sHHIIIIIIqQ")
_STATE_MAGIC = b"PCLS"
# Manifest payload: magic, version, reserved, n_vocab, n_ctx, key tokens, len(fingerprint);
# then the fingerprint (utf-8) and the key tokens (u32).
_MANIFEST = struct.Struct("<4sHHIIII")
_MANIFEST_MAGIC = b"PCLT"
_FORMAT_VERSION = 1
_DISK_KEY = re.compile(r"([0-9a-f]{32})-([st])")


class Shape(NamedTuple):
    """What a state must match to load into a context: vocabulary size and context length."""

    n_vocab: int
    n_ctx: int


def llama_fingerprint(llm: llama_cpp.Llama) -> str:
    """A fingerprint for `llm`: its GGUF file's identity plus every setting a state's layout depends on.

    Pass it as `fingerprint=` so that a cache serves a fresh process's first request from
    earlier entries, and never serves a state from another model, context size, KV type or
    score-matrix layout. Raises OSError when the model file cannot be read.
    """
    params = llm.context_params
    parts = [
        "llama-cpp-python",
        llama_cpp.__version__,
        file_identity(llm.model_path),
        f"n_vocab={llm.n_vocab()}",
        f"n_ctx={llm.n_ctx()}",
        f"score_rows={llm.scores.shape[0]}",
    ]
    for name in ("type_k", "type_v", "flash_attn", "flash_attn_type", "swa_full", "embeddings"):
        if hasattr(params, name):
            parts.append(f"{name}={getattr(params, name)}")
    return blake2b("\x00".join(parts).encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, eq=False)
class _Entry:
    """One cached LlamaState, compact: zero score rows dropped, stale input_ids past n_tokens dropped."""

    tokens_le: bytes  # the cache key (prompt + completion), uint32 LE
    fingerprint: str
    shape: Shape
    n_tokens: int
    seed: int
    input_ids: np.ndarray  # int32, the first n_tokens ids
    score_rows: int
    kept_rows: np.ndarray  # uint32 indices of the rows that are not all zero, ascending
    kept_scores: np.ndarray  # float32, len(kept_rows) x n_vocab
    llama_state: bytes
    llama_state_size: int

    @property
    def identity(self) -> str:
        """Fingerprint and shape in one string: the envelope fingerprint of this entry's files."""
        return _identity(self.fingerprint, self.shape)

    @property
    def entry_id(self) -> str:
        return _entry_id(self.fingerprint, self.shape, self.tokens_le)

    @property
    def nbytes(self) -> int:
        return (
            len(self.llama_state)
            + len(self.tokens_le)
            + self.input_ids.nbytes
            + self.kept_rows.nbytes
            + self.kept_scores.nbytes
            + _ENTRY_OVERHEAD
        )

    @classmethod
    def from_state(cls, tokens_le: bytes, state: Any, fingerprint: str) -> _Entry:
        """Raises TypeError when `state` is not shaped like llama_cpp.LlamaState."""
        try:
            input_ids = np.asarray(state.input_ids)
            scores = np.ascontiguousarray(state.scores, dtype=np.float32)
            n_tokens = int(state.n_tokens)
            seed = int(state.seed)
            llama_state = state.llama_state
            llama_state = llama_state if isinstance(llama_state, bytes) else bytes(llama_state)
            llama_state_size = int(state.llama_state_size)
        except (AttributeError, TypeError, ValueError) as exc:
            raise TypeError(f"cache values must be llama_cpp.LlamaState: {exc}") from None
        if input_ids.ndim != 1 or scores.ndim != 2 or not 0 <= n_tokens <= input_ids.size:
            raise TypeError(
                "cache values must be llama_cpp.LlamaState with 1-D input_ids, 2-D scores "
                f"and 0 <= n_tokens <= len(input_ids); got input_ids {input_ids.shape}, "
                f"scores {scores.shape}, n_tokens {n_tokens}"
            )
        if not _I64_MIN <= seed <= _I64_MAX or llama_state_size < 0:
            raise TypeError(
                f"LlamaState seed {seed} or llama_state_size {llama_state_size} out of range"
            )
        # Compare bit patterns, not values: -0.0 is kept, so the rebuilt matrix is bit-identical.
        kept_rows = np.flatnonzero(scores.view(np.uint32).any(axis=1)).astype(np.uint32)
        return cls(
            tokens_le=tokens_le,
            fingerprint=fingerprint,
            shape=Shape(scores.shape[1], input_ids.size),
            n_tokens=n_tokens,
            seed=seed,
            input_ids=input_ids[:n_tokens].astype(np.int32),
            score_rows=scores.shape[0],
            kept_rows=kept_rows,
            kept_scores=scores[kept_rows],
            llama_state=llama_state,
            llama_state_size=llama_state_size,
        )

    def to_state(self) -> LlamaState:
        """A fresh LlamaState (arrays are new; the state bytes are shared, they are immutable).

        input_ids past n_tokens come back as zeros: llama-cpp-python leaves stale ids there.
        """
        input_ids = np.zeros(self.shape.n_ctx, dtype=np.intc)
        input_ids[: self.n_tokens] = self.input_ids
        scores = np.zeros((self.score_rows, self.shape.n_vocab), dtype=np.single)
        scores[self.kept_rows] = self.kept_scores
        return LlamaState(
            input_ids=input_ids,
            scores=scores,
            n_tokens=self.n_tokens,
            llama_state=self.llama_state,
            llama_state_size=self.llama_state_size,
            seed=self.seed,
        )

    def encode(self) -> bytes:
        """The state payload (see _STATE); the store wraps it in a checksummed envelope."""
        head = _STATE.pack(
            _STATE_MAGIC,
            _FORMAT_VERSION,
            0,
            self.shape.n_vocab,
            self.shape.n_ctx,
            self.n_tokens,
            len(self.tokens_le) // 4,
            self.score_rows,
            self.kept_rows.size,
            self.seed,
            self.llama_state_size,
        )
        return b"".join(
            (
                head,
                self.tokens_le,
                self.input_ids.astype("<i4", copy=False).tobytes(),
                self.kept_rows.astype("<u4", copy=False).tobytes(),
                self.kept_scores.astype("<f4", copy=False).tobytes(),
                self.llama_state,
            )
        )

    @classmethod
    def decode(cls, payload: bytes, fingerprint: str) -> _Entry:
        """Raises CorruptEntryError when the payload is not a well-formed state of this format."""
        if len(payload) < _STATE.size:
            raise CorruptEntryError(f"state payload of {len(payload)} bytes is truncated")
        (
            magic,
            version,
            _reserved,
            n_vocab,
            n_ctx,
            n_tokens,
            n_key,
            score_rows,
            n_kept,
            seed,
            llama_state_size,
        ) = _STATE.unpack_from(payload)
        if magic != _STATE_MAGIC or version != _FORMAT_VERSION:
            raise CorruptEntryError(
                f"not a compat state payload (magic {magic!r}, version {version})"
            )
        if n_tokens > n_ctx or n_kept > score_rows:
            raise CorruptEntryError("state payload counts are inconsistent")
        off = _STATE.size
        sizes = (4 * n_key, 4 * n_tokens, 4 * n_kept, 4 * n_kept * n_vocab)
        if off + sum(sizes) > len(payload):
            raise CorruptEntryError("state payload is shorter than its header says")
        view = memoryview(payload)
        tokens_le = bytes(view[off : off + sizes[0]])
        off += sizes[0]
        input_ids = np.frombuffer(payload, "<i4", n_tokens, off).astype(np.int32)
        off += sizes[1]
        kept_rows = np.frombuffer(payload, "<u4", n_kept, off).astype(np.uint32)
        off += sizes[2]
        kept_scores = np.frombuffer(payload, "<f4", n_kept * n_vocab, off).astype(np.float32)
        off += sizes[3]
        if n_kept and (
            kept_rows[-1] >= score_rows or np.any(np.diff(kept_rows.astype(np.int64)) <= 0)
        ):
            raise CorruptEntryError("state payload's score row indices are out of order or range")
        return cls(
            tokens_le=tokens_le,
            fingerprint=fingerprint,
            shape=Shape(n_vocab, n_ctx),
            n_tokens=n_tokens,
            seed=seed,
            input_ids=input_ids,
            score_rows=score_rows,
            kept_rows=kept_rows,
            kept_scores=kept_scores.reshape(n_kept, n_vocab),
            llama_state=bytes(view[off:]),
            llama_state_size=llama_state_size,
        )

    def encode_manifest(self) -> bytes:
        """The small `-t` payload: enough to index the entry without reading its state."""
        fp = self.fingerprint.encode()
        head = _MANIFEST.pack(
            _MANIFEST_MAGIC,
            _FORMAT_VERSION,
            0,
            self.shape.n_vocab,
            self.shape.n_ctx,
            len(self.tokens_le) // 4,
            len(fp),
        )
        return b"".join((head, fp, self.tokens_le))


def _decode_manifest(payload: bytes) -> tuple[str, Shape, bytes]:
    """(fingerprint, shape, key tokens) of a manifest. Raises CorruptEntryError when malformed."""
    if len(payload) < _MANIFEST.size:
        raise CorruptEntryError("manifest payload is truncated")
    magic, version, _reserved, n_vocab, n_ctx, n_key, n_fp = _MANIFEST.unpack_from(payload)
    if magic != _MANIFEST_MAGIC or version != _FORMAT_VERSION:
        raise CorruptEntryError(f"not a compat manifest (magic {magic!r}, version {version})")
    off = _MANIFEST.size
    if len(payload) != off + n_fp + 4 * n_key or n_key == 0:
        raise CorruptEntryError("manifest length does not match its header")
    fingerprint = payload[off : off + n_fp].decode("utf-8", "replace")
    return fingerprint, Shape(n_vocab, n_ctx), payload[off + n_fp :]


def _identity(fingerprint: str, shape: Shape) -> str:
    return f"{fingerprint}|n_vocab={shape.n_vocab}|n_ctx={shape.n_ctx}"


def _entry_id(fingerprint: str, shape: Shape, tokens_le: bytes) -> str:
    h = blake2b(_identity(fingerprint, shape).encode() + b"\x00", digest_size=16)
    h.update(tokens_le)
    return h.hexdigest()


class BaseLlamaCache(llama_cpp.llama_cache.BaseLlamaCache):
    """The interface llama-cpp-python's Llama.set_cache expects, plus `__len__` and an always-true `__bool__`.

    Subclasses implement `cache_size`, `__getitem__` (raise KeyError on a miss), `__contains__`,
    `__setitem__` and `__len__`. It subclasses llama_cpp.llama_cache.BaseLlamaCache, so
    isinstance checks against llama-cpp-python's base pass.
    """

    def __init__(self, capacity_bytes: int = (2 << 30)) -> None:
        super().__init__(capacity_bytes)

    def __bool__(self) -> bool:
        # Llama._create_completion tests `if self.cache:`; with __len__ defined, an empty cache
        # would be false and never consulted nor filled.
        return True

    def __len__(self) -> int:
        """Number of cached entries. Raises NotImplementedError unless a subclass implements it."""
        raise NotImplementedError(f"{type(self).__name__} does not count its entries")


class _PrefixCache(BaseLlamaCache):
    """Longest-prefix lookup over a RadixIndex (one per state shape); subclasses own the entries.

    Subclasses implement `_read_entry` (None: gone or unusable; forgotten here), `_write_entry`
    (False: not stored), `cache_size` and `_refresh` (bring the index up to date with the store).
    """

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
        self.shape: Shape | None = None  # of the last state stored: the model this cache serves
        self.hits = 0
        self.misses = 0
        self._indexes: dict[Shape, RadixIndex] = {}
        self._ids: dict[str, tuple[Shape, bytes]] = {}  # entry id -> (shape, key tokens)
        self._lock = threading.RLock()
        self._told_unknown = False

    @property
    def _fp(self) -> str:
        return self.fingerprint or ""

    # -- hooks ----------------------------------------------------------------------------------

    def _read_entry(self, entry_id: str) -> _Entry | None:
        raise NotImplementedError

    def _write_entry(self, entry: _Entry) -> bool:
        raise NotImplementedError

    def _refresh(self, force: bool = False) -> None:
        """Bring the index up to date with entries others added or evicted; RAM needs nothing."""

    # -- index ----------------------------------------------------------------------------------

    def _add(self, entry_id: str, shape: Shape, tokens_le: bytes) -> None:
        index = self._indexes.setdefault(shape, RadixIndex())
        index.insert(tokens_le, entry_id)
        self._ids[entry_id] = (shape, tokens_le)

    def _forget(self, entry_id: str) -> None:
        known = self._ids.pop(entry_id, None)
        if known is None:
            return
        shape, tokens_le = known
        index = self._indexes.get(shape)
        node = index.find(tokens_le) if index is not None else None
        if node is not None:
            index.remove(node)
            if not len(index):
                del self._indexes[shape]

    def _serving_index(self) -> RadixIndex | None:
        if self.shape is not None:
            return self._indexes.get(self.shape)
        if self.fingerprint is not None and len(self._indexes) == 1:
            return next(iter(self._indexes.values()))
        if self._indexes and not self._told_unknown:
            self._told_unknown = True
            log.info(
                "%s has stored no state yet, so it does not know the model's shape; it misses until "
                "it has (pass fingerprint=llama_fingerprint(llm) to serve earlier entries at once)",
                type(self).__name__,
            )
        return None

    def _match(self, tokens_le: bytes) -> tuple[RadixIndex, Node] | None:
        """The index and cached sequence sharing the longest prefix with tokens_le, if any token."""
        index = self._serving_index()
        if index is None or not tokens_le:
            return None
        m = index.match(tokens_le)
        if m.length == 0:
            return None
        return index, index.terminal_below(m.node)

    # -- the llama-cpp-python interface ----------------------------------------------------------

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        """The state stored under the key sharing the longest prefix with `key`.

        Raises KeyError when no entry of this cache's fingerprint and shape shares a first token
        (unusable entries, such as corrupt files, are misses that are logged and removed), and
        TypeError when `key` is not a sequence of token ids.
        """
        tokens_le = token_bytes(key)
        with self._lock:
            self._refresh()
            while (found := self._match(tokens_le)) is not None:
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
        """Whether some usable entry shares at least the first token with `key` (as llama-cpp-python's caches)."""
        tokens_le = token_bytes(key)
        with self._lock:
            self._refresh()
            return self._match(tokens_le) is not None

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        """Store `value` under `key`, evicting least recently used entries to stay within capacity_bytes.

        A state that cannot be stored (larger than the whole capacity, disk full) is logged and
        dropped: llama-cpp-python calls this after every completion and must not fail there.
        Raises TypeError when `key` is not token ids or `value` is not a LlamaState.
        """
        tokens_le = token_bytes(key)
        entry = _Entry.from_state(tokens_le, value, self._fp)
        with self._lock:
            self.shape = entry.shape
            if not tokens_le:
                log.debug("not caching a state under an empty key")
                return
            if self._write_entry(entry):
                self._add(entry.entry_id, entry.shape, tokens_le)
                self._refresh(force=True)

    def __len__(self) -> int:
        """Number of entries of this cache's fingerprint (of every shape)."""
        with self._lock:
            self._refresh(force=True)
            return len(self._ids)

    def _find_longest_prefix_key(self, key: tuple[int, ...]) -> tuple[int, ...] | None:
        """The stored key sharing the longest prefix with `key`, or None (llama-cpp-python's helper)."""
        with self._lock:
            self._refresh()
            found = self._match(token_bytes(key))
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


class LlamaRAMCache(_PrefixCache):
    """In-process cache of llama.cpp states: longest-prefix lookup through a radix index, LRU within capacity_bytes.

    fingerprint: optional model identity (see llama_fingerprint); entries are served only to a
    cache of the same fingerprint and state shape. `hits` and `misses` count lookups.
    """

    def __init__(self, capacity_bytes: int = (2 << 30), *, fingerprint: str | None = None) -> None:
        """Raises ValueError for a capacity that is not a positive int, TypeError for a non-str fingerprint."""
        super().__init__(capacity_bytes, fingerprint)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    def __repr__(self) -> str:
        return f"LlamaRAMCache(capacity_bytes={self.capacity_bytes}, entries={len(self._entries)})"

    @property
    def cache_size(self) -> int:
        """Bytes held: state bytes, kept score rows, token ids and a fixed per-entry overhead."""
        return self._bytes

    def _read_entry(self, entry_id: str) -> _Entry | None:
        entry = self._entries.get(entry_id)
        if entry is not None:
            self._entries.move_to_end(entry_id)
        return entry

    def _write_entry(self, entry: _Entry) -> bool:
        size = entry.nbytes
        if size > self.capacity_bytes:
            log.warning(
                "not caching a state of %d bytes: LlamaRAMCache capacity_bytes is %d",
                size,
                self.capacity_bytes,
            )
            return False
        entry_id = entry.entry_id
        old = self._entries.pop(entry_id, None)
        if old is not None:
            self._bytes -= old.nbytes
        while self._entries and self._bytes + size > self.capacity_bytes:
            victim_id, victim = self._entries.popitem(last=False)
            self._bytes -= victim.nbytes
            self._forget(victim_id)
            self.evictions += 1
        self._entries[entry_id] = entry
        self._bytes += size
        return True

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._indexes.clear()
            self._ids.clear()
            self._bytes = 0


LlamaCache = LlamaRAMCache
"""Alias kept for llama-cpp-python's backward-compatible name."""


class LlamaDiskCache(_PrefixCache):
    """Persistent cache of llama.cpp states in `cache_dir`, shared safely by several processes.

    Entries live in a promptcache DiskStore (checksummed files, sqlite index, LRU within
    capacity_bytes across processes). Reading an entry keeps it. A new LlamaDiskCache on the
    same directory finds earlier entries (its prefix index is rebuilt from the small `-t` files
    on first use); a corrupt or truncated file is a logged miss and is removed.

    fingerprint: optional model identity (see llama_fingerprint). Without it, a new cache serves
    nothing until it has stored one state (that state tells it the model's shape).
    """

    def __init__(
        self,
        cache_dir: str = ".cache/llama_cpp",
        capacity_bytes: int = (2 << 30),
        *,
        fingerprint: str | None = None,
    ) -> None:
        """Open or create the cache in `cache_dir`.

        Raises ValueError for a capacity that is not a positive int, TypeError for a non-str
        fingerprint, and StoreUnavailableError when the directory or its index cannot be created.
        """
        super().__init__(capacity_bytes, fingerprint)
        self.cache_dir = cache_dir
        self._disk = DiskStore(Path(cache_dir), capacity_bytes)
        self._mark: tuple[int, int] | None = None  # (entries, bytes) of the store at the last sync
        self._foreign: set[str] = set()  # ids of entries of another fingerprint: skipped by syncs

    def __repr__(self) -> str:
        return f"LlamaDiskCache(cache_dir={self.cache_dir!r}, capacity_bytes={self.capacity_bytes})"

    @property
    def cache_size(self) -> int:
        """Bytes of entry files in the directory (every fingerprint's). Raises StoreUnavailableError."""
        return self._disk.size()

    def _read_entry(self, entry_id: str) -> _Entry | None:
        shape, tokens_le = self._ids[entry_id]
        identity = _identity(self._fp, shape)
        payload = self._disk.get(f"{entry_id}-s", fingerprint=identity)
        if payload is None:
            return None
        try:
            entry = _Entry.decode(payload, self._fp)
            if entry.tokens_le != tokens_le or entry.shape != shape:
                raise CorruptEntryError("state file holds another key or shape than its name")
        except CorruptEntryError as exc:
            log.warning(
                "disk cache entry %s in %s is unusable, removing it: %s",
                entry_id,
                self.cache_dir,
                exc,
            )
            self._delete(entry_id)
            return None
        # A hit refreshes the manifest's recency too, so that LRU evicts the pair together.
        if self._disk.get(f"{entry_id}-t", fingerprint=identity) is None:
            self._put_manifest(entry)
        return entry

    def _put_manifest(self, entry: _Entry) -> None:
        try:
            self._disk.put(
                f"{entry.entry_id}-t", entry.encode_manifest(), fingerprint=entry.identity
            )
        except (CapacityError, StoreUnavailableError) as exc:
            log.warning("cannot write a disk cache manifest in %s: %s", self.cache_dir, exc)

    def _write_entry(self, entry: _Entry) -> bool:
        entry_id, identity = entry.entry_id, entry.identity
        try:
            # State first: a manifest without its state is a miss that heals, the reverse is invisible.
            self._disk.put(f"{entry_id}-s", entry.encode(), fingerprint=identity)
            self._disk.put(f"{entry_id}-t", entry.encode_manifest(), fingerprint=identity)
        except (CapacityError, StoreUnavailableError) as exc:
            log.warning("not caching a state in %s: %s", self.cache_dir, exc)
            return False
        return True

    def _delete(self, entry_id: str) -> None:
        self._forget(entry_id)
        for suffix in ("-s", "-t"):
            try:
                self._disk.delete(f"{entry_id}{suffix}")
            except StoreUnavailableError as exc:
                log.warning("cannot remove disk cache entry %s%s: %s", entry_id, suffix, exc)

    def _refresh(self, force: bool = False) -> None:
        """Sync the index with the directory: drop entries gone, index new ones of this fingerprint.

        Without `force`, syncs only when the store's entry count or byte total changed.
        """
        try:
            mark = (len(self._disk), self._disk.size())
            if not force and mark == self._mark:
                return
            keys = list(self._disk.keys())
        except StoreUnavailableError as exc:
            log.warning(
                "disk cache %s unreadable, serving what is indexed: %s", self.cache_dir, exc
            )
            return
        states: set[str] = set()
        manifests: set[str] = set()
        for key in keys:
            m = _DISK_KEY.fullmatch(key)
            if m is not None:
                (states if m.group(2) == "s" else manifests).add(m.group(1))
        for entry_id in [i for i in self._ids if i not in states or i not in manifests]:
            self._forget(entry_id)
        self._foreign &= manifests
        for entry_id in manifests - self._ids.keys() - self._foreign:
            if entry_id not in states:  # its state was evicted or removed: the manifest is litter
                self._delete(entry_id)
                continue
            payload = self._disk.get(f"{entry_id}-t")
            if payload is None:
                continue
            try:
                fingerprint, shape, tokens_le = _decode_manifest(payload)
            except CorruptEntryError as exc:
                log.warning(
                    "disk cache manifest %s in %s is unusable, removing it: %s",
                    entry_id,
                    self.cache_dir,
                    exc,
                )
                self._delete(entry_id)
                continue
            if fingerprint != self._fp or _entry_id(fingerprint, shape, tokens_le) != entry_id:
                self._foreign.add(entry_id)
                continue
            self._add(entry_id, shape, tokens_le)
        self._mark = mark

    def clear(self) -> None:
        """Remove every entry of this cache's fingerprint from the directory."""
        with self._lock:
            self._refresh(force=True)
            for entry_id in list(self._ids):
                self._delete(entry_id)

    def close(self) -> None:
        """Close this process's index connections (they reopen on next use). Never raises."""
        self._disk.close()
