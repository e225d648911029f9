"""The bytes of CacheManager entries: bytes, numpy arrays and Arrow tables, each behind a 4-byte kind tag.

Owns how an entry value becomes bytes and back; never pickles (numpy: np.save with allow_pickle=False,
Arrow: the IPC stream format) and never decides where values are stored.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from promptcache.errors import CorruptEntryError

if TYPE_CHECKING:
    import pyarrow as pa

# One tag per kind; "pcv" + a version-and-kind letter. Entries written without a tag are not ours.
_BYTES, _NUMPY, _ARROW = b"pcvb", b"pcvn", b"pcva"
TAG_BYTES = 4
"""Bytes every entry adds to its value (what capacity counts besides the value)."""


def _is_arrow_table(value: object) -> bool:
    module = type(value).__module__
    return module.startswith("pyarrow") and type(value).__name__ == "Table"


def encode_value(value: object) -> bytes:
    """The stored form of bytes (bytearray, memoryview), a numpy array or a pyarrow Table.

    Raises TypeError for any other value, and for numpy arrays of Python objects (they would need pickle).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _BYTES + bytes(value)
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(
                f"numpy arrays of dtype {value.dtype} hold Python objects and would need pickle; "
                "convert them to a numeric or string dtype first"
            )
        buf = io.BytesIO()
        buf.write(_NUMPY)
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    if _is_arrow_table(value):
        import pyarrow as pa

        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, value.schema) as writer:
            writer.write_table(value)
        return _ARROW + sink.getvalue().to_pybytes()
    raise TypeError(
        f"entries are bytes, numpy arrays or pyarrow Tables, got {type(value).__name__}; "
        "serialize other values first (never pickle)"
    )


def decode_value(blob: bytes) -> bytes | np.ndarray | pa.Table:
    """The value encode_value stored. Raises CorruptEntryError for a blob without a known tag or that does not parse."""
    tag, body = bytes(blob[:TAG_BYTES]), memoryview(blob)[TAG_BYTES:]
    try:
        if tag == _BYTES:
            return bytes(body)
        if tag == _NUMPY:
            return np.load(io.BytesIO(body), allow_pickle=False)
        if tag == _ARROW:
            import pyarrow as pa

            return pa.ipc.open_stream(pa.py_buffer(body)).read_all()
    except (ValueError, OSError, EOFError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise CorruptEntryError(f"entry of kind {tag!r} does not parse: {exc}") from None
    raise CorruptEntryError(
        f"entry has no known kind tag ({tag!r}); it was not written by CacheManager.put"
    )


__all__ = ["TAG_BYTES", "decode_value", "encode_value"]
