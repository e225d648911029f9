"""Content addresses of cached token ranges: a blake2b hash chain over (fingerprint, prefix, tokens).

Owns how token ids become bytes and keys; knows nothing of stores or engines.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b

import numpy as np

KEY_BYTES = 16
_DOMAIN = b"promptcache/chain/v1\x00"


def token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32 bytes: the form the index and the hash chain read.

    Raises TypeError for anything that is not a sequence of non-negative ints below 2**32.
    """
    if isinstance(tokens, (str, bytes, bytearray)):
        raise TypeError("tokens must be a sequence of int token ids, not text; tokenize first")
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError) as exc:  # ragged or non-numeric input
        raise TypeError(f"tokens must be a sequence of int token ids: {exc}") from None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError("tokens must be a flat sequence of int token ids")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 2**32):
        raise ValueError("token ids must be in [0, 2**32)")
    return arr.astype("<u4", copy=False).tobytes()


def root_key(fingerprint: str) -> bytes:
    """The chain's starting hash for one model fingerprint: no two fingerprints share a key."""
    if not isinstance(fingerprint, str) or not fingerprint:
        raise TypeError("fingerprint must be a non-empty str (see LLM.fingerprint)")
    return blake2b(_DOMAIN + fingerprint.encode(), digest_size=KEY_BYTES).digest()


def chain(prev: bytes, tokens_le: bytes | memoryview) -> bytes:
    """The key of a token range that follows the range keyed `prev`."""
    h = blake2b(prev, digest_size=KEY_BYTES)
    h.update(tokens_le)
    return h.digest()


def block_keys(fingerprint: str, tokens_le: bytes, block_size: int, n_blocks: int) -> list[bytes]:
    """Prefix hashes at every block boundary: result[i] keys tokens[0 : i*block_size]; result[0] is the root."""
    view = memoryview(tokens_le)
    step = 4 * block_size
    keys = [root_key(fingerprint)]
    for i in range(n_blocks):
        keys.append(chain(keys[-1], view[i * step : (i + 1) * step]))
    return keys
