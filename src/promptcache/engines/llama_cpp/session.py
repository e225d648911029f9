"""Session blobs: a live conversation (tokens, how many are reusable, state) as self-checking bytes.

Owns the session format inside the store's envelope (version, checksum, model fingerprint); never
touches a context (llm.py reads and loads the state) and never unpickles.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from promptcache.engines.llama_cpp.plan import LiveSequence
from promptcache.errors import CorruptEntryError, ModelMismatchError
from promptcache.store import envelope

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


__all__ = ["pack", "unpack", "SESSION_KEY", "SESSION_FORMAT", "SESSION_VERSION"]
