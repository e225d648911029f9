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

Model check: every entry records a fingerprint and its state's shape (n_vocab, n_ctx); a lookup
is served only from entries of the caller's fingerprint and shape. The fingerprint is the cache's
`fingerprint=` when given, else that of the `Llama` calling the cache, learnt without being told:
llama-cpp-python 0.3.36 calls the cache from `Llama._create_completion` as `self.cache[...]`, so
the nearest caller frame (at most _CALLER_DEPTH up) whose `self` is a `llama_cpp.Llama` is the
model, and `llama_fingerprint` names its whole GGUF file (promptcache.model.model_identity: a
fine-tune of the same shape, or one changed byte, is another model) with the settings a state's layout depends on, memoized
per Llama and per file. Frames rather than wrapping `Llama.set_cache`: nothing global is patched,
`llm.cache = cache` works too, and one cache set on two Llamas of two models tells them apart on
every call. Fail safe: when llama_cpp's own code calls the cache and no Llama is found up the
stack (a llama-cpp-python that calls from elsewhere), the lookup is a miss and nothing is stored
(logged once). A call from user code with no Llama up the stack (cache[key] by hand) uses the
cache's fingerprint or "", and, without a fingerprint, the shape of the last state stored
through this object.

Subclasses of BaseLlamaCache written as llama-cpp-python's docs show (a dict-like store that
returns None on a miss and json.dumps the value) work unchanged: the base gives `cache_size` and
`capacity_bytes` defaults, hands `__setitem__` a PortableLlamaState (a LlamaState that is also a
JSON-ready dict carrying the model fingerprint) and turns what `__getitem__` returns (None, that
dict as read back, a state of another model) into a state or a KeyError.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import os
import re
import sqlite3
import struct
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path
from typing import Any, NamedTuple

import llama_cpp
import llama_cpp.llama_cache
import numpy as np
from llama_cpp import Llama
from llama_cpp.llama import LlamaState

from promptcache.errors import CapacityError, CorruptEntryError, StoreUnavailableError
from promptcache.index import Node, RadixIndex
from promptcache.keys import token_bytes
from promptcache.model import model_identity
from promptcache.store.disk import DiskStore

log = logging.getLogger(__name__)

__all__ = [
    "BaseLlamaCache",
    "Llama",
    "LlamaCache",
    "LlamaDiskCache",
    "LlamaRAMCache",
    "LlamaState",
    "PortableLlamaState",
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


_LLAMA_IDS: weakref.WeakKeyDictionary[Llama, tuple[str, Shape]] = weakref.WeakKeyDictionary()


def llama_fingerprint(llm: Llama) -> str:
    """A fingerprint for `llm`: its GGUF file's content hash plus every setting a state's layout depends on.

    The caches compute it themselves for the Llama that calls them; pass it as `fingerprint=`
    to pin one explicitly. Includes the llama-cpp-python version and llama.cpp's system info
    (backend and instruction set), since a state is only as portable as the kernels that made it.
    Raises OSError when the model file cannot be read.
    """
    return _llama_identity(llm)[0]


def _llama_identity(llm: Llama) -> tuple[str, Shape]:
    """(fingerprint, state shape) of `llm`, memoized per Llama. Raises OSError, AttributeError."""
    known = _LLAMA_IDS.get(llm)
    if known is not None:
        return known
    params = llm.context_params
    parts = [
        "llama-cpp-python",
        llama_cpp.__version__,
        llama_cpp.llama_print_system_info().decode("utf-8", "replace"),
        model_identity(llm.model_path),
        f"n_vocab={llm.n_vocab()}",
        f"n_ctx={llm.n_ctx()}",
        f"score_rows={llm.scores.shape[0]}",
    ]
    for name in ("type_k", "type_v", "flash_attn", "flash_attn_type", "swa_full", "embeddings"):
        if hasattr(params, name):
            parts.append(f"{name}={getattr(params, name)}")
    fingerprint = blake2b("\x00".join(parts).encode(), digest_size=16).hexdigest()
    known = (fingerprint, Shape(llm.n_vocab(), len(llm.input_ids)))
    _LLAMA_IDS[llm] = known
    return known


class _Refused:
    """The caller is llama_cpp code, but no Llama was found up the stack: serve and store nothing."""


_REFUSED = _Refused()
_CALLER_DEPTH = 12
_refusal_logged = False


def _calling_llama() -> Llama | _Refused | None:
    """The Llama whose method called the cache (nearest frame whose `self` is a Llama), if any.

    _REFUSED when llama_cpp code is on the stack without a Llama in reach: the calling convention
    this relies on (llama-cpp-python 0.3.36) has changed, and a miss is the safe answer.
    """
    global _refusal_logged
    frame = sys._getframe(1)
    from_llama_cpp = False
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            break
        if "self" in frame.f_code.co_varnames:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Llama):
                return obj
        module = frame.f_globals.get("__name__", "")
        if module == "llama_cpp" or module.startswith("llama_cpp."):
            from_llama_cpp = True
        frame = frame.f_back
    if not from_llama_cpp:
        return None
    if not _refusal_logged:
        _refusal_logged = True
        log.warning(
            "llama_cpp called a promptcache cache but no Llama was found among its callers "
            "(llama-cpp-python %s; promptcache is tested with 0.3.36): serving and storing nothing; "
            "pass fingerprint=llama_fingerprint(llm) to the cache to use it anyway",
            llama_cpp.__version__,
        )
    return _REFUSED


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


