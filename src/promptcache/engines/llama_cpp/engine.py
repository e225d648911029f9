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
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

import numpy as np

from promptcache.codec import OpaqueCodec, StateCodec
from promptcache.config import build_cache
from promptcache.engines.llama_cpp import probe
from promptcache.engines.llama_cpp.cached_states import CachedStates
from promptcache.engines.llama_cpp.context import (
    Closing,
    Context,
    KVFullError,
    bindings,
    check_room,
)
from promptcache.engines.llama_cpp.model import Model
from promptcache.engines.llama_cpp.plan import Query, ReuseRules, check_token_ids
from promptcache.engines.llama_cpp.planner import plan_round
from promptcache.engines.llama_cpp.rounds import Step, Unit, pack, waves
from promptcache.engines.llama_cpp.sequences import Held, SequenceTable
from promptcache.errors import ContextOverflowError, PromptCacheError
from promptcache.holdings import HoldingsListener

if TYPE_CHECKING:
    from promptcache.cache import PromptCache

log = logging.getLogger(__name__)

# A query that evaluates at least this many new tokens at once (a prompt, not a particle's step) goes
# into the prefix cache unless it says otherwise (Query.insert), so another process restores it.
KEEP_MIN_TOKENS = 32
_MAX_SEQ = 255  # llama.cpp's LLAMA_MAX_SEQ is 256


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
    Query.rows, (first position, logits of each evaluated position) per batch of the round."""

    logits: np.ndarray | None
    seq: int | None
    reused: int = 0
    source: str = "none"
    rows: list[tuple[int, np.ndarray]] = field(default_factory=list)
    done: bool = False


@dataclass(frozen=True)
class Settings:
    """How an engine runs (LLM's constructor arguments): see Engine."""

    n_seq: int = 1
    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int = 0
    exact: bool = True
    exact_batch: int | None = None
    exact_chunk: int | None = None
    flash_attn: bool = False
    whole_states: bool = False
    min_restore: int = 1
    verbose: bool = False


def _check(s: Settings) -> None:
    """Settings checked before anything is loaded. Raises ValueError."""
    if not isinstance(s.n_seq, int) or not 1 <= s.n_seq <= _MAX_SEQ:
        raise ValueError(f"n_seq must be an int in [1, {_MAX_SEQ}]")
    if not isinstance(s.n_ctx, int) or s.n_ctx < 16:
        raise ValueError("n_ctx must be an int >= 16")
    if not isinstance(s.n_batch, int) or s.n_batch < 64:
        raise ValueError("n_batch must be an int >= 64 (smaller batches are not exact on CPU)")
    if s.exact_batch is not None and (
        not isinstance(s.exact_batch, int) or not 1 <= s.exact_batch <= 32
    ):
        raise ValueError("exact_batch must be an int in [1, 32] or None (probe it)")
    if s.exact_chunk is not None and (
        not isinstance(s.exact_chunk, int) or not 1 <= s.exact_chunk <= s.n_batch or not s.exact
    ):
        raise ValueError(
            "exact_chunk must be an int in [1, n_batch] (exact mode) or None (measure it)"
        )


class Engine(Closing):
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
        _check(self.settings)
        self._lock = threading.RLock()
        self.model = model if isinstance(model, Model) else Model(model, verbose=verbose)
        self.cache: PromptCache | None = None
        self._cached: CachedStates | None = None
        self.use_cache(cache)
        self.exact = exact
        self.n_seq = n_seq
        self.n_vocab = self.model.n_vocab
        self.codec: StateCodec = OpaqueCodec() if whole_states else _splitting_codec()
        self._probed: probe.ProbeResult | None = (
            probe.ProbeResult(exact_batch, True, 0, 1, 0) if exact_batch is not None else None
        )
        self._fingerprint: str | None = None
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
                    self.cache, lambda: self.fingerprint, lambda: self.codec, self._to_whole
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

    # ------------------------------------------------------------ identity and rules

    def _probe(self) -> probe.ProbeResult:
        """The probe result for this model, settings and machine (measured once, kept on disk)."""
        if self._probed is None:
            s = self.settings
            key = probe.probe_key(self.model.path, flash_attn=s.flash_attn, n_threads=s.n_threads)
            self._probed = probe.recorded(key, self._measure, self.model.name)
            b, layout_ok, chunk = self._probed[:3]
            if b == 0 and self.exact:
                log.info(
                    "%s: no batch size reproduces one batch's floats on this machine; exact mode "
                    "uses the aligned schedule (chunks of %d tokens)",
                    self.model.name,
                    s.exact_chunk or chunk,
                )
            if not layout_ok and self.codec.splittable:
                log.info("%s: state layout cannot be cut; caching whole states", self.model.name)
                self._use_codec(OpaqueCodec())
        return self._probed

    def _measure(self) -> probe.ProbeResult:
        s = self.settings
        context = Context(
            self.model,
            n_seq=probe.PROBE_SEQUENCES,
            n_ctx_seq=probe.PROBE_CELLS,
            n_batch=s.n_batch,
            n_threads=s.n_threads,
            flash_attn=s.flash_attn,
            split_streams=True,
        )
        try:
            result = probe.measure(
                context, self.model.tokenize(probe.PROBE_TEXT), _splitting_codec()
            )
        finally:
            context.close()
        log.debug("probe of %s: %s", self.model.path, result)
        return result

    def _use_codec(self, codec: StateCodec) -> None:
        self.codec = codec
        self._fingerprint = None  # the fingerprint names the codec

    def _to_whole(self) -> None:
        self._use_codec(OpaqueCodec())

    @property
    def exact_batch(self) -> int:
        """The smallest batch whose floats match a large batch's (probed once per model, settings and
        machine; kept in the user cache directory). 2 where the probe found none; 1 in fast mode,
        which promises no match (a step reads its new token only)."""
        if not self.exact:
            return 1
        return self._probe().exact_batch or 2

    @property
    def exact_chunk(self) -> int:
        """The aligned schedule's chunk C (0 where exact mode reuses at any token, or exact=False)."""
        if not self.exact:
            return 0
        result = self._probe()
        if self.settings.exact_chunk:
            return self.settings.exact_chunk
        return min(result.chunk, self.settings.n_batch) if not result.exact_batch else 0

    @property
    def may_reuse(self) -> bool:
        """Whether restoring a prefix and evaluating the rest is allowed: in fast mode always; in
        exact mode with an exact batch size or on the aligned schedule."""
        return self._probe().exact_batch > 0 or not self.exact or self.exact_chunk > 0

    @property
    def decode_group(self) -> int:
        """One-row steps of this many sequences share a llama_decode (probe.measure_decode_group)."""
        return self._probe().decode_group if self.exact else self.settings.n_batch

    @property
    def group_rows(self) -> int:
        """Sequences' batches of m rows share a llama_decode where this divides m (0: never)."""
        return self._probe().group_rows

    @property
    def rules(self) -> ReuseRules:
        """The reuse rules in force (README, "Exactness")."""
        n_batch = self._context.n_batch if self._context is not None else self.settings.n_batch
        return ReuseRules(
            exact_batch=self.exact_batch,
            exact=self.exact,
            may_reuse=self.may_reuse,
            splittable=self.codec.splittable,
            n_batch=n_batch,
            chunk=min(self.exact_chunk, n_batch),
        )

    @property
    def exact_strategy(self) -> str:
        """How reuse stays exact: "token", "aligned", "fast" (exact=False) or "none"."""
        return self.rules.strategy

    @property
    def fingerprint(self) -> str:
        """Hash of the GGUF's identity, the KV layout settings, the kernels and the reuse mode
        (strategy and chunk: a state built on one schedule is never served to another)."""
        if self._fingerprint is None:
            self._probe()  # the probe settles the codec, which the fingerprint names
            llama_cpp = bindings()
            parts = [
                "llama.cpp",
                self.model.identity,
                f"llama-cpp-python={llama_cpp.__version__}",
                f"flash_attn={self.settings.flash_attn}",
                "kv=f16/f16",
                f"exact={self.exact}",
                f"codec={self.codec.name}",
                f"strategy={self.exact_strategy}",
                f"chunk={self.exact_chunk}",
                llama_cpp.llama_print_system_info().decode(errors="replace"),
            ]
            self._fingerprint = blake2b("\x00".join(parts).encode(), digest_size=16).hexdigest()
        return self._fingerprint

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
            self._probe()  # the probe's own context comes and goes before this one exists
            s = self.settings
            self._context = Context(
                self.model,
                n_seq=self.n_seq,
                n_ctx_seq=self._n_ctx_seq,
                n_batch=s.n_batch,
                n_threads=s.n_threads,
                flash_attn=s.flash_attn,
                split_streams=self.exact,
                verbose=s.verbose,
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
            dst = self._free_id(keep={seq})
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
            seq = self._free_id(keep=set())
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

    # ------------------------------------------------------------ evaluation

    def check(self, tokens: Sequence[int], what: str = "a query") -> list[int]:
        return check_token_ids(tokens, self.n_vocab, what)

    def prefill(self, tokens: Sequence[int], *, pin: bool = False, keep: bool = True) -> np.ndarray:
        """Logits after `tokens`, left live (pinned with pin=True) and, with keep, in the prefix cache."""
        with self._lock:
            query = Query(self.check(tokens), insert=keep and self.cache is not None)
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
            found = self._run(steps)
            results: list[Advance] = [Advance(None, None)] * len(unique)
            for step in steps:
                results[step.index] = Advance(
                    found.get(step.index),
                    step.seq,
                    step.reused,
                    step.source,
                    step.rows,  # type: ignore[arg-type]
                    step.done,
                )
            self.stats.queries += sum(1 for s in steps if s.done)
        return [results[first[q.key]] for q in asked]

    # ------------------------------------------------------------ running a round

    def _run(self, steps: list[Step]) -> dict[int, np.ndarray]:
        """Decode every step's rows; returns the logits of each finished step by query index."""
        out: dict[int, np.ndarray] = {}
        busy = {s.seq for s in steps}
        group = dict(
            n_batch=self._ctx().n_batch,
            decode_group=self.decode_group,
            group_rows=self.group_rows,
            exact=self.exact,
        )
        try:
            for step in steps:
                # A fork's stream is copied at the next decode: its state is not readable before.
                if step.start in step.checkpoints and step.fork is None:
                    self._checkpoint(step, step.start)
            for wave in waves(steps):
                for batch in pack(wave, **group):
                    out.update(self._decode(batch, busy))
            decodes = [Unit(st, st.decode, st.decode + 1) for st in steps if st.decode is not None]
            for batch in pack(decodes, **group):
                out.update(self._decode(batch, busy))
        except BaseException:
            for seq in busy:  # their cells are partly written: forget them rather than trust them
                if seq in self._table:
                    self._drop(seq)
            raise
        self._finish_round(steps)
        return out

    def _decode(self, batch: list[Unit], busy: set[int]) -> dict[int, np.ndarray]:
        """One llama_decode of the units' rows; the logits each finished unit's query wants."""
        rows = [r for unit in batch for r in unit.rows()]
        context = self._ctx()
        while True:
            try:
                context.decode(rows)
                break
            except KVFullError:
                # Only a unified KV (fast mode) runs out of cells for a sequence that fits n_ctx.
                if not self._evict(keep=busy):
                    raise ContextOverflowError(
                        f"the KV cells are full with {len(self._table)} live sequences: raise n_ctx"
                    ) from None
        self.stats.batches += 1
        self.stats.tokens_evaluated += len(rows)
        self.stats.peak_sequences = max(self.stats.peak_sequences, len(batch))
        out: dict[int, np.ndarray] = {}
        at = 0
        for unit in batch:
            step, q = unit.step, unit.step.query
            m = unit.hi - unit.lo
            if q.rows and unit.hi <= q.n_prefill:
                block = np.stack([context.logits(at + i) for i in range(m)])
                step.rows.append((unit.lo, block))
            if unit.hi == len(q.tokens) and q.logits:
                out[step.index] = context.logits(at + m - 1)
            if unit.hi in step.checkpoints:
                self._checkpoint(step, unit.hi)
            at += m
        return out

    def _checkpoint(self, step: Step, n: int) -> None:
        """Save the whole state of step.seq's first n tokens (it holds exactly those now)."""
        held = self._table.find(step.seq)
        if held is not None:
            state = self._ctx().state_bytes(step.seq)
            held.checkpoints.append((list(step.query.tokens[:n]), state))

    def _finish_round(self, steps: list[Step]) -> None:
        """Record what each sequence holds now and how much of it is reusable, and cache the
        queries that ask for it (Query.insert) once their prefill is done."""
        tick = self._table.tick()
        chunk = self.rules.chunk
        for step in steps:
            held = self._table.get(step.seq)
            q = step.query
            held.tokens, held.last_used = list(q.tokens[: step.stop]), tick
            if not self.exact:
                held.n_reusable = step.stop
            elif step.batches:
                # Cells from a batch shorter than b (a prompt shorter than b) are not exact to reuse.
                end = step.batches[-1][1]
                exact = chunk or end - step.start >= self.exact_batch
                held.n_reusable = end if exact else step.start
            held.n_reusable = min(held.n_reusable, len(held.tokens))
            self._table.report(held)
            # Its cells are now the lone evaluation of the query's prompt (and what it decoded)
            # once the prefill part is done; a prefill stopped short of it is not yet.
            held.prompt_end = q.n_prefill if step.stop >= q.n_prefill else -1
            held.pending += step.stop - step.start
            if step.batches and step.batches[-1][1] == q.n_prefill:
                insert = held.pending >= KEEP_MIN_TOKENS if q.insert is None else q.insert
                if insert and self.cache is not None:
                    self.save(step.seq)
                held.pending = 0

    # ------------------------------------------------------------ internals

    def _ctx(self) -> Context:
        if self._context is None:
            raise PromptCacheError("no context: the engine is closed")
        return self._context

    def _free_id(
        self, keep: set[int], spare: set[int] | frozenset[int] = frozenset()
    ) -> int | None:
        """A free sequence id, evicting the least recently used sequence outside `keep` (and
        outside `spare` while another victim exists); None when every sequence is kept or pinned."""
        free = self._table.free_id()
        if free is not None:
            return free
        victim = self._table.victim(keep | spare) or self._table.victim(keep)
        if victim is None:
            return None
        self._drop(victim.seq_id)
        self.stats.evictions += 1
        return victim.seq_id

    def _evict(self, keep: set[int]) -> bool:
        victim = self._table.victim(keep)
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


def _splitting_codec() -> StateCodec:
    from promptcache.codec.llama_state import LlamaStateCodec

    return LlamaStateCodec()


__all__ = ["Advance", "Engine", "EngineStats", "KEEP_MIN_TOKENS"]
