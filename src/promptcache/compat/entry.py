"""The byte format of a drop-in cache entry: a llama_cpp.LlamaState, compact, and its small manifest.

Owns how a state becomes a payload and back (bit for bit) and how an entry is named; never touches
a store, an index or a Llama.

An entry keeps the cache key's tokens, `input_ids[:n_tokens]`, `n_tokens`, `seed`, the llama.cpp
state bytes and only the rows of the score matrix that are not all zero (with `logits_all=False`,
llama-cpp-python 0.3.36 never writes that matrix, so a state carries an n_tokens x n_vocab block of
zeros); reads rebuild the full float32 matrix bit for bit. Its manifest holds its fingerprint, shape
and key tokens: what a new process needs to index the entry without reading its state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

import numpy as np
from llama_cpp.llama import LlamaState

from promptcache.compat.identity import Shape
from promptcache.errors import CorruptEntryError

__all__ = ["Entry", "decode_manifest", "entry_id_of", "scope_of"]

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1

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


@dataclass(frozen=True, eq=False)
class Entry:
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
    def scope(self) -> str:
        """Fingerprint and shape in one string: the envelope fingerprint of this entry's payloads."""
        return scope_of(self.fingerprint, self.shape)

    @property
    def entry_id(self) -> str:
        return entry_id_of(self.fingerprint, self.shape, self.tokens_le)

    @classmethod
    def from_state(cls, tokens_le: bytes, state: Any, fingerprint: str) -> Entry:
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
    def decode(cls, payload: bytes, fingerprint: str) -> Entry:
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


def decode_manifest(payload: bytes) -> tuple[str, Shape, bytes]:
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


def scope_of(fingerprint: str, shape: Shape) -> str:
    """The model fingerprint and state shape an entry is served under, as one string."""
    return f"{fingerprint}|n_vocab={shape.n_vocab}|n_ctx={shape.n_ctx}"


def entry_id_of(fingerprint: str, shape: Shape, tokens_le: bytes) -> str:
    """An entry's name (32 hex digits): a hash of its scope and key tokens."""
    h = blake2b(scope_of(fingerprint, shape).encode() + b"\x00", digest_size=16)
    h.update(tokens_le)
    return h.hexdigest()