_PORTABLE_FORMAT = "promptcache.llama_state/1"


class PortableLlamaState(dict, LlamaState):
    """A LlamaState that is also a JSON-ready dict: what a user subclass's `__setitem__` receives.

    As a LlamaState it has input_ids, scores, n_tokens, llama_state, llama_state_size and seed; as a
    dict it holds three strings (format, the model's fingerprint, the compact state in base64), so
    `json.dump(value, f)` works and what `json.load` returns is read back by the base class.
    """

    def __init__(self, state: Any, fingerprint: str) -> None:
        """Raises TypeError when `state` is not shaped like llama_cpp.LlamaState."""
        entry = _Entry.from_state(b"", state, fingerprint)
        dict.__init__(
            self,
            format=_PORTABLE_FORMAT,
            fingerprint=fingerprint,
            state=base64.b64encode(entry.encode()).decode("ascii"),
        )
        LlamaState.__init__(
            self,
            input_ids=state.input_ids,
            scores=state.scores,
            n_tokens=entry.n_tokens,
            llama_state=entry.llama_state,
            llama_state_size=entry.llama_state_size,
            seed=entry.seed,
        )


def _state_from_user(value: Any, caller: tuple[str, Shape | None]) -> LlamaState:
    """What a user subclass's __getitem__ returned, as a state for `caller`; KeyError when unusable."""
    fingerprint, shape = caller
    if isinstance(value, dict) and value.get("format") == _PORTABLE_FORMAT:
        if value.get("fingerprint") != fingerprint:
            raise KeyError("cached state belongs to another model")
        try:
            payload = base64.b64decode(str(value["state"]), validate=True)
            entry = _Entry.decode(payload, fingerprint)
        except (KeyError, binascii.Error, ValueError, CorruptEntryError) as exc:
            log.warning("cached state read back from a custom cache is unusable: %s", exc)
            raise KeyError("unusable cached state") from None
        if shape is not None and entry.shape != shape:
            raise KeyError("cached state has another shape than the model")
        return entry.to_state()
    if not isinstance(value, LlamaState):
        log.warning("a custom cache returned %s, not a LlamaState: a miss", type(value).__name__)
        raise KeyError("not a cached state")
    try:
        found = Shape(np.shape(value.scores)[1], np.size(value.input_ids))
    except (AttributeError, IndexError, TypeError):
        raise KeyError("not a cached state") from None
    if shape is not None and found != shape:
        raise KeyError("cached state has another shape than the model")
    return value


