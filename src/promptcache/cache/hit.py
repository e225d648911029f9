"""Hit: what a lookup gives back, a state for exactly the prompt's first tokens_reused tokens.

Owns the result's fields and cutting a hit shorter; never reads a store or an index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from promptcache.codec import StateCodec
from promptcache.errors import CodecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """A cached prefix: `state` covers exactly the first `tokens_reused` tokens of the prompt, or,
    for a lookup with trim=True, `state_tokens` tokens of which the first tokens_reused are the
    prompt's (the caller drops the cells past them after loading). `state` may be a read-only
    view of a mapped file (disk): load it, do not hold on to it past the next lookup."""

    tokens_reused: int
    state: bytes | memoryview
    source: str
    fingerprint: str
    state_tokens: int = 0  # 0: tokens_reused

    @property
    def trimmed(self) -> bool:
        """Whether the state covers more than tokens_reused tokens (see trim in lookup)."""
        return self.state_tokens > self.tokens_reused

    def cut(self, n: int, codec: StateCodec) -> Hit | None:
        """This hit cut to its first n tokens with `codec` (which must be splittable), or None,
        logged, when its state does not cut."""
        try:
            state = codec.join([codec.split(self.state, [0, n])[0]])
        except CodecError as exc:
            log.warning("could not cut a cached state to %d tokens: %s", n, exc)
            return None
        return Hit(n, state, self.source, self.fingerprint)


__all__ = ["Hit"]
