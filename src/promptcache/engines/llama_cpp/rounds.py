"""Rounds: one engine round's steps (which sequence evaluates which tokens) and the llama_decode batches
they become.

Owns how the rows of several sequences are packed into batches so that each sequence's logits stay
those of the sequence alone (the probe measures which shapes do: decode_group, group_rows); never
chooses sequences or reuse (engine.py and plan.py do) and never calls llama.cpp itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from promptcache.engines.llama_cpp.plan import Query

Row = tuple[int, int, int, bool]  # token, position, sequence, logits wanted


@dataclass
class Step:
    """One query's part of a round: sequence `seq` (forked from `fork`'s first `start` tokens when fork
    is not None, or cut back to `start` tokens when `cut`) evaluates `batches` ((lo, hi) ranges of the
    query's prefill part) and then, when `decode` is set, the token at position `decode` alone.
    `checkpoints`: positions after which a whole state is saved. `source`/`reused`: where the tokens
    it started from came from (live, memory, disk, redis, none) and how many; `restore_ms`: the cache
    lookup and state load that fed it (0 unless restored)."""

    index: int
    query: Query
    seq: int
    start: int
    batches: tuple[tuple[int, int], ...] = ()
    decode: int | None = None
    fork: int | None = None
    cut: bool = False
    source: str = "none"
    reused: int = 0
    restore_ms: float = 0.0
    checkpoints: tuple[int, ...] = ()
    rows: list[tuple[int, object]] = field(
        default_factory=list
    )  # (first position, logits) per batch

    @property
    def stop(self) -> int:
        """Tokens the sequence holds after the round."""
        if self.decode is not None:
            return self.decode + 1
        return self.batches[-1][1] if self.batches else self.start

    @property
    def done(self) -> bool:
        """Whether the round reaches the query's last token (its logits come out of it)."""
        return self.stop == len(self.query.tokens)


@dataclass(frozen=True)
class Unit:
    """Rows of one step that must be one llama_decode's share for that sequence."""

    step: Step
    lo: int
    hi: int

    def rows(self) -> list[Row]:
        step, q = self.step, self.step.query
        last = len(q.tokens) - 1
        want_all = q.rows and self.hi <= q.n_prefill
        return [
            (q.tokens[p], p, step.seq, want_all or (p == last and q.logits))
            for p in range(self.lo, self.hi)
        ]


def waves(steps: list[Step]) -> list[list[Unit]]:
    """The prefill batches of every step in order: wave k holds each step's k-th batch (a sequence's
    batches run one after another; different sequences' batches of one wave may share a decode)."""
    out: list[list[Unit]] = []
    for step in steps:
        for k, (lo, hi) in enumerate(step.batches):
            while len(out) <= k:
                out.append([])
            out[k].append(Unit(step, lo, hi))
    return out


def pack(
    units: list[Unit], *, n_batch: int, decode_group: int, group_rows: int, exact: bool
) -> list[list[Unit]]:
    """Units of different sequences packed into llama_decode batches of at most n_batch rows.

    Fast mode packs freely (a unified KV splits batches simply; its logits are not promised exact).
    Exact mode: one-row units share a batch with at most decode_group - 1 others (the probe found
    those shapes keep each row's logits); units of m > 1 rows share one only with units of the same
    m, and only where group_rows divides m (other sizes changed with their neighbours on gemma3);
    everything else runs alone. Equal rows per sequence also keep llama.cpp from splitting a batch
    of several KV streams into sub-batches of unequal shares (split_equal)."""
    if not exact:
        out: list[list[Unit]] = [[]]
        used = 0
        for unit in units:
            m = unit.hi - unit.lo
            if used + m > n_batch and out[-1]:
                out.append([])
                used = 0
            out[-1].append(unit)
            used += m
        return [b for b in out if b]
    by_size: dict[int, list[Unit]] = {}
    for unit in units:
        by_size.setdefault(unit.hi - unit.lo, []).append(unit)
    batches: list[list[Unit]] = []
    for m, same in sorted(by_size.items()):
        if m == 1:
            per = max(1, decode_group)
        elif group_rows and m % group_rows == 0:
            per = max(1, n_batch // m)
        else:
            per = 1
        batches += [same[i : i + per] for i in range(0, len(same), per)]
    return batches


__all__ = ["Row", "Step", "Unit", "pack", "waves"]