def _adapt_getitem(method: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    @functools.wraps(method)
    def __getitem__(self: Any, key: Any) -> LlamaState:
        caller = _resolve_caller(None)
        if caller is None:
            raise KeyError("the calling model is unknown")
        try:
            value = method(self, key)
        except (ValueError, OSError) as exc:  # e.g. a file a crashed write left half-written
            log.warning(
                "%s failed to read an entry, treating it as a miss: %r", type(self).__name__, exc
            )
            raise KeyError("unreadable cache entry") from None
        if value is None:
            raise KeyError("no cached state for this key")
        return _state_from_user(value, caller)

    return __getitem__


def _adapt_setitem(method: Callable[[Any, Any, Any], None]) -> Callable[[Any, Any, Any], None]:
    @functools.wraps(method)
    def __setitem__(self: Any, key: Any, value: Any) -> None:
        caller = _resolve_caller(None)
        if caller is None:
            return
        if isinstance(value, LlamaState) and not isinstance(value, PortableLlamaState):
            value = PortableLlamaState(value, caller[0])
        method(self, key, value)

    return __setitem__


def _resolve_caller(fingerprint: str | None) -> tuple[str, Shape | None] | None:
    """(fingerprint, shape) a call is served under; None: refuse (miss, store nothing).

    `fingerprint` (the cache's own) wins; else the calling Llama's; else "" with no shape.
    """
    found = _calling_llama()
    if isinstance(found, Llama):
        try:
            llama_fp, shape = _llama_identity(found)
        except (OSError, AttributeError, TypeError, ValueError) as exc:
            log.warning("cannot fingerprint the calling Llama, serving nothing: %s", exc)
            return None
        return (fingerprint if fingerprint is not None else llama_fp), shape
    if found is _REFUSED and fingerprint is None:
        return None
    return (fingerprint or ""), None


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
            cls.__getitem__ = _adapt_getitem(cls.__dict__["__getitem__"])  # type: ignore[method-assign]
        if "__setitem__" in cls.__dict__:
            cls.__setitem__ = _adapt_setitem(cls.__dict__["__setitem__"])  # type: ignore[method-assign]

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


class _PrefixCache(BaseLlamaCache):
    """Longest-prefix lookup over a RadixIndex per (fingerprint, shape); subclasses own the entries.

    Subclasses implement `_read_entry` (None: gone or unusable; forgotten here), `_write_entry`
    (False: not stored), `cache_size`, `_refresh` (bring the index up to date with the store) and
    may implement `_before` (run first in every call, under the lock).
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
        self._indexes: dict[str, RadixIndex] = {}  # identity (fingerprint and shape) -> index
        self._identities: dict[str, tuple[str, Shape]] = {}
        self._ids: dict[str, tuple[str, bytes]] = {}  # entry id -> (identity, key tokens)
        self._lock = threading.RLock()
        self._told_unknown = False
        self._last_llama: tuple[str, Shape] | None = None  # the last Llama that called this cache

    def _caller(self) -> tuple[str, Shape | None] | None:
        """(fingerprint, shape) this call is served under (None: refuse); a hand call gets the last Llama's."""
        caller = _resolve_caller(self.fingerprint)
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

    def _read_entry(self, entry_id: str) -> _Entry | None:
        raise NotImplementedError

    def _write_entry(self, entry: _Entry) -> bool:
        raise NotImplementedError

    def _refresh(self, force: bool = False) -> None:
        """Bring the index up to date with entries others added or evicted; RAM needs nothing."""

    def _before(self) -> None:
        """Run first in every lookup or store, under the lock; RAM needs nothing."""

    # -- index ----------------------------------------------------------------------------------

    def _add(self, entry_id: str, fingerprint: str, shape: Shape, tokens_le: bytes) -> None:
        identity = _identity(fingerprint, shape)
        self._identities[identity] = (fingerprint, shape)
        index = self._indexes.setdefault(identity, RadixIndex())
        index.insert(tokens_le, entry_id)
        self._ids[entry_id] = (identity, tokens_le)

    def _forget(self, entry_id: str) -> None:
        known = self._ids.pop(entry_id, None)
        if known is None:
            return
        identity, tokens_le = known
        index = self._indexes.get(identity)
        node = index.find(tokens_le) if index is not None else None
        if node is not None:
            index.remove(node)
            if not len(index):
                del self._indexes[identity]
                del self._identities[identity]

    def _serving_index(self, caller: tuple[str, Shape | None]) -> RadixIndex | None:
        fingerprint, shape = caller
        if shape is None:
            shape = self.shape
        if shape is not None:
            return self._indexes.get(_identity(fingerprint, shape))
        mine = [i for i, (fp, _s) in self._identities.items() if fp == fingerprint]
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

    def _match(
        self, tokens_le: bytes, caller: tuple[str, Shape | None]
    ) -> tuple[RadixIndex, Node] | None:
        """The index and cached sequence sharing the longest prefix with tokens_le, if any token."""
        index = self._serving_index(caller)
        if index is None or not tokens_le:
            return None
        m = index.match(tokens_le)
        if m.length == 0:
            return None
        return index, index.terminal_below(m.node)

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
        tokens_le = token_bytes(key)
        caller = self._caller()
        if caller is None:
            return False
        with self._lock:
            self._before()
            self._refresh()
            return self._match(tokens_le, caller) is not None

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        """Store `value` under `key` for the calling model, evicting least recently used entries to stay within capacity_bytes.

        A state that cannot be stored (larger than the whole capacity, disk full) is logged and
        dropped: llama-cpp-python calls this after every completion and must not fail there.
        Raises TypeError when `key` is not token ids or `value` is not a LlamaState.
        """
        tokens_le = token_bytes(key)
        caller = self._caller()
        entry = _Entry.from_state(tokens_le, value, caller[0] if caller else "")
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
                1
                for identity, _t in self._ids.values()
                if self._identities[identity][0] == self.fingerprint
            )

    def _find_longest_prefix_key(self, key: tuple[int, ...]) -> tuple[int, ...] | None:
        """The stored key sharing the longest prefix with `key`, or None (llama-cpp-python's helper)."""
        caller = self._caller()
        if caller is None:
            return None
        with self._lock:
            self._before()
            self._refresh()
            found = self._match(token_bytes(key), caller)
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
            self._identities.clear()
            self._ids.clear()
            self._bytes = 0


