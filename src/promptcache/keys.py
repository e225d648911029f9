"""Content addresses of cached token ranges: a blake2b hash chain over (fingerprint, prefix, tokens).

Owns how token ids become bytes and keys (PromptKeys: a request's prompt hashed once); knows
nothing of stores or engines.
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


def block_keys(
    fingerprint: str,
    tokens_le: bytes,
    block_size: int,
    n_blocks: int,
    *,
    known: Sequence[bytes] = (),
) -> list[bytes]:
    """Prefix hashes at every block boundary: result[i] keys tokens[0 : i*block_size]; result[0] is the root.

    known: keys this function returned for other tokens that share their first len(known) - 1
    blocks with these (PromptKeys passes them); hashing resumes after them.
    """
    view = memoryview(tokens_le)
    step = 4 * block_size
    keys = list(known[: n_blocks + 1]) or [root_key(fingerprint)]
    for i in range(len(keys) - 1, n_blocks):
        keys.append(chain(keys[-1], view[i * step : (i + 1) * step]))
    return keys


def shared_blocks(a: bytes, b: bytes, block_size: int, limit: int) -> int:
    """How many full blocks (at most `limit`) token bytes `a` and `b` share from their start."""
    step = 4 * block_size
    n = min(limit, len(a) // step, len(b) // step)
    if a[: n * step] == b[: n * step]:
        return n
    diff = np.frombuffer(a, np.uint8, n * step) != np.frombuffer(b, np.uint8, n * step)
    return int(np.argmax(diff)) // step


class PromptKeys:
    """The block keys of the last prompt hashed, so that a request's lookup, insert and adopt hash
    its prompt once between them: a later prompt of the same fingerprint reuses the keys of the full
    blocks it shares with it. Safe to share between threads (one tuple, replaced whole)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._last: tuple[str, bytes, list[bytes]] = ("", b"", [])

    def block_keys(self, fingerprint: str, tokens_le: bytes, n_blocks: int) -> list[bytes]:
        """block_keys(fingerprint, tokens_le, block_size, n_blocks), hashing only the blocks
        the last prompt did not share."""
        last_fp, last_tokens, last = self._last
        known: list[bytes] = []
        if last_fp == fingerprint and last:
            limit = min(n_blocks, len(last) - 1)
            have = shared_blocks(last_tokens, tokens_le, self.block_size, limit)
            known = last[: have + 1] if have else []
        keys = block_keys(fingerprint, tokens_le, self.block_size, n_blocks, known=known)
        if len(keys) >= len(last) or last_fp != fingerprint:
            self._last = (fingerprint, tokens_le, keys)
        return keys
