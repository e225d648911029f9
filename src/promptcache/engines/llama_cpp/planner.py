"""Planning an engine round: which sequence each query uses (live, forked, restored, new) and what it
evaluates this round.

Owns the choice of sequences for a round's queries and carrying out forks, cuts and restores before the
round runs; the amounts reused and the batches come from plan.ReuseRules, the rows' packing from
rounds.pack. Never decodes (engine.py does).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from promptcache.engines.llama_cpp.plan import Query, ReuseRules, common_prefix
from promptcache.engines.llama_cpp.rounds import Step
from promptcache.engines.llama_cpp.sequences import Match
from promptcache.errors import CodecError

if TYPE_CHECKING:
    from promptcache.engines.llama_cpp.engine import Engine

log = logging.getLogger(__name__)

# A query waits a round, to fork the prefix another query of the round evaluates, when that saves it
# at least this many tokens (two 8-token blocks: a particle's one-token step never waits).
SHARE_MIN_TOKENS = 16


class _Round:
    """The bookkeeping of one round's planning."""

    def __init__(self, engine: Engine, queries: list[Query], budget: int | None) -> None:
        self.engine = engine
        self.rules: ReuseRules = engine.rules
        self.budget = budget
        self.steps: list[Step] = []
        self.claimed: set[int] = set()  # sequences a step of this round writes to
        self.sources: set[int] = set()  # sequences a fork of this round reads from
        table = engine._table
        self.spare = {q.hint for q in queries if q.hint is not None and q.hint in table}
        self.prefills: list[list[int]] = []  # token lists this round evaluates a long prefix of
        self.shares = engine.may_reuse or not engine.exact

    @property
    def protected(self) -> set[int]:
        return self.claimed | self.sources


def plan_round(engine: Engine, queries: list[Query], budget: int | None) -> list[Step]:
    """Steps for as many of `queries` as the context's sequences allow (one at a time where nothing
    may be shared); forks, cuts and restores are applied, rows not yet run. A query without a step
    waits: for a sequence, or to fork a prefix another query of the round evaluates."""
    r = _Round(engine, queries, budget)
    per_round = engine.n_seq if r.shares else 1
    for i, q in enumerate(queries):
        if len(r.steps) >= per_round:
            break
        match = _live_match(r, q)
        if any(
            r.rules.capped(common_prefix(p, q.tokens), q) - match.reused >= SHARE_MIN_TOKENS
            for p in r.prefills
        ):
            continue  # another query of this round evaluates what this one needs: fork it next round
        step = _plan_query(r, i, q, match)
        if step is None:
            continue  # every sequence is in use this round: it waits
        _schedule(r, step)
        r.claimed.add(step.seq)
        r.steps.append(step)
        if step.stop - step.start >= SHARE_MIN_TOKENS:
            r.prefills.append(q.tokens)
    context = engine._ctx()
    for step in r.steps:  # forks first: a cut below may shorten a source
        if step.fork is not None:
            context.copy(step.fork, step.seq, step.start)
            engine.stats.forks += 1
    for step in r.steps:
        if step.cut:
            context.drop(step.seq, step.start)
    return r.steps


def _live_match(r: _Round, q: Query) -> Match:
    """The live sequence q reuses most of; none where a sliding-window cache dropped cells the
    next token would attend to (llama-server checks the same with llama_memory_seq_pos_min)."""
    match = r.engine._table.best(q, r.rules, r.claimed, shares=r.shares)
    held = match.held
    if held is not None and match.reused < len(held.tokens):
        if not r.engine._ctx().can_truncate(held.seq_id, match.reused):
            return Match()
    return match


def _plan_query(r: _Round, i: int, q: Query, match: Match) -> Step | None:
    engine = r.engine
    limit = r.rules.capped(len(q.tokens), q)
    step = None
    if (
        r.shares
        and engine._cached is not None
        and limit - match.reused >= engine.settings.min_restore
    ):
        step = _restore(r, i, q, match.reused, limit)
    if step is None and match.held is not None and match.reused > 0:
        step = _reuse_live(r, i, q, match)
    if step is None:
        seq = engine._free_id(r.protected, r.spare)
        if seq is None:
            return None
        engine._table.add(seq, [], 0)
        step = Step(i, q, seq, 0)
    return step


