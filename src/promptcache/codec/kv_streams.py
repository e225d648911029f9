"""KV stream layouts: a sequence's state written from a context of several KV streams (one per
sequence, llama.cpp's `kv_unified = false`) rewritten as from a one-stream context, and back.

Owns these two conversions only; the byte layout of one stream is llama_state's (`_read_stream`).
Never calls llama.cpp. The prefix cache and its codec see one format whatever context wrote a state.

A state (llama_state_seq_get_data) is an 8-byte header (magic, seq id), then each KV cache's part (one
cache; two for interleaved sliding-window models such as gemma3: the global layers', then the
window's): u32 n_stream, then per stream u32 cell_count and, when it is not 0, that stream's cells
and K/V rows (vendor/llama.cpp/src/llama-kv-cache.cpp, state_write / state_read: an empty stream is
skipped on read, and a sequence is read into its own stream whichever stream it was written from).
"""

from __future__ import annotations

import struct

from promptcache.codec.llama_state import (
    _HEAD,
    _U32,
    CELL_EXT_SIZES,
    Buffer,
    _Cursor,
    _read_stream,
)
from promptcache.errors import CodecError

_MAX_STREAMS = 256  # llama.cpp's LLAMA_MAX_SEQ
_MAX_CACHES = 2  # a plain KV cache, or an interleaved-SWA model's global + window caches


def _kv_caches(state: Buffer, ext: int) -> list[list[memoryview]]:
    """Each KV cache's streams (a stream: its u32 cell_count and what follows), read with `ext`
    bytes of cell extension. Raises CodecError (or struct.error) when the bytes do not parse."""
    view = memoryview(state)
    cur = _Cursor(view, _HEAD.size)
    caches: list[list[memoryview]] = []
    while cur.pos < len(view):
        (n_stream,) = cur.take(_U32)
        if not 1 <= n_stream <= _MAX_STREAMS or len(caches) == _MAX_CACHES:
            raise CodecError("not a KV cache")
        streams = []
        for _ in range(n_stream):
            start = cur.pos
            (cells,) = cur.take(_U32)
            if cells:
                _read_stream(cur, cells, ext)
            streams.append(view[start : cur.pos])
        caches.append(streams)
    if not caches:
        raise CodecError("a state without a KV cache")
    return caches


def _caches(state: Buffer) -> list[list[memoryview]]:
    """_kv_caches with the one cell-extension size that parses every byte."""
    for ext in CELL_EXT_SIZES:
        try:
            return _kv_caches(state, ext)
        except (struct.error, CodecError):
            continue
    raise CodecError("a sequence state's KV streams are not laid out as this engine expects")


def single_stream(state: Buffer) -> bytes | Buffer:
    """A state written from a context of several KV streams, rewritten as from a one-stream context
    (the state itself when it has one stream). Raises CodecError when the bytes are not laid out so
    (more than one non-empty stream)."""
    magic, seq = _HEAD.unpack_from(state)
    (n_stream,) = _U32.unpack_from(state, _HEAD.size)
    if n_stream == 1:
        return state
    parts: list[Buffer] = [_HEAD.pack(magic, seq)]
    for streams in _caches(state):
        held = [s for s in streams if _U32.unpack_from(s)[0]]
        if len(held) > 1:
            raise CodecError("a sequence state holds cells in more than one KV stream")
        parts += [_U32.pack(1), held[0] if held else _U32.pack(0)]
    return b"".join(parts)


def stream_state(state: Buffer, n_stream: int) -> bytes | Buffer:
    """A one-stream state laid out for a context of n_stream KV streams (the inverse of
    single_stream; the state itself when n_stream is 1). Raises CodecError."""
    magic, seq = _HEAD.unpack_from(state)
    (have,) = _U32.unpack_from(state, _HEAD.size)
    if have == n_stream:
        return state
    if have != 1:
        raise CodecError(f"a state of {have} KV streams cannot load into a context of {n_stream}")
    parts: list[Buffer] = [_HEAD.pack(magic, seq)]
    for (stream,) in _caches(state):
        parts += [_U32.pack(n_stream), stream, bytes(4 * (n_stream - 1))]
    return b"".join(parts)


__all__ = ["single_stream", "stream_state"]
