"""Engine: one model, one llama.cpp context of many sequences, and the rounds that evaluate queries in it.

Owns the model's context, which sequence serves which query (live reuse, forks, restores from the
PromptCache), the round schedule and what goes into the cache; every path (LLM, CachedCausalLM, the
server) runs through it. Never samples (generation.py and the callers do), never decides reuse
rules (plan.py) and never lays out state bytes (codec/ does).

Exactness (README, "Exactness"; measured in DESIGN.md, "Many sequences in one batch"): a query's
answer is the uncached, lone evaluation of its tokens: the prefill part in batches of at least the
probed exact_batch b (or the aligned schedule's chunks), each further token decoded alone. In exact
mode each sequence has its own KV stream, so its cells sit where a lone prefill puts them, and a
round packs rows of several sequences into one llama_decode only in shapes the probe found to keep
every sequence's logits (rounds.pack). Fast mode (exact=False) shares one KV between sequences (a
fork copies nothing), reuses decoded tokens' KV and packs rows freely: cheaper, and the logits drift.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from promptcache.codec import StateCodec
from promptcache.config import build_cache
from promptcache.engines.llama_cpp.cached_states import CachedStates
from promptcache.engines.llama_cpp.context import (
    Closing,
    Context,
    check_room,
)
from promptcache.engines.llama_cpp.exactness import Exactness, Settings, check_settings
from promptcache.engines.llama_cpp.model import Model
from promptcache.engines.llama_cpp.plan import Query, ReuseRules, check_token_ids
from promptcache.engines.llama_cpp.planner import plan_round
from promptcache.engines.llama_cpp.runner import KEEP_MIN_TOKENS, run_round
from promptcache.engines.llama_cpp.sequence_ops import SequenceOps
from promptcache.engines.llama_cpp.sequences import SequenceTable
from promptcache.errors import ContextOverflowError, PromptCacheError

if TYPE_CHECKING:
    from promptcache.cache import PromptCache

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters since the engine was made: timing-free facts about what was computed and reused."""

    queries: int = 0  # queries answered (a list asked twice in one round counts once)
    tokens_evaluated: int = 0  # rows decoded
    rows_reread: int = 0  # live tokens evaluated again (at least exact_batch after a restore)
    batches: int = 0  # llama_decode calls
    tokens_reused: int = 0  # query tokens found live in some sequence (own or forked)
    forks: int = 0
    restores: int = 0  # sequences fed from the prefix cache
    tokens_restored: int = 0
    evictions: int = 0  # live sequences dropped to make room
    inserts: int = 0  # states handed to the prefix cache
    peak_sequences: int = 0  # most sequences one llama_decode call evaluated together
    contexts_created: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Advance:
    """What one query got from a round: the logits after its last token (None while it waits or its
    tokens are still being evaluated); the sequence holding it (None while it waits); how many of its
    tokens the round started from and where they came from (live, memory, disk, redis, none); with
    Query.rows, (first position, logits of each evaluated position) per batch of the round;
    restore_ms: the cache lookup and state load that fed the sequence this round (0 if none)."""

    logits: np.ndarray | None
    seq: int | None
    reused: int = 0
    source: str = "none"
    rows: list[tuple[int, np.ndarray]] = field(default_factory=list)
    done: bool = False
    restore_ms: float = 0.0


