"""Sequences: which tokens each llama.cpp sequence id of an engine holds, and which one a query reuses.

Owns the table of live sequences (tokens, how many are reusable, recency, pins, pending checkpoints),
finding the live sequence a query reuses most of, picking a sequence id to free (least recently
used first), and telling listeners (holdings.py) which reusable prefixes it holds as they change.
Never calls llama.cpp (the engine drops and copies cells) and never touches a cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from promptcache.engines.llama_cpp.plan import LiveSequence, Query, ReuseRules, common_prefix
from promptcache.holdings import HoldingsListener

_table_names = itertools.count()


@dataclass
class Held(LiveSequence):
    """One live sequence: its tokens and reusable part (LiveSequence), when it was last used, whether
    it is pinned (never evicted nor extended in place: queries fork from it), tokens evaluated since
    the engine last decided whether to cache it, and whole-state checkpoints saved while evaluating
    it that are not in the prefix cache yet ((tokens, state) pairs)."""

    seq_id: int = 0
    last_used: int = 0
    pinned: bool = False
    pending: int = 0
    checkpoints: list[tuple[list[int], bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class Match:
    """The live sequence a query reuses most of, how many tokens, and whether all of the sequence
    is a prefix of the query (it can be extended in place)."""

    held: Held | None = None
    reused: int = 0
    whole: bool = False


@dataclass
class _Listening:
    """One listener, the token granularity it hears at, and the prefix it last heard per sequence."""

    listener: HoldingsListener
    granularity: int
    heard: dict[int, list[int]] = field(default_factory=dict)


class SequenceTable:
    """The live sequences of a context of `n_seq` sequence ids. Listeners hear each sequence's
    reusable prefix (holder: (the table's name, the sequence id)) whenever the table adds, removes
    or clears one, and whenever the engine reports that it changed what one holds (report())."""

    def __init__(self, n_seq: int) -> None:
        self.n_seq = n_seq
        self.name = next(_table_names)  # tells the holders of several tables apart
        self._held: dict[int, Held] = {}
        self._tick = 0
        self._listening: list[_Listening] = []

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._held

    def __iter__(self) -> Iterator[Held]:
        return iter(list(self._held.values()))

    def tick(self) -> int:
        """A new recency stamp (larger is more recent)."""
        self._tick += 1
        return self._tick

    def get(self, seq_id: int) -> Held:
        """The live sequence `seq_id`. Raises ValueError when there is none."""
        held = self._held.get(seq_id)
        if held is None:
            raise ValueError(f"no live sequence {seq_id}; live: {sorted(self._held)}")
        return held

    def find(self, seq_id: int | None) -> Held | None:
        return self._held.get(seq_id) if seq_id is not None else None

    def add(self, seq_id: int, tokens: list[int], n_reusable: int | None = None) -> Held:
        """Record that `seq_id` holds `tokens` (all reusable unless n_reusable says fewer)."""
        n = len(tokens) if n_reusable is None else n_reusable
        held = Held(list(tokens), n, seq_id=seq_id, last_used=self.tick())
        self._held[seq_id] = held
        self.report(held)
        return held

    def remove(self, seq_id: int) -> Held | None:
        held = self._held.pop(seq_id, None)
        self._tell(seq_id, [])
        return held

    def clear(self) -> None:
        for seq_id in list(self._held):
            self.remove(seq_id)

    # ------------------------------------------------------------ listeners

    def listen(self, listener: HoldingsListener, granularity: int = 1) -> None:
        """Tell `listener` each sequence's reusable prefix, cut to a multiple of `granularity`
        tokens (so that decoding one token at a time is heard once a block), now and on every
        change."""
        if not isinstance(granularity, int) or granularity < 1:
            raise ValueError("granularity must be an int >= 1")
        self._listening.append(_Listening(listener, granularity))
        for held in self._held.values():
            self.report(held)

    def report(self, held: Held) -> None:
        """The engine changed what `held` holds (its tokens or reusable part): tell the listeners
        whose view of it changed. Costs one list comparison per listener when nothing did."""
        for listening in self._listening:
            n = held.n_reusable // listening.granularity * listening.granularity
            heard = listening.heard.get(held.seq_id)
            if heard is not None and len(heard) == n and held.tokens[:n] == heard:
                continue
            self._tell_one(listening, held.seq_id, held.tokens[:n])

    def _tell(self, seq_id: int, tokens: list[int]) -> None:
        for listening in self._listening:
            self._tell_one(listening, seq_id, tokens)

    def _tell_one(self, listening: _Listening, seq_id: int, tokens: list[int]) -> None:
        if tokens:
            listening.heard[seq_id] = tokens
        elif listening.heard.pop(seq_id, None) is None:
            return  # it held nothing heard: nothing to release
        listening.listener.holds((self.name, seq_id), tuple(tokens))

    def free_id(self) -> int | None:
        """A sequence id no live sequence uses, or None when all are taken."""
        return next((i for i in range(self.n_seq) if i not in self._held), None)

    def victim(self, protected: Iterable[int]) -> Held | None:
        """The least recently used sequence that is neither pinned nor in `protected`."""
        kept = set(protected)
        victims = [h for h in self._held.values() if h.seq_id not in kept and not h.pinned]
        return min(victims, key=lambda h: h.last_used) if victims else None

    def best(
        self, query: Query, rules: ReuseRules, claimed: set[int], *, shares: bool = True
    ) -> Match:
        """The live sequence `query` reuses most of. The hinted sequence, when the query extends it,
        is taken without a search; otherwise every sequence is compared, preferring (after the most
        reuse) one free to extend in place, one the query extends, one not pinned."""
        if not shares:
            return Match()
        held = self.find(query.hint)
        tokens = query.tokens
        if (
            held is not None
            and held.seq_id not in claimed
            and 0 < len(held.tokens) <= len(tokens)
            and held.tokens[-1] == tokens[len(held.tokens) - 1]
            and held.tokens == tokens[: len(held.tokens)]
        ):
            return Match(held, rules.reuse(held, query), True)
        best, rank = Match(), (0, False, False, False)
        for held in self._held.values():
            common = common_prefix(held.tokens, tokens)
            whole = common == len(held.tokens)
            n = rules.reuse(held, query)
            candidate = (n, held.seq_id not in claimed, whole, not held.pinned)
            if n and candidate > rank:
                best, rank = Match(held, n, whole), candidate
        return best

    def snapshot(self) -> dict[int, tuple[int, ...]]:
        """Live sequence ids and the tokens whose KV each holds."""
        return {h.seq_id: tuple(h.tokens) for h in self._held.values()}


__all__ = ["Held", "Match", "SequenceTable"]
