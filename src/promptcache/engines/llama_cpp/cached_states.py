"""CachedStates: an engine's reads and writes of states in its PromptCache, under one fingerprint and codec.

Owns finding the longest cached prefix a query may restore (cut to a restore point, trimmed to the
prompt), inserting states (checkpoints, shared stores already holding the segments) and falling back
to whole states when a layout does not cut; never calls llama.cpp (the engine loads and reads states)
and never decides how much may be reused (plan.py does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from promptcache.cache import Hit, PromptCache
from promptcache.codec import OpaqueCodec, StateCodec
from promptcache.errors import CodecError, PromptCacheError

log = logging.getLogger(__name__)


class CachedStates:
    """`cache` seen by one engine: `fingerprint()` names the model and reuse mode, `codec()` cuts
    states (both may change once: a layout that does not cut switches the engine to whole states,
    through `use_whole_states`)."""

    def __init__(
        self,
        cache: PromptCache,
        fingerprint: Callable[[], str],
        codec: Callable[[], StateCodec],
        use_whole_states: Callable[[], None],
    ) -> None:
        self.cache = cache
        self._fingerprint = fingerprint
        self._codec = codec
        self._use_whole_states = use_whole_states
        self.inserted: set[tuple[int, ...]] = set()  # what this engine put in the cache

    def lookup(self, tokens: Sequence[int], limit: int, have: int, align: int) -> Hit | None:
        """The longest cached prefix of `tokens` longer than `have` and at most `limit` tokens,
        restorable at a multiple of `align` (0: any token); a logged None when the cache fails. A
        hit may hold a longer state (Hit.trimmed): the caller drops the cells past tokens_reused."""
        codec = self._codec()
        try:
            hit = self.cache.lookup(
                tokens,
                self._fingerprint(),
                max_tokens=limit,
                min_tokens=have,
                codec=codec,
                align=align,
                trim=True,
            )
        except PromptCacheError as exc:
            log.warning("cache lookup failed (%s); evaluating instead", exc)
            return None
        if hit is None or hit.tokens_reused <= have:
            return None
        if align and hit.tokens_reused % align:
            return self.cut(hit, hit.tokens_reused - hit.tokens_reused % align, have)
        return hit

    def cut(self, hit: Hit, n: int, have: int) -> Hit | None:
        """`hit` cut to its first n tokens, or None when that is no more than the `have` tokens the
        live sequence holds or the codec cannot cut states (whole states are cached only at restore
        points)."""
        codec = self._codec()
        if n == hit.tokens_reused and not hit.trimmed:
            return hit
        if n <= have or not codec.splittable:
            return None
        return hit.cut(n, codec)

    def contains(self, tokens: Sequence[int]) -> bool:
        try:
            return self.cache.contains(tokens, self._fingerprint())
        except PromptCacheError as exc:
            log.warning("cache check failed: %s", exc)
            return False

    def insert(self, tokens: list[int], state: bytes | Callable[[], bytes]) -> int:
        """Insert the state of `tokens` unless it is cached (`state` may be a function that reads it:
        it is called only when needed); returns the bytes written. A shared store may hold every
        segment already (another process wrote them): then they are indexed without reading the
        state. A layout the codec cannot cut switches the engine to whole states; a failing cache is
        logged, never raised."""
        fingerprint, codec = self._fingerprint(), self._codec()
        try:
            if self.cache.contains(tokens, fingerprint) or self.cache.adopt(
                tokens, fingerprint, codec=codec
            ):
                self.inserted.add(tuple(tokens))
                return 0
            written = self.cache.insert(
                tokens, state() if callable(state) else state, fingerprint, codec=codec
            )
        except CodecError as exc:
            if isinstance(codec, OpaqueCodec):
                log.warning("could not cache a %d-token state: %s", len(tokens), exc)
                return 0
            log.warning("state layout not understood (%s); caching whole states from now on", exc)
            self._use_whole_states()
            return 0
        except PromptCacheError as exc:
            log.warning("could not cache a %d-token state: %s", len(tokens), exc)
            return 0
        self.inserted.add(tuple(tokens))
        return written

    def forget_inserted(self) -> int:
        """Remove from the cache what this engine inserted; returns how many were there. On a store
        other processes share, their segments are left to the store; on a private one the segments
        no other entry uses are deleted."""
        removed = 0
        for tokens in self.inserted:
            try:
                removed += bool(self.cache.remove(list(tokens), self._fingerprint()))
            except PromptCacheError as exc:
                log.warning("could not remove a cached state: %s", exc)
        self.inserted.clear()
        return removed


__all__ = ["CachedStates"]
