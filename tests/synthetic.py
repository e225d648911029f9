"""Synthetic KV states (and caches of them) for the engine-agnostic core: row p depends on tokens[: p + 1], as a KV cell
does, so the state of a prefix is a prefix of the state. Shared by conftest.py (pytest) and
scenarios.py (which also runs outside pytest, from scripts/reliability.py)."""

from __future__ import annotations

from hashlib import blake2b
from pathlib import Path

from promptcache import FixedWidthCodec, PromptCache
from promptcache.store.disk import DiskStore

WIDTH = 8


def synthetic_state(tokens: list[int], width: int = WIDTH) -> bytes:
    """Row p depends on tokens[: p + 1], as a KV cell does: the state of a prefix is a prefix of the state."""
    rows, h = [], blake2b(digest_size=width)
    for t in tokens:
        h.update(t.to_bytes(4, "little"))
        rows.append(h.copy().digest())
    return b"".join(rows)


def long_seq(n: int, salt: int = 0) -> list[int]:
    """n reproducible token ids (a long prompt for the persisted-merge and whole-state tests)."""
    return [(i * 7 + salt) % 997 for i in range(n)]


def disk_cache(path: Path) -> PromptCache:
    """A PromptCache over a DiskStore at `path` with synthetic states (8-token blocks): each call is
    what another process opening the same directory sees."""
    return PromptCache(DiskStore(path), codec=FixedWidthCodec(WIDTH), block_size=8)