def _reuse_live(r: _Round, i: int, q: Query, match: Match) -> Step | None:
    """Query i's step on the live sequence `match.held`: extended in place, or forked into a free
    one when another query of the round or a pin holds it (or, while sequences are free, to keep a
    tail that is not a prefix of q)."""
    engine, held, n = r.engine, match.held, match.reused
    assert held is not None
    in_place = held.seq_id not in r.protected and not held.pinned
    if in_place and not match.whole and engine._table.free_id() is not None:
        in_place = False  # keep its tail (another particle may come back to it) while ids are free
    if in_place:
        step = Step(i, q, held.seq_id, n, cut=n < len(held.tokens), source="live", reused=n)
    else:
        seq = engine._free_id(r.protected | {held.seq_id}, r.spare)
        if seq is None:
            return None
        r.sources.add(held.seq_id)
        engine._table.add(seq, [], 0)  # what it holds is set when the round ends
        step = Step(i, q, seq, n, fork=held.seq_id, source="live", reused=n)
    engine.stats.tokens_reused += n
    if match.whole:
        engine.stats.rows_reread += max(0, min(len(held.tokens), len(q.tokens) - 1) - n)
    return step


def _restore(r: _Round, i: int, q: Query, have: int, limit: int) -> Step | None:
    """Load the longest cached prefix of q (more than `have`, at most `limit` tokens) into a free
    sequence; None when there is none, no sequence is free, or llama.cpp refuses the state."""
    engine, cached = r.engine, r.engine._cached
    assert cached is not None
    t0 = time.perf_counter()
    hit = cached.lookup(q.tokens, limit, have, r.rules.chunk)
    if hit is None:
        return None
    n = r.rules.capped(hit.tokens_reused, q)
    if n < hit.tokens_reused:
        hit = cached.cut(hit, n, have)
        if hit is None:
            return None
    seq = engine._free_id(r.protected, r.spare)
    if seq is None:
        return None
    context = engine._ctx()
    try:
        loaded = context.load_state(seq, hit.state)
    except CodecError as exc:
        log.warning("a cached state does not fit this context (%s); evaluating instead", exc)
        loaded = False
    if loaded and hit.trimmed:  # the cells past the prefix are another sequence's: exact to drop
        loaded = context.can_truncate(seq, n)
        context.drop(seq, n if loaded else 0)
    if not loaded:
        log.warning("llama.cpp refused a cached state of %d tokens; evaluating instead", n)
        return None
    engine._table.add(seq, q.tokens[:n], n)
    engine.stats.restores += 1
    engine.stats.tokens_restored += n
    restore_ms = (time.perf_counter() - t0) * 1000
    return Step(i, q, seq, n, source=hit.source, reused=n, restore_ms=restore_ms)


def _schedule(r: _Round, step: Step) -> None:
    """What the step evaluates this round: its prefill from where it starts, at most `budget`
    tokens (README, "Exactness": any split keeps the logits), whole-state checkpoints where the
    states cannot be cut; then, once the prefill is done, the next token decoded alone."""
    q, start, rules = step.query, step.start, r.rules
    p = q.n_prefill
    if start < p:
        caching = r.engine._cached is not None
        plan = rules.prefill(p, start, caching=caching)
        stop = rules.budget_stop(start, p, r.budget)
        part = plan.until(stop, 1 if rules.chunk or not rules.exact else rules.exact_batch)
        points = part.checkpoints
        if q.max_checkpoints is not None and len(plan.checkpoints) > q.max_checkpoints:
            deepest = plan.checkpoints[len(plan.checkpoints) - q.max_checkpoints :]
            points = tuple(c for c in points if c in deepest)
        step.batches, step.checkpoints = part.batches, points
        if step.stop == p and q.decodes:
            step.decode = p
    elif start < len(q.tokens):
        step.decode = start


__all__ = ["SHARE_MIN_TOKENS", "plan_round"]