LlamaCache = LlamaRAMCache
"""Alias kept for llama-cpp-python's backward-compatible name."""


class LlamaDiskCache(_PrefixCache):
    """Persistent cache of llama.cpp states in `cache_dir`, shared safely by several processes.

    Entries live in a promptcache DiskStore (checksummed files under `entries/`, a sqlite index
    `index.sqlite`, LRU within capacity_bytes across processes). Reading an entry keeps it. A new
    LlamaDiskCache on the same directory, in a new process, serves earlier entries of the model
    calling it at once (see the module docstring: it learns the model from the calling Llama).

    It heals from what a user's cleanup does to the directory, never raising into a completion: a
    deleted or replaced `index.sqlite` is noticed on the next call and rebuilt from the entry files
    whose checksums verify; a deleted, truncated or corrupt entry file is a logged miss. The
    directories it holds are touched when used, so a cleanup that removes top-level files older
    than some age (as llama-cpp-python's docs show) never meets a stale directory of a live cache.

    fingerprint: optional model identity that overrides the calling Llama's (see llama_fingerprint).
    max_age: seconds after which an entry expires (None: never).
    """

    _TOUCH_EVERY = 1.0  # seconds between refreshes of the directories' mtimes

    def __init__(
        self,
        cache_dir: str = ".cache/llama_cpp",
        capacity_bytes: int = (2 << 30),
        *,
        fingerprint: str | None = None,
        max_age: float | None = None,
    ) -> None:
        """Open or create the cache in `cache_dir`.

        Raises ValueError for a capacity that is not a positive int or a max_age that is not
        positive, TypeError for a non-str fingerprint, and StoreUnavailableError when the
        directory or its index cannot be created.
        """
        super().__init__(capacity_bytes, fingerprint)
        if max_age is not None and not max_age > 0:
            raise ValueError(f"max_age must be positive seconds or None, got {max_age!r}")
        self.cache_dir = cache_dir
        self.max_age = max_age
        self._index_path = Path(cache_dir) / "index.sqlite"
        self._index_id: tuple[int, int] | None = None
        self._touched = 0.0
        self._mark: tuple[int, int] | None = None  # (entries, bytes) of the store at the last sync
        self._disk = self._open()
        self._touch()

    def __repr__(self) -> str:
        return f"LlamaDiskCache(cache_dir={self.cache_dir!r}, capacity_bytes={self.capacity_bytes})"

    # -- the directory, and healing it ------------------------------------------------------------

    def _open(self) -> DiskStore:
        """A DiskStore on cache_dir; rebuilds its index from entry files when the index is new or lost.

        An index sqlite cannot read (a stale WAL replayed onto a new file, a truncated file) is
        removed and recreated: the entry files are the truth. Raises StoreUnavailableError.
        """
        path = Path(self.cache_dir)
        try:
            disk = DiskStore(path, self.capacity_bytes, max_age=self.max_age)
        except StoreUnavailableError as exc:
            cause = exc.__cause__
            if not isinstance(cause, sqlite3.DatabaseError) or isinstance(
                cause, sqlite3.OperationalError
            ):
                raise
            log.warning(
                "disk cache index %s is unreadable (%s); rebuilding it", self._index_path, cause
            )
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.unlink(f"{self._index_path}{suffix}")
                except FileNotFoundError:
                    pass
                except OSError as err:
                    raise StoreUnavailableError(
                        f"cannot remove {self._index_path}{suffix}: {err}"
                    ) from err
            disk = DiskStore(path, self.capacity_bytes, max_age=self.max_age)
        st = os.stat(self._index_path)
        self._index_id = (st.st_dev, st.st_ino)
        if len(disk) == 0 and self._has_entry_files(path / "entries"):
            counts = disk.gc()
            log.info("rebuilt disk cache index %s from entry files: %s", self._index_path, counts)
        else:
            disk.expire()
        return disk

    @staticmethod
    def _has_entry_files(entries: Path) -> bool:
        try:
            for shard in os.scandir(entries):
                if shard.is_dir(follow_symlinks=False) and any(os.scandir(shard.path)):
                    return True
        except OSError:
            return False
        return False

    def _before(self) -> None:
        """Reopen (and rebuild) when index.sqlite was deleted or replaced; keep directory mtimes fresh."""
        try:
            st = os.stat(self._index_path)
            intact = (st.st_dev, st.st_ino) == self._index_id
        except OSError:
            intact = False
        if not intact:
            log.warning(
                "disk cache index %s was deleted or replaced; rebuilding it", self._index_path
            )
            self._disk.close()
            try:
                self._disk = self._open()
            except StoreUnavailableError as exc:
                log.warning("cannot reopen disk cache %s: %s", self.cache_dir, exc)
                return
            self._ids.clear()
            self._indexes.clear()
            self._identities.clear()
            self._mark = None
        self._touch()

    def _touch(self) -> None:
        """Set the directories' mtimes to now (at most once a _TOUCH_EVERY): they are in use."""
        now = time.time()
        if now - self._touched >= self._TOUCH_EVERY:
            self._touched = now
            for sub in ("entries", "tmp"):
                try:
                    os.utime(os.path.join(self.cache_dir, sub))
                except OSError:
                    pass  # recreated by the next write if it is gone

    @property
    def cache_size(self) -> int:
        """Bytes of entry files in the directory (every model's); 0 when the index is unreadable."""
        with self._lock:
            self._before()
            try:
                return self._disk.size()
            except StoreUnavailableError as exc:
                log.warning("disk cache %s unreadable: %s", self.cache_dir, exc)
                return 0

    # -- entries --------------------------------------------------------------------------------

    def _read_entry(self, entry_id: str) -> _Entry | None:
        identity, tokens_le = self._ids[entry_id]
        fingerprint, shape = self._identities[identity]
        payload = self._disk.get(f"{entry_id}-s", fingerprint=identity)
        if payload is None:
            return None
        try:
            entry = _Entry.decode(payload, fingerprint)
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
        """Sync the index with the directory: drop entries gone, index new ones (every model's).

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
        for entry_id in manifests - self._ids.keys():
            if entry_id not in states:  # its state was evicted or removed: the manifest is litter
                self._delete(entry_id)
                continue
            payload = self._disk.get(f"{entry_id}-t")
            if payload is None:
                continue
            try:
                fingerprint, shape, tokens_le = _decode_manifest(payload)
                if _entry_id(fingerprint, shape, tokens_le) != entry_id:
                    raise CorruptEntryError("manifest holds another key than its name")
            except CorruptEntryError as exc:
                log.warning(
                    "disk cache manifest %s in %s is unusable, removing it: %s",
                    entry_id,
                    self.cache_dir,
                    exc,
                )
                self._delete(entry_id)
                continue
            self._add(entry_id, fingerprint, shape, tokens_le)
        self._mark = mark

    def clear(self) -> None:
        """Remove every entry of this cache's fingerprint (every entry, without one) from the directory."""
        with self._lock:
            self._before()
            self._refresh(force=True)
            for entry_id, (identity, _t) in list(self._ids.items()):
                if self.fingerprint is None or self._identities[identity][0] == self.fingerprint:
                    self._delete(entry_id)

    def close(self) -> None:
        """Close this process's index connections (they reopen on next use). Never raises."""
        self._disk.close()
