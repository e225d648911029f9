"""Sessions: a live conversation (tokens, how many are reusable, state) as self-checking bytes, and
LLM's methods that save and restore one.

Owns the session format inside the store's envelope (version, checksum, model fingerprint) and
SessionMethods (LLM's base class); the engine reads and loads states. Never unpickles.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from promptcache.engines.llama_cpp.plan import LiveSequence
from promptcache.errors import CorruptEntryError, ModelMismatchError, PromptCacheError
from promptcache.files import atomic_write
from promptcache.store import envelope

if TYPE_CHECKING:
    from promptcache.codec import StateCodec
    from promptcache.engines.llama_cpp.engine import Engine

SESSION_KEY = "session"
SESSION_FORMAT = "promptcache-session"
SESSION_VERSION = 1


def pack(live: LiveSequence, state: bytes, *, codec_name: str, fingerprint: str) -> bytes:
    """[u32 header length][JSON header][u32 tokens][state], in an envelope stamped with `fingerprint`."""
    header = json.dumps(
        {
            "format": SESSION_FORMAT,
            "version": SESSION_VERSION,
            "n_tokens": len(live.tokens),
            "n_exact": live.n_reusable,
            "codec": codec_name,
        }
    ).encode()
    tokens = np.asarray(live.tokens, dtype="<u4").tobytes()
    payload = struct.pack("<I", len(header)) + header + tokens + state
    return envelope.pack(SESSION_KEY, payload, fingerprint)


def unpack(blob: bytes, *, fingerprint: str) -> tuple[LiveSequence, bytes]:
    """The live sequence and state a session blob holds.

    Raises TypeError for a non-bytes blob, ModelMismatchError for another model, layout or reuse
    mode, and CorruptEntryError for damaged or foreign bytes.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError("a session is bytes")
    payload, _flags, stamped = envelope.unpack(blob, key=SESSION_KEY)
    if stamped != fingerprint:
        raise ModelMismatchError(
            "this session was saved with another model, KV layout or reuse mode; load it with that model"
        )
    try:
        (n_header,) = struct.unpack_from("<I", payload)
        header = json.loads(payload[4 : 4 + n_header])
        n = int(header["n_tokens"])
        off = 4 + n_header
        tokens = np.frombuffer(payload, dtype="<u4", count=n, offset=off).tolist()
        state = payload[off + 4 * n :]
        if header.get("format") != SESSION_FORMAT or header.get("version") != SESSION_VERSION:
            raise CorruptEntryError("not a promptcache session of this version")
        n_reusable = max(0, min(int(header.get("n_exact", n)), n))
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise CorruptEntryError(f"session header unreadable: {exc}") from None
    return LiveSequence(tokens, n_reusable), bytes(state)


class SessionMethods:
    """Saving and restoring an LLM's conversation (LLM provides the attributes declared here)."""

    engine: Engine
    codec: StateCodec
    fingerprint: str
    _seq: int | None
    _lock: threading.RLock

    def _held(self) -> Any:  # pragma: no cover - the LLM's
        raise NotImplementedError

    def session_bytes(self) -> bytes:
        """The live conversation (tokens and state) as a self-checking, model-stamped blob."""
        with self._lock:
            held = self._held()
            if held is None or not held.tokens:
                raise PromptCacheError("nothing to save: the context holds no tokens yet")
            state = self.engine.state(self._seq)  # type: ignore[arg-type]
            return pack(held, state, codec_name=self.codec.name, fingerprint=self.fingerprint)

    def save_session(self, path: str | os.PathLike[str]) -> int:
        """Write the live conversation to `path` atomically; returns the bytes written."""
        return atomic_write(path, self.session_bytes())

    def load_session_bytes(self, blob: bytes) -> int:
        """Restore a conversation saved by session_bytes(); returns its token count.

        Raises ModelMismatchError for another model or layout and CorruptEntryError for damaged
        bytes; either way the LLM stays usable (its sequence is emptied only when loading fails late).
        """
        live, state = unpack(blob, fingerprint=self.fingerprint)
        with self._lock:
            self.engine.reserve(len(live.tokens) + 1)
            if self._seq is not None and self._seq in self.engine.sequences:
                self.engine.free(self._seq)
            self._seq = None
            try:
                self._seq = self.engine.load(live.tokens, state, live.n_reusable)
            except PromptCacheError as exc:
                raise CorruptEntryError(f"llama.cpp refused the session's state: {exc}") from exc
            return len(live.tokens)

    def load_session(self, path: str | os.PathLike[str]) -> int:
        """Restore a conversation saved by save_session(); see load_session_bytes for errors."""
        try:
            blob = Path(path).read_bytes()
        except OSError as exc:
            raise PromptCacheError(f"cannot read session {path}: {exc}") from exc
        return self.load_session_bytes(blob)

    def state_bytes(self) -> bytes:
        """The live sequence's llama.cpp state (what the cache would store for `tokens`)."""
        with self._lock:
            if self._held() is None:
                raise PromptCacheError("no context yet: run a prompt first")
            return self.engine.state(self._seq)  # type: ignore[arg-type]


__all__ = ["SessionMethods", "pack", "unpack", "SESSION_KEY", "SESSION_FORMAT", "SESSION_VERSION"]