class Engine(SequenceOps, Closing):
    """Next-token logits for many token lists, in one llama.cpp context of `n_seq` sequences.

    model: a Model, a GGUF path, or None for the default model (a Model is shared, not reloaded).
    n_ctx: tokens one sequence may hold (a lone-sequence engine grows its context for a query that
    needs more, up to the model's training context). cache: a PromptCache, "ram", "disk", "tiered"
    (the tiers CacheConfig reads from PROMPTCACHE_* variables and $PROMPTCACHE_CONFIG), "none" or
    None (promptcache.config.build_cache, the one factory). exact: see the module docstring. exact_batch: skip the probe and trust this batch size.
    exact_chunk: the aligned schedule with this C instead of the probe's choice (exact mode).
    whole_states: cache states uncut. min_restore: restore from the cache only when it supplies at
    least this many tokens more than a live sequence (particles' one-token steps skip the lookup).
    """

    def __init__(
        self,
        model: Model | str | os.PathLike[str] | None = None,
        *,
        cache: PromptCache | str | None = "ram",
        n_seq: int = 1,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
        exact: bool = True,
        exact_batch: int | None = None,
        exact_chunk: int | None = None,
        flash_attn: bool = False,
        whole_states: bool = False,
        min_restore: int = 1,
        verbose: bool = False,
    ) -> None:
        threads = n_threads or max(1, min(os.cpu_count() or 1, 8))
        self.settings = Settings(
            n_seq, n_ctx, n_batch, threads, exact, exact_batch, exact_chunk, flash_attn,
            whole_states, min_restore, verbose,
        )  # fmt: skip
        check_settings(self.settings)
        self._lock = threading.RLock()
        self.model = model if isinstance(model, Model) else Model(model, verbose=verbose)
        self.exactness = Exactness(self.model, self.settings)
        self.cache: PromptCache | None = None
        self._cached: CachedStates | None = None
        self.use_cache(cache)
        self.exact = exact
        self.n_seq = n_seq
        self.n_vocab = self.model.n_vocab
        self._n_ctx_seq = min(n_ctx, self.model.n_ctx_train)
        self._context: Context | None = None
        self._table = SequenceTable(n_seq)
        self.stats = EngineStats()

    def use_cache(self, cache: PromptCache | str | None) -> None:
        """Read and write states through `cache` from now on (a PromptCache, a name or None)."""
        with self._lock:
            self.cache = build_cache(cache)
            self._cached = (
                CachedStates(
                    self.cache,
                    lambda: self.fingerprint,
                    lambda: self.codec,
                    self.exactness.use_whole_states,
                )
                if self.cache is not None
                else None
            )

    def sibling(self, **changes: Any) -> Engine:
        """Another engine over the same model and cache, with these settings changed (n_seq, n_ctx,
        exact, min_restore, ...): the weights are not loaded again."""
        whole = self.settings.whole_states or not self.codec.splittable
        settings = replace(self.settings, whole_states=whole, **changes)
        return Engine(self.model, cache=self.cache, **asdict(settings))

    # ------------------------------------------------------------ exactness (exactness.py)

    @property
    def codec(self) -> StateCodec:
        return self.exactness.codec

    @property
    def exact_batch(self) -> int:
        return self.exactness.exact_batch

    @property
    def exact_chunk(self) -> int:
        return self.exactness.exact_chunk

    @property
    def may_reuse(self) -> bool:
        return self.exactness.may_reuse

    @property
    def decode_group(self) -> int:
        return self.exactness.decode_group

    @property
    def group_rows(self) -> int:
        return self.exactness.group_rows

    @property
    def exact_strategy(self) -> str:
        return self.exactness.exact_strategy

    @property
    def fingerprint(self) -> str:
        return self.exactness.fingerprint

    @property
    def rules(self) -> ReuseRules:
        """The reuse rules in force (README, "Exactness"), for the context's real batch size."""
        n_batch = self._context.n_batch if self._context is not None else self.settings.n_batch
        return self.exactness.rules(n_batch)

    @property
    def kv_bytes(self) -> int:
        """Bytes the context's KV cache takes (n_seq x n_ctx cells, K and V in f16, from the model's
        shape; an upper bound for sliding-window layers): what --parallel costs in memory."""
        n_ctx = -(-self._n_ctx_seq // 256) * 256  # llama.cpp pads a sequence's cells to 256
        return self.n_seq * n_ctx * self.model.kv_bytes_per_token

    # ------------------------------------------------------------ context

    @property
    def context(self) -> Context | None:
        """The live llama.cpp context (None before the first query or after close)."""
        return self._context

    @property
    def n_ctx(self) -> int:
        """Tokens one sequence may hold now (the context's, once it exists)."""
        return self._context.n_ctx_seq if self._context is not None else self._n_ctx_seq

    def reserve(self, n_ctx: int | None = None) -> Context:
        """The context, created now (for sequences of at least n_ctx tokens) instead of on the first
        query. A lone-sequence engine re-creates a smaller context larger (its sequence is lost: the
        prefix cache keeps what was cached); raises ContextOverflowError past the model's context or,
        with several sequences, past the context's."""
        with self._lock:
            need = n_ctx or self._n_ctx_seq
            check_room(need, self.model.n_ctx_train)
            ctx = self._context
            if ctx is not None and ctx.n_ctx_seq >= need:
                return ctx
            held = ctx.n_ctx_seq if ctx is not None else -(-self._n_ctx_seq // 256) * 256
            if self.n_seq > 1 and need > held:
                raise ContextOverflowError(
                    f"a query of {need} tokens does not fit a context of {held} tokens per "
                    "sequence: raise n_ctx"
                )
            size = self._n_ctx_seq
            while size < need:
                size *= 2
            self._n_ctx_seq = min(size, self.model.n_ctx_train)
            self._free_context()
            self.exactness.probe()  # the probe's own context comes and goes before this one exists
            self._context = self.settings.context(
                self.model, n_seq=self.n_seq, n_ctx_seq=self._n_ctx_seq, split_streams=self.exact
            )
            self.stats.contexts_created += 1
            return self._context

    def _free_context(self) -> None:
        if self._context is not None:
            self._context.close()
        self._context = None
        self._table.clear()

    def close(self) -> None:
        """Free the context (idempotent); the next query makes a new, empty one."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            with lock:
                self._free_context()

    # ------------------------------------------------------------ evaluation

    def check(self, tokens: Sequence[int], what: str = "a query") -> list[int]:
        return check_token_ids(tokens, self.n_vocab, what)

    def prefill(
        self, tokens: Sequence[int], *, pin: bool = False, insert: bool = True
    ) -> np.ndarray:
        """Logits after `tokens`, left live (pinned with pin=True) and, with insert, in the prefix cache."""
        with self._lock:
            query = Query(self.check(tokens), insert=insert and self.cache is not None)
            (logits,) = self.evaluate([query])
            held = next((h for h in self._table if h.tokens == query.tokens), None)
            if held is not None:
                held.pinned = held.pinned or pin
            return logits

    def evaluate(self, queries: Sequence[Query | Sequence[int]]) -> list[np.ndarray]:
        """Next-token logits (float32, n_vocab) after each query, computed together in as many
        rounds as it takes. Token lists are prefill queries. Raises ValueError/TypeError for
        malformed queries and ContextOverflowError when one cannot fit the context."""
        asked = [self._as_query(q) for q in queries]
        found: dict[Any, np.ndarray] = {}
        hints: dict[Any, int] = {}
        with self._lock:
            todo = list(dict.fromkeys(q.key for q in asked))
            by_key = {q.key: q for q in asked}
            while todo:
                round_queries = [_with_hint(by_key[k], hints.get(k)) for k in todo]
                for key, adv in zip(todo, self.advance(round_queries), strict=True):
                    if adv.seq is not None:
                        hints[key] = adv.seq
                    if adv.logits is not None:
                        found[key] = adv.logits
                todo = [k for k in todo if k not in found]
        return [found[q.key] for q in asked]

    def _as_query(self, q: Query | Sequence[int]) -> Query:
        if isinstance(q, Query):
            self.check(q.tokens)
            return q
        return Query(self.check(q))

    def advance(
        self, queries: Sequence[Query | Sequence[int]], *, budget: int | None = None
    ) -> list[Advance]:
        """One round of evaluate for a scheduler: every query moves forward, some not to its end.

        A query gets its logits unless it waits: beyond the sequences this context holds (one query
        at a time where nothing may be shared), for another query of the round that evaluates a
        prefix they share (it forks that next round), or, with `budget`, while more than `budget`
        tokens of its prefill remain (a long prompt is evaluated `budget` tokens per round so the
        others' steps keep coming; exactness holds for any split). Asking the same query again
        continues where it stopped. Raises PromptCacheError when no query can move at all (every
        sequence pinned)."""
        if budget is not None and (not isinstance(budget, int) or budget < 2 * self.exact_batch):
            raise ValueError(f"budget must be an int >= {2 * self.exact_batch}")
        asked = [self._as_query(q) for q in queries]
        first: dict[Any, int] = {}
        unique: list[Query] = []
        for q in asked:
            if q.key not in first:
                first[q.key] = len(unique)
                unique.append(q)
        with self._lock:
            need = max(len(q.tokens) for q in unique) if unique else 0
            self.reserve(need)
            steps = plan_round(self, unique, budget)
            if unique and not steps:
                raise PromptCacheError(
                    f"all {self.n_seq} sequences are pinned: no query can be evaluated; unpin one"
                )
            found = run_round(self, steps)
            results: list[Advance] = [Advance(None, None)] * len(unique)
            for step in steps:
                results[step.index] = Advance(
                    found.get(step.index),
                    step.seq,
                    step.reused,
                    step.source,
                    step.rows,  # type: ignore[arg-type]
                    step.done,
                    step.restore_ms,
                )
            self.stats.queries += sum(1 for s in steps if s.done)
        return [results[first[q.key]] for q in asked]

    # ------------------------------------------------------------ internals

    def _ctx(self) -> Context:
        if self._context is None:
            raise PromptCacheError("no context: the engine is closed")
        return self._context

    def _free_id(
        self, protected: set[int], spare: set[int] | frozenset[int] = frozenset()
    ) -> int | None:
        """A free sequence id, evicting the least recently used sequence outside `protected` (and
        outside `spare` while another victim exists); None when every sequence is kept or pinned."""
        free = self._table.free_id()
        if free is not None:
            return free
        victim = self._table.victim(protected | spare) or self._table.victim(protected)
        if victim is None:
            return None
        self._drop(victim.seq_id)
        self.stats.evictions += 1
        return victim.seq_id

    def _evict(self, protected: set[int]) -> bool:
        victim = self._table.victim(protected)
        if victim is None:
            return False
        self._drop(victim.seq_id)
        self.stats.evictions += 1
        return True

    def _drop(self, seq: int) -> None:
        if self._context is not None:
            self._context.drop(seq)
        self._table.remove(seq)


def _with_hint(query: Query, hint: int | None) -> Query:
    return query if hint is None or query.hint == hint else replace(query, hint=hint)


__all__ = ["Advance", "Engine", "EngineStats", "KEEP_MIN_TOKENS"]
