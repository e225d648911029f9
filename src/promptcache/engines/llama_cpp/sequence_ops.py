"""SequenceOps: what callers do with an engine's sequences between rounds: fork, free, pin, clear,
settle after a reply, read and load states (sessions), and hand states to the prefix cache.

Owns these operations, as the Engine's base class; rounds, the context's lifetime and exactness are the
Engine's (engine.py). Never plans reuse (plan.py) nor packs rows (rounds.py).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from promptcache.engines.llama_cpp.context import Context
from promptcache.engines.llama_cpp.plan import Query, ReuseRules
from promptcache.engines.llama_cpp.sequences import Held, SequenceTable
from promptcache.errors import PromptCacheError
from promptcache.holdings import HoldingsListener

if TYPE_CHECKING:
    from promptcache.cache import PromptCache
    from promptcache.codec import StateCodec
    from promptcache.engines.llama_cpp.cached_states import CachedStates
    from promptcache.engines.llama_cpp.engine import EngineStats


class SequenceOps:
    """The sequence operations of an Engine (which provides the attributes declared here)."""

    n_seq: int
    cache: PromptCache | None
    stats: EngineStats
    _lock: threading.RLock
    _table: SequenceTable
    _cached: CachedStates | None

    codec: StateCodec
    may_reuse: bool
    rules: ReuseRules

    def _ctx(self) -> Context:  # pragma: no cover - the Engine's
        raise NotImplementedError

    def _free_id(
        self, protected: set[int], spare: set[int] | frozenset[int] = frozenset()
    ) -> int | None:
        raise NotImplementedError  # pragma: no cover - the Engine's

    def _drop(self, seq: int) -> None:  # pragma: no cover - the Engine's
        raise NotImplementedError

    def reserve(self, n_ctx: int | None = None) -> Context:  # pragma: no cover - the Engine's
        raise NotImplementedError

    # ------------------------------------------------------------ sequences

    @property
    def sequences(self) -> dict[int, tuple[int, ...]]:
        """Live sequence ids and the tokens whose KV each holds."""
        with self._lock:
            return self._table.snapshot()

    def held(self, seq: int) -> Held:
        """The live sequence `seq` (tokens, reusable part). Raises ValueError when it is gone."""
        return self._table.get(seq)

    def fork(self, seq: int, n_tokens: int | None = None) -> int:
        """A new sequence holding the first n_tokens (default all) of `seq`'s cells."""
        with self._lock:
            src = self._table.get(seq)
            n = len(src.tokens) if n_tokens is None else int(n_tokens)
            if not 0 <= n <= len(src.tokens):
                raise ValueError(f"n_tokens must be in [0, {len(src.tokens)}]")
            dst = self._free_id(protected={seq})
            if dst is None:
                raise PromptCacheError(f"all {self.n_seq} sequences are pinned: unpin one")
            self._ctx().copy(seq, dst, n)
            held = self._table.add(dst, src.tokens[:n], min(n, src.n_reusable))
            held.prompt_end = src.prompt_end if src.prompt_end <= n else -1
            self.stats.forks += 1
            return dst

    def free(self, seq: int) -> None:
        """Drop a sequence; cells it shared with others stay theirs."""
        with self._lock:
            self._table.get(seq)
            self._drop(seq)

    def pin(self, seq: int, pinned: bool = True) -> None:
        """A pinned sequence is never evicted nor extended in place: queries fork from it."""
        with self._lock:
            self._table.get(seq).pinned = pinned

    def clear(self, *, data: bool = False) -> None:
        """Drop every live sequence (the context stays; with data, its KV buffers are zeroed)."""
        with self._lock:
            if self._context is not None:
                self._context.clear(data=data)
            self._table.clear()

    def free_idle(self, busy: set[int]) -> int:
        """Drop every sequence that is neither pinned nor in `busy` (the ones running requests
        hold); returns how many were dropped."""
        with self._lock:
            idle = [h.seq_id for h in self._table if h.seq_id not in busy and not h.pinned]
            for seq in idle:
                self._drop(seq)
            return len(idle)

    def listen(self, listener: HoldingsListener, granularity: int = 1) -> None:
        """Tell `listener` which prefixes the live sequences can serve (each one's reusable part, cut
        to a multiple of `granularity` tokens), now and whenever that changes; see holdings.py."""
        with self._lock:
            self._table.listen(listener, granularity)

    def settle(self, seq: int) -> Held:
        """Drop the cells of `seq` past its reusable part (decoded tokens, in exact mode), so that
        what it holds may be cached and reused; returns it."""
        with self._lock:
            held = self._table.get(seq)
            if held.n_reusable < len(held.tokens):
                self._ctx().drop(seq, held.n_reusable)
                held.tokens = held.tokens[: held.n_reusable]
                if held.prompt_end != len(held.tokens):
                    held.prompt_end = -1
                self._table.report(held)
            return held

    def finish_query(
        self, seq: int, prompt: list[int], target: list[int] | None, keep_reply: bool
    ) -> Query | None:
        """After a reply to `prompt` on `seq`: the query that re-reads what the next turn reuses
        (plan.ReuseRules.finish: a chat's next-turn prefix `target`, or with keep_reply the prompt
        and reply, as batches), or None when nothing is re-read (settle() then drops the decoded
        cells in exact mode)."""
        with self._lock:
            held = self._table.get(seq)
            caching = self.cache is not None
            finish = self.rules.finish(prompt, held, target, keep_reply, caching=caching)
            if not finish.batches:
                return None
            return Query(finish.tokens, logits=False, insert=False, hint=seq, max_checkpoints=1)

    def state(self, seq: int) -> bytes:
        """The sequence's llama.cpp state (one-stream layout: what the cache stores)."""
        with self._lock:
            self._table.get(seq)
            return self._ctx().state_bytes(seq)

    def load(self, tokens: Sequence[int], state: bytes, n_reusable: int | None = None) -> int:
        """A sequence holding `tokens` from `state` (a session); returns its id. Raises
        PromptCacheError when llama.cpp refuses the state or every sequence is pinned, and
        ContextOverflowError when the tokens do not fit."""
        with self._lock:
            tokens = list(tokens)
            self.reserve(len(tokens) + 1)
            seq = self._free_id(protected=set())
            if seq is None:
                raise PromptCacheError(f"all {self.n_seq} sequences are pinned: unpin one")
            if not self._ctx().load_state(seq, state):
                raise PromptCacheError("llama.cpp refused the state")
            self._table.add(seq, tokens, n_reusable)
            return seq

    # ------------------------------------------------------------ caching

    def snapshot(self, seq: int) -> list[tuple[list[int], bytes]]:
        """What caching `seq` writes: its pending checkpoints, and its state when all of it is
        reusable (and, for a state that cannot be cut on the aligned schedule, only where it ends at
        a restore point); (tokens, state) pairs for store(), read now, stored later (off a round)."""
        with self._lock:
            held = self._table.get(seq)
            out, held.checkpoints = held.checkpoints, []
            if self.cache is None or not self.may_reuse or not held.tokens:
                return []
            rules = self.rules
            n = len(held.tokens)
            if held.n_reusable == n and (self.codec.splittable or rules.align(n) == n):
                if not (self._cached is not None and self._cached.contains(held.tokens)):
                    out.append((list(held.tokens), self._ctx().state_bytes(seq)))
            held.pending = 0
            return out

    def store(self, states: Sequence[tuple[list[int], bytes]]) -> int:
        """Insert states from snapshot() into the prefix cache (any thread); returns bytes written."""
        if self._cached is None:
            return 0
        written = 0
        for tokens, state in states:
            written += self._cached.insert(tokens, state)
            self.stats.inserts += 1
        return written

    def save(self, seq: int) -> int:
        """Insert a live sequence's state (and pending checkpoints) in the prefix cache now."""
        return self.store(self.snapshot(seq))

    def forget_cached(self) -> int:
        """Remove from the prefix cache the sequences this engine inserted; returns how many."""
        with self._lock:
            return self._cached.forget_inserted() if self._cached is not None else 0


__all__ = ["SequenceOps"]
