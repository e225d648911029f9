"""SequenceEngine: many token sequences in one llama.cpp context, evaluated together in batches.

Owns one multi-sequence context, which tokens each sequence id holds and how queries become batch rows;
never lays out state bytes (PromptCache and its codec do) and never samples (callers do).

A sequence forks from another (`llama_memory_seq_cp`) and is freed (`llama_memory_seq_rm`). A query whose
prefix is not live is fed from the prefix cache (`llama_state_seq_set_data` into a free sequence id), so
a prompt another process cached on disk or in Redis is restored, not prefilled.

Exactness, measured on this machine by bench/multiseq_exactness.py (SmolLM2 Q4_1, flash attention off;
max |logit difference| against an uncached single-sequence prefill, 4 particles x 8 steps with a
clone and a stop, 60-token prompt; a 300-token prompt gave 0.75 and 0.93 for one row):

| layout | one new row per sequence | its previous token re-read with it (2 rows) |
| --- | --- | --- |
| unified KV (cells shared between sequences) | 0.78 | 0.80 |
| one KV stream per sequence | 1.09 | 0 |

In a unified KV the cells of a sequence interleave with other sequences' cells, so the attention sums
run over another cell order than a single-sequence prefill's (DESIGN.md measured one step, where the
order happened to match); in one stream per sequence, a sequence's cells sit where a lone prefill puts
them, and a step of at least `exact_batch` rows per sequence (the pair decode of DESIGN.md) runs the
kernels a prefill runs. Hence two modes:

- exact=True: one stream per sequence; every sequence's part of a batch has at least exact_batch rows
  (a particle's step re-reads its previous token); a fork copies its parent's stream. Logits equal the
  LLM's (an uncached single-sequence prefill) bit for bit, batched or not.
- exact=False: a unified KV; a fork shares its parent's cells (`llama_memory_seq_cp`, no copy) and a
  step evaluates only the new token: cheaper, and the logits drift (about 1.0 above).
On the aligned schedule (LLM.exact_strategy "aligned": gemma3-270m, whose kernels round by batch size,
README "Exactness"), exact mode follows the LLM's schedule of chunk C: a query reuses a live or cached
prefix only up to the last multiple of C below its length (a particle's step cuts its sequence back
there and re-reads up to C rows; a fork copies there), evaluates the rest in chunks [kC, (k+1)C) at
absolute positions, each chunk a llama_decode of that one sequence, and caches whole states only at
multiples of C (states of sliding-window layers cannot be cut: up to max_checkpoints of them per
prompt, as LLM's prefill). Grouping several sequences' equal-length aligned chunks in one batch is not
exact there: measured 2026-11-26 on gemma3 Q4_K_M, C = 32, 4 particles x 4 steps over a 70-token
prompt, max |logit difference| 0.44 to 0.89 for 6 of 16 rows; 4 distinct 71-token prompts, 0.68 for
one. So no rows of two sequences share a batch there, and every logit equals a lone prefill's.
Where the model has no exact strategy at all (LLM.may_reuse is False in exact mode), nothing is reused
or batched together: each query is evaluated alone from its first token.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

import numpy as np

from promptcache.engines.llama_cpp.context import Closing
from promptcache.errors import CodecError, ContextOverflowError, PromptCacheError

if TYPE_CHECKING:
    from promptcache.cache import Hit, PromptCache
    from promptcache.engines.llama_cpp import LLM

log = logging.getLogger(__name__)

# A query whose live prefix leaves fewer tokens than this uncovered evaluates them instead of asking the
# prefix cache: two of its 8-token blocks, so the per-token steps of particles never pay a lookup.
RESTORE_MIN_TOKENS = 16
# A query that evaluates at least this many new tokens at once (a prompt, not a particle's step) has its
# state inserted in the prefix cache, so another process or a later run restores it.
KEEP_MIN_TOKENS = 32
_MAX_SEQ = 255  # llama.cpp's LLAMA_MAX_SEQ is 256; one id is the scratch sequence


@dataclass
class EngineStats:
    """Counters since the engine was made: timing-free facts about what was computed and reused."""

    queries: int = 0  # token lists evaluated (a list asked twice in one call counts once)
    tokens_evaluated: int = 0  # rows decoded (re-read rows included)
    rows_reread: int = 0  # live tokens evaluated again so a sequence's step has exact_batch rows
    batches: int = 0  # llama_decode calls
    tokens_reused: int = 0  # query tokens found live in some sequence (own or forked)
    forks: int = 0
    restores: int = 0  # sequences fed from the prefix cache
    tokens_restored: int = 0
    evictions: int = 0  # live sequences dropped to make room
    inserts: int = 0  # states handed to the prefix cache
    peak_sequences: int = 0  # most sequences one llama_decode call evaluated together

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Advance:
    """What one query got from a round (SequenceEngine.advance): the logits after its last token, or
    None while it waits or its prompt is still being evaluated; the sequence holding it (None while
    it waits); how many of its tokens the round reused and from where (live, memory, disk, redis, none)."""

    logits: np.ndarray | None
    seq: int | None
    reused: int = 0
    source: str = "none"


@dataclass
class _Live:
    seq_id: int
    tokens: list[int]
    last_used: int = 0
    pinned: bool = False
    pending: int = 0  # tokens evaluated in rounds that did not finish their query yet (a budget)


@dataclass
class _Step:
    """One query's part of a round: evaluate tokens[start:] in sequence `seq` (forked from `fork`'s
    first `start` tokens when fork is not None, or cut back to `start` tokens when `cut`)."""

    query: int
    tokens: list[int]
    seq: int
    start: int
    fork: int | None = None
    cut: bool = False
    source: str = "none"  # where the reused tokens came from: live, memory, disk, redis or none
    reused: int = 0
    partial: bool = False  # tokens is cut short of the query (a budget): no logits yet
    keep: bool = False  # insert the state in the prefix cache however few tokens this step adds


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    if (
        a[n - 1] == b[n - 1] and a[:n] == b[:n]
    ):  # the usual case: one extends the other (C-speed compare)
        return n
    x = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    return int(np.argmax(x))


class SequenceEngine(Closing):
    """Next-token logits for many token lists at once, in one llama.cpp context of up to n_seq sequences.

    llm: an LLM (its model file, prefix cache, fingerprint, codec, threads and probed exact batch size
    are used; its own context is not), a GGUF path, or None for the default model. n_ctx: KV cells
    shared by all sequences (a prefix shared by forks takes its cells once). exact: see the module
    docstring; default the LLM's. cache: the prefix cache to feed from and insert into; default the LLM's.
    """

    def __init__(
        self,
        llm: LLM | str | os.PathLike[str] | None = None,
        *,
        n_seq: int = 8,
        n_ctx: int = 1024,
        n_batch: int = 512,
        exact: bool | None = None,
        cache: PromptCache | str | None | bool = True,
    ) -> None:
        from promptcache.engines.llama_cpp import LLM

        _check_sizes(n_seq, n_ctx, n_batch)
        if not isinstance(llm, LLM):
            llm = LLM(
                llm, exact=True if exact is None else exact, cache="ram" if cache is True else cache
            )
        self.llm = llm
        self.exact = llm.exact if exact is None else bool(exact)
        self.cache: PromptCache | None = llm.cache if cache is True else _resolve(cache)
        self.n_seq = n_seq
        self.n_ctx = min(
            -(-n_ctx // 256) * 256, llm.n_ctx_train
        )  # llama.cpp pads a stream to 256 cells
        self.n_batch = n_batch
        self.n_vocab = llm.n_vocab
        b = llm.exact_batch  # probes once per model and machine (kept in the user cache dir)
        self.exact_batch = b if self.exact else 1
        # The aligned schedule's C (0 off it): the LLM's, so that both build and serve the same states.
        self.chunk = llm.rules.chunk if self.exact and llm.exact_strategy == "aligned" else 0
        if self.chunk > n_batch:
            raise ValueError(
                f"n_batch must be at least the aligned schedule's chunk ({self.chunk})"
            )
        self.max_checkpoints = llm.rules.max_checkpoints
        # In exact mode a model without an exact batch size or schedule reuses and batches nothing.
        self.shares = llm.may_reuse or not self.exact
        self.codec = llm.codec
        # A state built in the other mode than the LLM's is never served to it.
        self.fingerprint = (
            llm.fingerprint if self.exact == llm.exact else _mode_fingerprint(llm, self.exact)
        )
        self.stats = EngineStats()
        self._live: dict[int, _Live] = {}
        self._inserted: set[tuple[int, ...]] = set()
        self._tick = 0
        self._lock = threading.RLock()
        self.model = llm.model  # the LLM's handle on the GGUF: the weights are loaded once
        from promptcache.engines.llama_cpp.context import bindings as _llama

        self._n_swa = int(_llama().llama_model_n_swa(self.model.model))
        self._ctx: Any = None
        self._batch: Any = None

    @property
    def kv_bytes(self) -> int:
        """Bytes the context's KV cache takes (n_seq x n_ctx cells, K and V in f16), from the model's
        shape: what --parallel costs in memory (an upper bound for sliding-window layers)."""
        return self.n_seq * self.n_ctx * kv_bytes_per_token(self.model)

    # ------------------------------------------------------------ context

    def _ensure_context(self) -> None:
        if self._ctx is not None:
            return
        from promptcache.engines.llama_cpp.context import bindings as _llama

        llama_cpp = _llama()
        from llama_cpp._internals import LlamaBatch, LlamaContext

        params = llama_cpp.llama_context_default_params()
        # Exact: a KV stream of n_ctx cells per sequence (see the module docstring). Fast: one unified
        # KV of as many cells, where forks share their prefix's cells.
        params.n_ctx = self.n_ctx * self.n_seq
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = self.n_seq
        params.kv_unified = not self.exact
        params.n_threads = params.n_threads_batch = self.llm.n_threads
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if self.llm.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.no_perf = True
        self._ctx = LlamaContext(model=self.model, params=params, verbose=False)
        # llama.cpp caps n_batch at n_ctx: pack rows by what the context really takes.
        self._rows_max = min(self.n_batch, int(llama_cpp.llama_n_batch(self._ctx.ctx)))
        self._batch = LlamaBatch(n_tokens=self._rows_max, embd=0, n_seq_max=1, verbose=False)
        raw = self._batch.batch
        self._b_token = np.ctypeslib.as_array(raw.token, shape=(self._rows_max,))
        self._b_pos = np.ctypeslib.as_array(raw.pos, shape=(self._rows_max,))
        self._b_nseq = np.ctypeslib.as_array(raw.n_seq_id, shape=(self._rows_max,))
        self._b_logits = np.ctypeslib.as_array(raw.logits, shape=(self._rows_max,))
        self._b_seq = [
            np.ctypeslib.as_array(raw.seq_id[i], shape=(1,)) for i in range(self._rows_max)
        ]
        self._b_nseq[:] = 1
        self._live.clear()
        log.debug(
            "multi-sequence context: %d sequences x %d tokens, exact=%s",
            self.n_seq,
            self.n_ctx,
            self.exact,
        )

    def close(self) -> None:
        """Free the context (idempotent); the next call makes a new, empty one."""
        with self._lock:
            if self._batch is not None:
                self._batch.close()
            if self._ctx is not None:
                self._ctx.close()
            self._ctx = self._batch = None
            self._live.clear()

    # ------------------------------------------------------------ sequences

    @property
    def sequences(self) -> dict[int, tuple[int, ...]]:
        """Live sequence ids and the tokens whose KV each holds."""
        with self._lock:
            return {s.seq_id: tuple(s.tokens) for s in self._live.values()}

    def fork(self, seq_id: int, n_tokens: int | None = None) -> int:
        """A new sequence sharing the first n_tokens (default all) of `seq_id`'s cells, without a copy."""
        with self._lock:
            src = self._get(seq_id)
            n = len(src.tokens) if n_tokens is None else int(n_tokens)
            if not 0 <= n <= len(src.tokens):
                raise ValueError(f"n_tokens must be in [0, {len(src.tokens)}]")
            dst = self._free_slot(keep={seq_id})
            self._copy(seq_id, dst, n)
            self._live[dst] = _Live(dst, src.tokens[:n], self._next_tick())
            return dst

    def free(self, seq_id: int) -> None:
        """Drop a sequence; cells it shared with others stay theirs."""
        with self._lock:
            self._get(seq_id)
            self._drop(seq_id)

    def pin(self, seq_id: int, pinned: bool = True) -> None:
        """A pinned sequence is never evicted nor extended in place: queries fork from it."""
        with self._lock:
            self._get(seq_id).pinned = pinned

    def clear(self) -> None:
        """Drop every live sequence (the context stays allocated)."""
        with self._lock:
            if self._ctx is not None:
                self._ctx.kv_cache_clear()
            self._live.clear()

    def forget_cached(self) -> int:
        """Remove from the prefix cache the sequences this engine inserted; returns how many were there.
        On a store other processes share, their chunks are left to the store (they may back other
        processes' entries); on a private one the chunks no other entry uses are deleted."""
        with self._lock:
            removed = 0
            if self.cache is not None:
                for tokens in self._inserted:
                    removed += bool(self.cache.remove(list(tokens), self.fingerprint))
            self._inserted.clear()
            return removed

    def save(self, seq_id: int) -> int:
        """Insert a live sequence's state in the prefix cache; returns the bytes newly written."""
        with self._lock:
            return self._insert(self._get(seq_id))

    # ------------------------------------------------------------ evaluation

    def prefill(self, tokens: Sequence[int], *, pin: bool = False, keep: bool = True) -> np.ndarray:
        """Logits after `tokens`, left live (pinned with pin=True) and, with keep, in the prefix cache."""
        with self._lock:
            logits = self.evaluate([tokens])[0]
            live = self._find(self._check(tokens))
            if live is not None:
                live.pinned = live.pinned or pin
                if keep and self.cache is not None:
                    self._insert(live)
            return logits

    def evaluate(self, queries: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Next-token logits (float32, n_vocab) after each token list, computed together.

        Each query continues the live sequence with its longest prefix (in place, or forked when another
        query or a pin holds it), or a state restored from the prefix cache, or starts afresh; all new
        tokens go into as few batches as possible, and a prefix several queries share is evaluated once.
        Raises ValueError/TypeError for malformed queries and ContextOverflowError when a query cannot
        fit the context."""
        checked = [self._check(q) for q in queries]
        index: dict[tuple[int, ...], int] = {}
        for q in checked:
            index.setdefault(tuple(q), len(index))
        unique = [list(k) for k in index]
        found: list[np.ndarray | None] = [None] * len(unique)
        with self._lock:
            todo = list(range(len(unique)))
            while todo:
                out = self.advance([unique[i] for i in todo])
                for i, adv in zip(todo, out, strict=True):
                    found[i] = adv.logits
                todo = [i for i in todo if found[i] is None]
        return [found[index[tuple(q)]] for q in checked]  # type: ignore[misc]

    def advance(
        self,
        queries: Sequence[Sequence[int]],
        *,
        hints: Sequence[int | None] | None = None,
        budget: int | None = None,
        keep: Sequence[bool] | None = None,
    ) -> list[Advance]:
        """One round of `evaluate` for a scheduler: every query moves forward, some not to its end.

        A query gets its logits (Advance.logits) unless it waits: beyond the first n_seq distinct
        queries (one at a time where nothing is shared), for another query of the round that evaluates
        a prefix they share (it forks that next round), or, with `budget`, while more than `budget` of
        its tokens remain to evaluate (a long prompt is evaluated `budget` tokens per round, so the
        others' steps keep coming). `hints[i]`: the sequence query i extended last round (a scheduler
        knows it), which saves comparing the query with every live sequence; a hinted sequence is not
        evicted by this round's other queries. `keep[i]`: query i is a prompt, inserted in the prefix
        cache when evaluated even if it adds fewer than KEEP_MIN_TOKENS tokens (as LLM caches every
        prompt). Asking the same list again continues where it stopped."""
        if budget is not None and (not isinstance(budget, int) or budget < 2 * self.exact_batch):
            raise ValueError(f"budget must be an int >= {2 * self.exact_batch}")
        checked = [self._check(q) for q in queries]
        for q in checked:
            if len(q) > self.n_ctx:
                raise ContextOverflowError(
                    f"a query of {len(q)} tokens does not fit a context of {self.n_ctx}: raise n_ctx"
                )
        index: dict[tuple[int, ...], int] = {}
        first: list[int] = []
        for i, q in enumerate(checked):
            if index.setdefault(tuple(q), len(first)) == len(first):
                first.append(i)
        unique = [checked[i] for i in first]
        hint_of = [hints[i] if hints is not None else None for i in first]
        keep_of = [bool(keep[i]) if keep is not None else False for i in first]
        with self._lock:
            self._ensure_context()
            per_round = self.n_seq if self.shares else 1
            todo = list(range(min(per_round, len(unique))))
            steps = self._plan(todo, unique, hint_of, budget)
            for step in steps:
                step.keep = keep_of[step.query]
            found = self._run(steps)
            self.stats.queries += sum(1 for s in steps if not s.partial)
            done = {s.query: s for s in steps}
            results = []
            for i in range(len(unique)):
                step = done.get(i)
                if step is None:
                    results.append(Advance(None, None))
                else:
                    results.append(Advance(found.get(i), step.seq, step.reused, step.source))
        return [results[index[tuple(q)]] for q in checked]

    # ------------------------------------------------------------ planning

    def _plan(
        self,
        todo: list[int],
        unique: list[list[int]],
        hints: list[int | None],
        budget: int | None,
    ) -> list[_Step]:
        """Assign each query a sequence; forks and cuts are applied, restores loaded, rows not yet run.

        A query reuses at most len - exact_batch live tokens (the rest is evaluated in one step); on the
        aligned schedule, the last multiple of C below its length (the rest in chunks aligned to C)."""
        steps: list[_Step] = []
        claimed: set[int] = set()  # sequences a step of this round writes to
        sources: set[int] = set()  # sequences a fork of this round reads from
        hinted = {h for h in hints if h is not None and h in self._live}
        prefills: list[
            list[int]
        ] = []  # queries of this round that evaluate a prefix others may share
        for i in todo:
            q = unique[i]
            limit = self._limit(len(q))
            best, best_len, best_full = self._best_live(q, limit, hints[i], claimed)
            if any(
                self._align(min(_common_prefix(p, q), limit)) - best_len >= RESTORE_MIN_TOKENS
                for p in prefills
            ):
                continue  # another query of this round evaluates what this one needs: fork it next round
            keep = claimed | sources
            step = None
            if self.shares and self.cache is not None and limit - best_len >= RESTORE_MIN_TOKENS:
                restored = self._restore(q, best_len, limit, keep=keep, spare=hinted)
                if restored is not None:
                    seq, source = restored
                    step = _Step(i, q, seq, len(self._live[seq].tokens), source=source)
            if step is None and best is not None and best_len > 0:
                step = self._reuse_live(i, q, best, best_len, best_full, claimed, sources, hinted)
            if step is None:
                seq = self._free_slot(keep, hinted)
                self._live[seq] = _Live(seq, [], self._next_tick())
                step = _Step(i, q, seq, 0)
            step.reused = step.start
            if budget is not None and len(q) - step.start > budget:
                self._cut_to_budget(step, budget, limit)
            claimed.add(step.seq)
            steps.append(step)
            if len(q) - step.start >= RESTORE_MIN_TOKENS:
                prefills.append(q)
        for step in steps:  # forks first: a cut below may shorten a source
            if step.fork is not None:
                self._copy(step.fork, step.seq, step.start)
                self.stats.forks += 1
        for step in steps:
            if step.cut:
                self._ctx.kv_cache_seq_rm(step.seq, step.start, -1)
        return steps

    def _reuse_live(
        self,
        i: int,
        q: list[int],
        best: _Live,
        best_len: int,
        best_full: bool,
        claimed: set[int],
        sources: set[int],
        hinted: set[int],
    ) -> _Step:
        """Query i's step on the live sequence `best`: extended in place, or forked into a free one
        when another query of the round or a pin holds it (or, while slots are free, to keep a tail
        that is not a prefix of q)."""
        in_place = best.seq_id not in claimed and best.seq_id not in sources and not best.pinned
        if in_place and not best_full and self._has_free_slot():
            in_place = (
                False  # keep its tail (another particle may come back to it) while slots are free
            )
        if in_place:
            step = _Step(
                i, q, best.seq_id, best_len, cut=best_len < len(best.tokens), source="live"
            )
        else:
            seq = self._free_slot(claimed | sources | {best.seq_id}, hinted)
            sources.add(best.seq_id)
            step = _Step(i, q, seq, best_len, fork=best.seq_id, source="live")
            self._live[seq] = _Live(seq, [], self._next_tick())  # placeholder until the fork
        self.stats.tokens_reused += best_len
        self.stats.rows_reread += (
            max(0, min(len(best.tokens), len(q) - 1) - best_len) if best_full else 0
        )
        return step

    def _cut_to_budget(self, step: _Step, budget: int, limit: int) -> None:
        """Evaluate `budget` tokens of the step now and leave at least exact_batch for the last round
        (aligned: stop at a multiple of C, at least the next one, so the next round goes on there)."""
        q = step.tokens
        if self.chunk:
            end = self._align(step.start + budget)
            end = min(max(end, step.start + self.chunk), limit)
        else:
            end = step.start + min(budget, len(q) - step.start - self.exact_batch)
        if end > step.start:
            step.tokens, step.partial = q[:end], True

    def _best_live(
        self, q: list[int], limit: int, hint: int | None, claimed: set[int]
    ) -> tuple[_Live | None, int, bool]:
        """The live sequence q reuses most of (at most `limit` tokens), how much, and whether all of
        it is a prefix of q. The hinted sequence, when q extends it, is taken without a search."""
        if not self.shares:
            return None, 0, False
        live = self._live.get(hint) if hint is not None else None
        if (
            live is not None
            and live.seq_id not in claimed
            and 0 < len(live.tokens) <= len(q)
            and live.tokens[-1] == q[len(live.tokens) - 1]
            and live.tokens == q[: len(live.tokens)]
        ):
            return live, self._usable(live, min(len(live.tokens), limit)), True
        best, best_len, best_full = None, 0, False
        best_rank: tuple[int, bool, bool, bool] = (0, False, False, False)
        for live in self._live.values():
            common = _common_prefix(live.tokens, q)
            full = common == len(live.tokens)
            # Longest reuse first; then a sequence free to extend in place, one it extends, unpinned.
            rank = (
                self._usable(live, min(common, limit)),
                live.seq_id not in claimed,
                full,
                not live.pinned,
            )
            if rank[0] and rank > best_rank:
                best, best_len, best_full, best_rank = live, rank[0], full, rank
        return best, best_len, best_full

    def _align(self, n: int) -> int:
        """n rounded down to a restore point: a multiple of C on the aligned schedule, else n."""
        return n - n % self.chunk if self.chunk else n

    def _limit(self, n: int) -> int:
        """The most of an n-token query that may be reused (ReuseRules.limit): at least exact_batch
        tokens are evaluated again, or on the aligned schedule everything from the last multiple of C
        below n."""
        return self._align(n - 1) if self.chunk else max(0, n - self.exact_batch)

    def _usable(self, live: _Live, n: int) -> int:
        """How many of `live`'s first n tokens a query may keep: n cut to a restore point, and 0 when
        the sequence would have to be cut where a sliding-window cache dropped cells the next token
        attends to (llama-server checks the same with llama_memory_seq_pos_min)."""
        n = self._align(n)
        if n == 0 or n >= len(live.tokens) or self._n_swa <= 0:
            return n
        from promptcache.engines.llama_cpp.context import bindings as _llama

        llama_cpp = _llama()
        memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        pos_min = llama_cpp.llama_memory_seq_pos_min(memory, live.seq_id)
        return n if pos_min <= max(0, n - self._n_swa) else 0

    def _restore(
        self, q: list[int], live_len: int, limit: int, keep: set[int], spare: set[int]
    ) -> tuple[int, str] | None:
        """Load the longest cached prefix of q (longer than live_len, at most limit) into a free
        sequence; returns the sequence and the tier it came from, or None."""
        assert self.cache is not None
        try:
            hit = self.cache.lookup(
                q,
                self.fingerprint,
                max_tokens=limit,
                min_tokens=live_len,
                codec=self.codec,
                align=self.chunk,
            )
        except PromptCacheError as exc:
            log.warning("cache lookup failed (%s); evaluating instead", exc)
            return None
        if hit is not None and self._align(hit.tokens_reused) != hit.tokens_reused:
            hit = self._aligned_hit(hit, live_len)
        if hit is None:
            return None
        seq = self._free_slot(keep, spare)
        self._ctx.kv_cache_seq_rm(seq, -1, -1)
        if not self._load(bytes(hit.state), seq):
            self._ctx.kv_cache_seq_rm(seq, -1, -1)
            log.warning(
                "llama.cpp refused a cached state of %d tokens; evaluating instead",
                hit.tokens_reused,
            )
            return None
        self._live[seq] = _Live(seq, q[: hit.tokens_reused], self._next_tick())
        self.stats.restores += 1
        self.stats.tokens_restored += hit.tokens_reused
        return seq, hit.source

    def _aligned_hit(self, hit: Hit, live_len: int) -> Hit | None:
        """`hit` cut to the last multiple of C in it, or None when that is no more than the `live_len`
        tokens a live sequence supplies or the codec cannot cut states (whole entries are only ever
        cached at multiples of C: see _checkpoints)."""
        n = self._align(hit.tokens_reused)
        if n <= live_len or not self.codec.splittable:
            return None
        return hit.cut(n, self.codec)

    # ------------------------------------------------------------ running

    def _chunks(self, steps: list[_Step]) -> list[list[tuple[int, int, int, int]]]:
        """Batches of rows (token, position, sequence, query or -1 for no logits).

        Fast mode packs all rows in order. Exact mode groups steps of equal length: llama.cpp splits a
        batch over several KV streams into sub-batches of equal rows per sequence, and a mixed batch would
        give some sequence a 1-row sub-batch. A step longer than n_batch goes alone, its last chunk
        holding at least exact_batch rows (as LLM schedules a prompt)."""

        chunks: list[list[tuple[int, int, int, int]]] = []

        def rows(step: _Step, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
            last = -1 if step.partial else len(step.tokens) - 1
            return [
                (step.tokens[p], p, step.seq, step.query if p == last else -1)
                for p in range(lo, hi)
            ]

        cap, b = self._rows_max, self.exact_batch
        if self.chunk:
            # The aligned schedule: a step's rows in chunks at absolute multiples of C, each chunk a
            # llama_decode of its own (grouped with other sequences, a chunk's matmuls would have more
            # rows than a lone prefill's, and gemma3's kernels round by row count: see the docstring).
            c = self.chunk
            for step in steps:
                end = len(step.tokens)
                cuts = [step.start, *range(self._align(step.start) + c, end, c), end]
                chunks.extend(rows(step, lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo)
            return chunks
        if not self.exact:
            flat = [r for step in steps for r in rows(step, step.start, len(step.tokens))]
            return [flat[i : i + cap] for i in range(0, len(flat), cap)]
        groups: dict[int, list[_Step]] = {}
        for step in steps:
            groups.setdefault(len(step.tokens) - step.start, []).append(step)
        for m, group in sorted(groups.items()):
            if m > cap:
                for step in group:
                    sizes = [cap] * (m // cap) + ([m % cap] if m % cap else [])
                    if len(sizes) > 1 and sizes[-1] < b:
                        sizes[-2] -= b - sizes[-1]
                        sizes[-1] = b
                    pos = step.start
                    for size in sizes:
                        chunks.append(rows(step, pos, pos + size))
                        pos += size
                continue
            per = cap // m
            for j in range(0, len(group), per):
                chunks.append(
                    [
                        r
                        for step in group[j : j + per]
                        for r in rows(step, step.start, len(step.tokens))
                    ]
                )
        return chunks

    def _run(self, steps: list[_Step]) -> dict[int, np.ndarray]:
        """Decode every step's new tokens; returns the logits of each step's last token by query."""
        out: dict[int, np.ndarray] = {}
        busy = {s.seq for s in steps}
        points = self._checkpoints(steps)
        saved: list[tuple[list[int], bytes]] = []
        try:
            for chunk in self._chunks(steps):
                out.update(self._decode(chunk, busy))
                seq, end = chunk[-1][2], chunk[-1][1] + 1
                if end in points.get(seq, ()):
                    saved.append((points[seq][end], self._state(seq)))
        except BaseException:
            for seq in busy:  # their cells are partly written: forget them rather than trust them
                if seq in self._live:
                    self._drop(seq)
            raise
        tick = self._next_tick()
        for step in steps:
            self.stats.tokens_evaluated += len(step.tokens) - step.start
            live = self._live[step.seq]
            live.tokens, live.last_used = step.tokens, tick
            live.pending += len(step.tokens) - step.start
            if not step.partial:
                if self.cache is not None and (live.pending >= KEEP_MIN_TOKENS or step.keep):
                    self._insert(live)
                live.pending = 0
        for tokens, state in saved:
            self._insert_state(tokens, state)
        return out

    def _checkpoints(self, steps: list[_Step]) -> dict[int, dict[int, list[int]]]:
        """Where this round saves whole states, by sequence and position (with the tokens they hold):
        on the aligned schedule, with a cache and states that cannot be cut, at the deepest
        max_checkpoints multiples of C that a step evaluating at least KEEP_MIN_TOKENS tokens (or a
        budget's share of a prompt) reaches, as LLM's prefill does, so a query sharing a prefix
        restores one."""
        if not self.chunk or self.cache is None or self.codec.splittable:
            return {}
        c, out = self.chunk, {}
        for step in steps:
            end = len(step.tokens)
            if end - step.start < KEEP_MIN_TOKENS and not (step.partial or step.keep):
                continue
            deepest = range(self._align(end), step.start, -c)[: self.max_checkpoints]
            if deepest:
                out[step.seq] = {p: step.tokens[:p] for p in deepest}
        return out

    def _decode(
        self, chunk: list[tuple[int, int, int, int]], busy: set[int]
    ) -> dict[int, np.ndarray]:
        from promptcache.engines.llama_cpp.context import bindings as _llama

        llama_cpp = _llama()
        n = len(chunk)
        arr = np.asarray(chunk, dtype=np.int64)
        self._b_token[:n] = arr[:, 0]
        self._b_pos[:n] = arr[:, 1]
        self._b_logits[:n] = arr[:, 3] >= 0
        for i, seq in enumerate(arr[:, 2].tolist()):
            self._b_seq[i][0] = seq
        self._batch.batch.n_tokens = n
        while True:
            rc = llama_cpp.llama_decode(self._ctx.ctx, self._batch.batch)
            if rc == 0:
                break
            if rc == 1 and self._evict(
                keep=busy
            ):  # no free KV cells: drop the least recently used sequence
                continue
            if rc == 1:
                raise ContextOverflowError(
                    f"the KV cells are full with {len(self._live)} live sequences: raise n_ctx"
                )
            raise PromptCacheError(f"llama_decode failed with code {rc}")
        self.stats.batches += 1
        self.stats.peak_sequences = max(self.stats.peak_sequences, len(set(arr[:, 2].tolist())))
        out = {}
        for i in np.flatnonzero(arr[:, 3] >= 0).tolist():
            ptr = llama_cpp.llama_get_logits_ith(self._ctx.ctx, i)
            out[int(arr[i, 3])] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        return out

    # ------------------------------------------------------------ slots and states

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _get(self, seq_id: int) -> _Live:
        live = self._live.get(seq_id)
        if live is None:
            raise ValueError(f"no live sequence {seq_id}; live: {sorted(self._live)}")
        return live

    def _find(self, tokens: list[int]) -> _Live | None:
        return next((s for s in self._live.values() if s.tokens == tokens), None)

    def _has_free_slot(self) -> bool:
        return len(self._live) < self.n_seq

    def _free_slot(self, keep: set[int], spare: set[int] | frozenset[int] = frozenset()) -> int:
        """A free sequence id, evicting the least recently used sequence outside `keep` (and outside
        `spare` too while another victim exists)."""
        self._ensure_context()
        if not self._has_free_slot() and not self._evict(keep | spare) and not self._evict(keep):
            raise PromptCacheError(
                f"all {self.n_seq} sequences are pinned or in use by this call: raise n_seq or unpin one"
            )
        return next(i for i in range(self.n_seq) if i not in self._live)

    def _evict(self, keep: set[int]) -> bool:
        victims = [s for s in self._live.values() if s.seq_id not in keep and not s.pinned]
        if not victims:
            return False
        self._drop(min(victims, key=lambda s: s.last_used).seq_id)
        self.stats.evictions += 1
        return True

    def _drop(self, seq_id: int) -> None:
        self._ctx.kv_cache_seq_rm(seq_id, -1, -1)
        del self._live[seq_id]

    def _copy(self, src: int, dst: int, n: int) -> None:
        self._ctx.kv_cache_seq_rm(dst, -1, -1)
        if not n:
            return
        if self.exact:
            # Across KV streams llama.cpp copies whole sequences only (the stream is copied at the next
            # decode, cells at the same indices): copy all, then cut.
            self._ctx.kv_cache_seq_cp(src, dst, -1, -1)
            self._ctx.kv_cache_seq_rm(dst, n, -1)
        else:
            self._ctx.kv_cache_seq_cp(src, dst, 0, n)

    def _state(self, seq_id: int) -> bytes:
        """The sequence's state in the single-stream layout an LLM's context writes (so the prefix cache
        and its codec see one format whatever the context)."""
        from promptcache.engines.llama_cpp.context import bindings as _llama

        llama_cpp = _llama()
        size = llama_cpp.llama_state_seq_get_size(self._ctx.ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx.ctx, buf, size, seq_id)
        state = bytes(memoryview(buf)[:written])
        return single_stream(state) if self.exact else state

    def _load(self, state: bytes, seq_id: int) -> bool:
        from promptcache.engines.llama_cpp.context import bindings as _llama

        if self.exact:
            state = stream_state(state, self.n_seq)
        src = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
        return bool(_llama().llama_state_seq_set_data(self._ctx.ctx, src, len(state), seq_id))

    def _insert(self, live: _Live) -> int:
        """Insert a live sequence's state; on the aligned schedule a state that cannot be cut only
        where it ends at a multiple of C (a restore point: its checkpoints cover the rest)."""
        if self.cache is None or not live.tokens or not self.shares:
            return 0
        if not self.codec.splittable and self._align(len(live.tokens)) != len(live.tokens):
            return 0
        return self._insert_state(live.tokens, None, live.seq_id)

    def _insert_state(self, tokens: list[int], state: bytes | None, seq_id: int = -1) -> int:
        """Insert `state` (None: read it from sequence seq_id) for `tokens` unless it is cached."""
        assert self.cache is not None
        try:
            if self.cache.contains(tokens, self.fingerprint):
                self._inserted.add(tuple(tokens))
                return 0
            if state is None:
                state = self._state(seq_id)
            written = self.cache.insert(tokens, state, self.fingerprint, codec=self.codec)
        except PromptCacheError as exc:
            log.warning("could not cache a %d-token state: %s", len(tokens), exc)
            return 0
        self._inserted.add(tuple(tokens))
        self.stats.inserts += 1
        return written

    def _check(self, tokens: Sequence[int]) -> list[int]:
        from promptcache.engines.llama_cpp.plan import check_token_ids

        return check_token_ids(tokens, self.n_vocab, "a query")


# A sequence's state (llama_state_seq_get_data) is an 8-byte header (magic, seq id), then each KV cache's
# part (one cache; two for interleaved sliding-window models such as gemma3: the global layers', then the
# window's): u32 n_stream, then per KV stream u32 cell_count and, when it is not 0, that stream's cells and
# K/V rows (vendor/llama.cpp/src/llama-kv-cache.cpp, state_write / state_read: an empty stream is
# skipped, and a sequence is read into its own stream whichever stream it was written from).
_HEAD = struct.Struct("<IiI")
_SEQ_HEAD = struct.Struct("<Ii")
_U32 = struct.Struct("<I")
_ROW = struct.Struct("<iQ")  # type, row size
_VT = struct.Struct("<iII")  # type, element size, n_embd_v_gqa (V with v_trans)


def _stream_end(state: memoryview, off: int, cells: int, ext: int) -> int:
    """Where one stream's cells and K/V rows, starting at `off`, end."""
    if off + 8 * cells > len(state):
        raise CodecError("a KV stream's cells run past the state")
    for _ in range(cells):
        (n_seq,) = _U32.unpack_from(state, off + 4)
        off += 8 + ext + 4 * n_seq
    v_trans, n_layer = struct.unpack_from("<II", state, off)
    off += 8
    if v_trans > 1 or n_layer > 4096:
        raise CodecError("not a KV stream")
    for _ in range(n_layer):
        off += _ROW.size + cells * _ROW.unpack_from(state, off)[1]
    for _ in range(n_layer):
        if v_trans:
            _, el, embd = _VT.unpack_from(state, off)
            off += _VT.size + el * embd * cells
        else:
            off += _ROW.size + cells * _ROW.unpack_from(state, off)[1]
        if off > len(state):
            raise CodecError("a KV stream runs past the state")
    return off


def _kv_caches(state: bytes) -> list[list[memoryview]]:
    """Each KV cache's streams (a stream: its u32 cell_count and what follows). Raises CodecError
    when the bytes do not parse to the last one (with any of the codec's cell-extension sizes)."""
    from promptcache.codec.llama_state import CELL_EXT_SIZES

    view = memoryview(state)
    for ext in CELL_EXT_SIZES:
        try:
            off, caches = _SEQ_HEAD.size, []
            while off < len(view):
                (n_stream,) = _U32.unpack_from(view, off)
                if not 1 <= n_stream <= _MAX_SEQ + 1 or len(caches) == 2:
                    raise CodecError("not a KV cache")
                off += 4
                streams = []
                for _ in range(n_stream):
                    (cells,) = _U32.unpack_from(view, off)
                    end = _stream_end(view, off + 4, cells, ext) if cells else off + 4
                    streams.append(view[off:end])
                    off = end
                caches.append(streams)
            if off == len(view) and caches:
                return caches
        except (struct.error, CodecError):
            continue
    raise CodecError("a sequence state's KV streams are not laid out as this engine expects")


def single_stream(state: bytes) -> bytes:
    """A state written from a context of several KV streams, rewritten as from a one-stream context.
    Raises CodecError when the bytes are not laid out so (more than one non-empty stream)."""
    magic, seq, n_stream = _HEAD.unpack_from(state)
    if n_stream == 1:
        return state
    parts: list[bytes | memoryview] = [_SEQ_HEAD.pack(magic, seq)]
    for streams in _kv_caches(state):
        held = [s for s in streams if _U32.unpack_from(s)[0]]
        if len(held) > 1:
            raise CodecError("a sequence state holds cells in more than one KV stream")
        parts += [_U32.pack(1), held[0] if held else _U32.pack(0)]
    return b"".join(parts)


def stream_state(state: bytes, n_stream: int) -> bytes:
    """A one-stream state laid out for a context of n_stream KV streams (the inverse of single_stream)."""
    magic, seq, have = _HEAD.unpack_from(state)
    if have == n_stream:
        return state
    if have != 1:
        raise CodecError(f"a state of {have} KV streams cannot load into a context of {n_stream}")
    parts: list[bytes | memoryview] = [_SEQ_HEAD.pack(magic, seq)]
    for (stream,) in _kv_caches(state):
        parts += [_U32.pack(n_stream), stream, bytes(4 * (n_stream - 1))]
    return b"".join(parts)


def _check_sizes(n_seq: int, n_ctx: int, n_batch: int) -> None:
    if not isinstance(n_seq, int) or not 1 <= n_seq <= _MAX_SEQ:
        raise ValueError(f"n_seq must be an int in [1, {_MAX_SEQ}]")
    if not isinstance(n_ctx, int) or n_ctx < 64:
        raise ValueError("n_ctx must be an int >= 64 (tokens one sequence may hold)")
    if not isinstance(n_batch, int) or n_batch < 64:
        raise ValueError("n_batch must be an int >= 64 (smaller batches are not exact on CPU)")


def _mode_fingerprint(llm: LLM, exact: bool) -> str:
    return blake2b(f"{llm.fingerprint}\x00exact={exact}".encode(), digest_size=16).hexdigest()


def kv_bytes_per_token(model: Any) -> int:
    """K and V bytes one token takes in a context (f16), from the GGUF metadata of a LlamaModel."""
    md = model.metadata()
    arch = md.get("general.architecture", "llama")

    def num(key: str, default: int) -> int:
        try:
            return int(md.get(f"{arch}.{key}", default))
        except (TypeError, ValueError):  # a per-layer array: take the default
            return default

    n_head = num("attention.head_count", 1)
    n_embd = num("embedding_length", 0)
    head_kv = num("attention.head_count_kv", n_head)
    k = num("attention.key_length", n_embd // max(1, n_head))
    v = num("attention.value_length", k)
    return num("block_count", 1) * head_kv * (k + v) * 2


def _resolve(cache: PromptCache | str | None | bool) -> PromptCache | None:
    from promptcache.engines.llama_cpp import _resolve_cache

    if cache is False:
        return None
    return _resolve_cache(cache)  # type: ignore[arg-type]


__all__ = [
    "Advance",
    "SequenceEngine",
    "EngineStats",
    "single_stream",
    "stream_state",
    "RESTORE_MIN_TOKENS",
    "KEEP_MIN_TOKENS",
]
