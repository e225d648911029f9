"""Running an engine round: the planned steps' rows decoded in packed batches, whole-state checkpoints
saved on the way, and what each sequence holds (and may reuse) afterwards.

Owns carrying out a round that planner.py planned and rounds.py packs; never chooses sequences or
reuse amounts. Functions over an Engine, as planner.py's are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from promptcache.engines.llama_cpp.context import KVFullError
from promptcache.engines.llama_cpp.rounds import Step, Unit, pack, waves
from promptcache.errors import ContextOverflowError

if TYPE_CHECKING:
    from promptcache.engines.llama_cpp.engine import Engine

# A query that evaluates at least this many new tokens at once (a prompt, not a particle's step) goes
# into the prefix cache unless it says otherwise (Query.insert), so another process restores it.
KEEP_MIN_TOKENS = 32


def run_round(engine: Engine, steps: list[Step]) -> dict[int, np.ndarray]:
    """Decode every step's rows; returns the logits of each finished step by query index."""
    out: dict[int, np.ndarray] = {}
    busy = {s.seq for s in steps}
    group = dict(
        n_batch=engine._ctx().n_batch,
        decode_group=engine.decode_group,
        group_rows=engine.group_rows,
        exact=engine.exact,
    )
    try:
        for step in steps:
            # A fork's stream is copied at the next decode: its state is not readable before.
            if step.start in step.checkpoints and step.fork is None:
                _checkpoint(engine, step, step.start)
        for wave in waves(steps):
            for batch in pack(wave, **group):
                out.update(_decode(engine, batch, busy))
        decodes = [Unit(st, st.decode, st.decode + 1) for st in steps if st.decode is not None]
        for batch in pack(decodes, **group):
            out.update(_decode(engine, batch, busy))
    except BaseException:
        for seq in busy:  # their cells are partly written: forget them rather than trust them
            if seq in engine._table:
                engine._drop(seq)
        raise
    _finish_round(engine, steps)
    return out


def _decode(engine: Engine, batch: list[Unit], busy: set[int]) -> dict[int, np.ndarray]:
    """One llama_decode of the units' rows; the logits each finished unit's query wants."""
    rows = [r for unit in batch for r in unit.rows()]
    context = engine._ctx()
    while True:
        try:
            context.decode(rows)
            break
        except KVFullError:
            # Only a unified KV (fast mode) runs out of cells for a sequence that fits n_ctx.
            if not engine._evict(protected=busy):
                raise ContextOverflowError(
                    f"the KV cells are full with {len(engine._table)} live sequences: raise n_ctx"
                ) from None
    engine.stats.batches += 1
    engine.stats.tokens_evaluated += len(rows)
    engine.stats.peak_sequences = max(engine.stats.peak_sequences, len(batch))
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
            _checkpoint(engine, step, unit.hi)
        at += m
    return out


def _checkpoint(engine: Engine, step: Step, n: int) -> None:
    """Save the whole state of step.seq's first n tokens (it holds exactly those now)."""
    held = engine._table.find(step.seq)
    if held is not None:
        state = engine._ctx().state_bytes(step.seq)
        held.checkpoints.append((list(step.query.tokens[:n]), state))


def _finish_round(engine: Engine, steps: list[Step]) -> None:
    """Record what each sequence holds now and how much of it is reusable, and cache the
    queries that ask for it (Query.insert) once their prefill is done."""
    tick = engine._table.tick()
    chunk = engine.rules.chunk
    for step in steps:
        held = engine._table.get(step.seq)
        q = step.query
        held.tokens, held.last_used = list(q.tokens[: step.stop]), tick
        if not engine.exact:
            held.n_reusable = step.stop
        elif step.batches:
            # Cells from a batch shorter than b (a prompt shorter than b) are not exact to reuse.
            end = step.batches[-1][1]
            exact = chunk or end - step.start >= engine.exact_batch
            held.n_reusable = end if exact else step.start
        held.n_reusable = min(held.n_reusable, len(held.tokens))
        engine._table.report(held)
        # Its cells are now the lone evaluation of the query's prompt (and what it decoded)
        # once the prefill part is done; a prefill stopped short of it is not yet.
        held.prompt_end = q.n_prefill if step.stop >= q.n_prefill else -1
        held.pending += step.stop - step.start
        if step.batches and step.batches[-1][1] == q.n_prefill:
            insert = held.pending >= KEEP_MIN_TOKENS if q.insert is None else q.insert
            if insert and engine.cache is not None:
                engine.save(step.seq)
            held.pending = 0


__all__ = ["KEEP_MIN_TOKENS", "run_round"]
