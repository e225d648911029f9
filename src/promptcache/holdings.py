"""Holdings: how the places that hold KV state (an engine's live sequences, a prefix cache's index)
tell a listener which token prefixes they can serve, as they change.

Owns the listener protocol only; it imports nothing of promptcache, so the engine and the cache
report through it without knowing who listens (the server's KV-event publisher does).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol, runtime_checkable

# Token ids as a sequence of ints, or as the uint32 little-endian bytes the prefix index keeps.
TokenIds = Sequence[int] | bytes


@runtime_checkable
class HoldingsListener(Protocol):
    """Hears what one place holds. Called synchronously by the place that stores and evicts, under
    its lock and on its thread (an engine round, a cache insert): an implementation must only
    record or queue the change and return at once, and must never call back into the place."""

    def holds(self, holder: Hashable, tokens: TokenIds) -> None:
        """`holder` (a sequence, a cached entry) now covers exactly `tokens` from the start of a
        prompt, replacing what it covered before; empty tokens: it covers nothing (released)."""

    def cleared(self) -> None:
        """Every holder of this place covers nothing now (the place was emptied at once)."""


__all__ = ["HoldingsListener", "TokenIds"]
