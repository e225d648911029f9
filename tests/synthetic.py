"""Synthetic KV states for the engine-agnostic core: row p depends on tokens[: p + 1], as a KV cell
does, so the state of a prefix is a prefix of the state. Shared by conftest.py (pytest) and
scenarios.py (which also runs outside pytest, from scripts/reliability.py)."""

from __future__ import annotations

from hashlib import blake2b

WIDTH = 8


def synthetic_state(tokens: list[int], width: int = WIDTH) -> bytes:
    """Row p depends on tokens[: p + 1], as a KV cell does: the state of a prefix is a prefix of the state."""
    rows, h = [], blake2b(digest_size=width)
    for t in tokens:
        h.update(t.to_bytes(4, "little"))
        rows.append(h.copy().digest())
    return b"".join(rows)
