"""The reuse plan: what of a prompt to restore, what to evaluate in which batches, what to re-read.

Owns the rules of the README's "Exactness" section as pure functions over token lists and lengths;
never touches llama.cpp, a context or a cache (engine.py carries a plan out, cache/ finds hits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    return int(np.argmax(differ)) if differ.any() else n


@dataclass
class LiveSequence:
    """The tokens whose KV the context's sequence holds, in order, and how many of the first of them
    a later prompt may reuse: `n_reusable` counts the cells built by batches of at least exact_batch
    tokens (or, in fast mode, any cell). Generated tokens, decoded one at a time, lie past it in exact
    mode. `prompt_end`: the prompt length whose lone evaluation the first cells are, the decoded ones
    following it (the same generation may go on here), or -1 when the cells are no such thing.
    """

    tokens: list[int] = field(default_factory=list)
    n_reusable: int = 0
    prompt_end: int = -1

    def __post_init__(self) -> None:
        if not 0 <= self.n_reusable <= len(self.tokens):
            raise ValueError(
                f"n_reusable must be in [0, {len(self.tokens)}], not {self.n_reusable}"
            )

    def set(self, tokens: Sequence[int], n_reusable: int | None = None) -> None:
        """Hold `tokens` (all reusable unless n_reusable says fewer)."""
        tokens = list(tokens)
        n = len(tokens) if n_reusable is None else n_reusable
        if not 0 <= n <= len(tokens):
            raise ValueError(f"n_reusable must be in [0, {len(tokens)}], not {n}")
        self.tokens, self.n_reusable = tokens, n

    def clear(self) -> None:
        self.tokens, self.n_reusable = [], 0

    def append(self, token: int, *, reusable: bool) -> None:
        """One decoded token; it extends the reusable part only if that part reaches the end."""
        if reusable and self.n_reusable == len(self.tokens):
            self.n_reusable += 1
        self.tokens.append(token)

    @property
    def reusable(self) -> list[int]:
        return self.tokens[: self.n_reusable]


@dataclass(frozen=True)
class Query:
    """What a caller asks of the engine for one token list: tokens[:n_prefill] evaluated as an uncached
    prefill evaluates them (batches of at least exact_batch, or the aligned schedule's chunks), then each
    further token decoded alone as generation decodes it (one row per sequence, README "Exactness"), and
    the logits after the last token. So a generation step is the prompt and the tokens generated so far,
    with n_prefill the prompt's length, and its answer never depends on caching or on the batch.

    logits: whether the logits after the last token are wanted (a reply's re-read wants none).
    rows: every evaluated position's logits too (prompt log-probabilities; no cached prefix is used
    past max_reuse). hint: the sequence that held this list's prefix last round (skips a search).
    insert: put the state in the prefix cache once evaluated (None: when a query evaluated at least
    KEEP_MIN_TOKENS at once). max_checkpoints: whole-state checkpoints at most (default the rules').
    """

    tokens: list[int]
    n_prefill: int = -1  # -1: every token
    logits: bool = True
    rows: bool = False
    max_reuse: int | None = None
    hint: int | None = None
    insert: bool | None = None
    max_checkpoints: int | None = None

    def __post_init__(self) -> None:
        if self.n_prefill < 0:
            object.__setattr__(self, "n_prefill", len(self.tokens))
        if not 0 < self.n_prefill <= len(self.tokens):
            raise ValueError(f"n_prefill must be in [1, {len(self.tokens)}], not {self.n_prefill}")

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """Two queries with equal keys get the same answer (one evaluation serves both)."""
        return tuple(self.tokens), self.n_prefill

    @property
    def decodes(self) -> int:
        """Tokens decoded one row each after the prefill part."""
        return len(self.tokens) - self.n_prefill


@dataclass(frozen=True)
class Prefill:
    """How to bring a context to an n-token prompt: hold or restore `reused` tokens, then decode
    `batches` ((start, stop) token ranges, in order, covering [reused, n)). At each of
    `checkpoints` (ascending, each `reused` or a batch's stop), save a whole state once the batches
    reach that position (at `reused`: before decoding).
    `n_reusable`: how many of the prompt's cells a later prompt may reuse (0 in exact mode for a
    prompt shorter than exact_batch: its one batch is too small to match a larger one)."""

    reused: int
    batches: tuple[tuple[int, int], ...]
    n_reusable: int
    checkpoints: tuple[int, ...] = ()

    @property
    def checkpoint(self) -> int | None:
        """The deepest checkpoint, if any."""
        return self.checkpoints[-1] if self.checkpoints else None

    def until(self, stop: int, least: int) -> Prefill:
        """The part of this prefill a round evaluates when it stops at `stop` (ReuseRules.budget_stop):
        the batches up to it, a batch it falls inside cut there if that leaves at least `least`
        rows (else left for the next round), and the checkpoints they reach."""
        batches = []
        for lo, hi in self.batches:
            if hi <= stop:
                batches.append((lo, hi))
            elif lo < stop and stop - lo >= least:
                batches.append((lo, stop))
        end = batches[-1][1] if batches else self.reused
        points = tuple(c for c in self.checkpoints if c <= end)
        return Prefill(self.reused, tuple(batches), self.n_reusable, points)


@dataclass(frozen=True)
class Finish:
    """What the live sequence becomes after a reply: drop every cell from `kept` on, decode
    `tokens[kept:]` in `batches`, then hold `tokens` with `n_reusable` of them reusable; save whole
    states at `checkpoints` as Prefill does."""

    kept: int
    tokens: list[int]
    n_reusable: int
    batches: tuple[tuple[int, int], ...] = ()
    checkpoints: tuple[int, ...] = ()


MAX_CHECKPOINTS = 3
"""Whole-state checkpoints one prefill keeps on the aligned schedule: the deepest multiple of C a
repeat restores, and the two before it, so a prompt that changes only its last 2C to 3C tokens (a new
question after a shared document) still restores all but those. A gemma3-270m checkpoint costs
about 18 KB per token of KV (README, "Exactness"), so more would multiply memory for rarer hits."""


@dataclass(frozen=True)
class ReuseRules:
    """The reuse rules for one model, machine and mode (README, "Exactness").

    exact_batch: b, the smallest batch whose floats match one large batch (the probe measures it).
    exact: exact mode; generated tokens' KV (decoded one at a time) is never reused as it is.
    may_reuse: False only in exact mode where neither strategy applies: then nothing is reused.
    splittable: states can be cut at any token; otherwise whole states, with checkpoints.
    n_batch: the largest batch the context takes (at least 2 * exact_batch).
    chunk: C > 0 selects the aligned schedule (exact mode only): every prompt, cached or not, is
    evaluated in chunks [0, C), [C, 2C), ... and restored only at a multiple of C, so a cached run
    repeats the cold run's kernel calls exactly; 0 selects token-granular reuse (needs exact_batch).
    """

    exact_batch: int = 2
    exact: bool = True
    may_reuse: bool = True
    splittable: bool = True
    n_batch: int = 512
    chunk: int = 0
    max_checkpoints: int = MAX_CHECKPOINTS

    def __post_init__(self) -> None:
        if self.exact_batch < 1 or self.n_batch < 2 * self.exact_batch:
            raise ValueError(
                "need 1 <= exact_batch <= n_batch / 2 (a short last batch borrows from the one before)"
            )
        if not (self.may_reuse or self.exact):
            raise ValueError("fast mode always reuses: may_reuse=False needs exact=True")
        if self.chunk and not (self.exact and 0 < self.chunk <= self.n_batch):
            raise ValueError(
                "chunk (the aligned schedule) needs exact=True and 0 < chunk <= n_batch"
            )
        if self.max_checkpoints < 1:
            raise ValueError("max_checkpoints must be at least 1")

    @property
    def strategy(self) -> str:
        """ "aligned" (chunks at multiples of C), "token" (token-granular), "fast" (exact=False) or
        "none" (exact mode with no exact strategy: nothing is reused)."""
        if not self.exact:
            return "fast"
        if self.chunk:
            return "aligned"
        return "token" if self.may_reuse else "none"

    def align(self, n: int) -> int:
        """n rounded down to a restore point: a multiple of C on the aligned schedule, else n."""
        return n - n % self.chunk if self.chunk else n

    def limit(self, n: int) -> int:
        """The longest prefix of an n-token prompt that may be restored: at least b tokens are
        evaluated after a restore (aligned: at least one, from a multiple of C), and nothing is
        restored where reuse is not allowed."""
        if not self.may_reuse:
            return 0
        if self.chunk:
            return self.align(n - 1) if n else 0
        return max(0, n - self.exact_batch)

    def live_reuse(self, live: LiveSequence, prompt: Sequence[int]) -> int:
        """How much of `prompt` the live sequence supplies: its reusable part, up to the limit."""
        return self.align(min(common_prefix(live.reusable, prompt), self.limit(len(prompt))))

    def reuse(self, live: LiveSequence, query: Query) -> int:
        """How many of `query`'s tokens the live sequence supplies, exactly.

        A sequence holding a prompt's lone evaluation and the tokens decoded after it (prompt_end)
        supplies all of it to the same generation one step further. Otherwise the
        reusable part counts, up to a cap: with logits wanted after a prefill, the limit (at least b
        tokens evaluated again); for a query that decodes or wants no logits, its whole prefill part,
        but where some of it is evaluated, at least b tokens (token strategy). Then max_reuse, and a
        restore point (aligned: a multiple of C)."""
        common = common_prefix(live.tokens, query.tokens)
        p = query.n_prefill
        same_run = live.prompt_end == p <= len(live.tokens) == common < len(query.tokens)
        if same_run and query.max_reuse is None:
            return common
        return self.capped(min(common, live.n_reusable), query)

    def capped(self, n: int, query: Query) -> int:
        """n tokens of `query` supplied by a live sequence or the cache, cut to what may be reused
        (see reuse)."""
        if not self.may_reuse:
            return 0
        p = query.n_prefill
        cap = p if query.decodes or not query.logits else self.limit(p)
        n = min(n, cap, len(query.tokens) if query.max_reuse is None else query.max_reuse)
        if self.chunk:
            return self.align(n)
        if self.exact and 0 < p - n < self.exact_batch:
            n = max(0, p - self.exact_batch)
        return max(0, n)

    def budget_stop(self, start: int, stop: int, budget: int | None) -> int:
        """Where a round evaluating [start, stop) of a prefill stops with `budget` tokens a round:
        leaving at least b for a later round (token), at a multiple of C, at least the next (aligned)."""
        if budget is None or stop - start <= budget:
            return stop
        if self.chunk:
            return min(max(self.align(start + budget), self.align(start) + self.chunk), stop)
        return start + max(1, min(budget, stop - start - self.exact_batch))

    def batches(self, start: int, stop: int) -> tuple[tuple[int, int], ...]:
        """(start, stop) ranges for decoding tokens [start, stop). Aligned: cut at every multiple of
        C. Otherwise at most n_batch each, and where there is more than one, none smaller than
        exact_batch (the last one borrows from the one before)."""
        if self.chunk:
            cuts = range(self.align(start) + self.chunk, stop, self.chunk)
            bounds = [start, *cuts, stop] if stop > start else [start]
            return tuple(zip(bounds, bounds[1:]))
        m = stop - start
        sizes = [self.n_batch] * (m // self.n_batch) + (
            [m % self.n_batch] if m % self.n_batch else []
        )
        if len(sizes) > 1 and sizes[-1] < self.exact_batch:
            sizes[-2] -= self.exact_batch - sizes[-1]
            sizes[-1] = self.exact_batch
        out, pos = [], start
        for size in sizes:
            out.append((pos, pos + size))
            pos += size
        return tuple(out)

    def checkpoints(self, low: int, high: int) -> tuple[int, ...]:
        """Aligned whole-state checkpoints for states built over [low, high]: the deepest
        max_checkpoints multiples of C in that range (none below C)."""
        points = range(self.align(high), max(low, 1) - 1, -self.chunk)
        return tuple(sorted(points[: self.max_checkpoints]))

    def prefill(self, n: int, reused: int, *, caching: bool) -> Prefill:
        """Decode [reused, n). A state that cannot be cut later gets checkpoints now (as
        llama-server's context checkpoints), so a repeat of this prompt restores one: aligned, at
        the last multiples of C before n; token-granular, at n - b (both parts then at least b
        tokens, or the checkpoint is the restored state itself)."""
        limit = self.limit(n)
        if not 0 <= reused <= limit or self.align(reused) != reused:
            raise ValueError(
                f"cannot reuse {reused} of {n} tokens: at most {limit}, a restore point"
            )
        if self.chunk:
            checkpointing = caching and not self.splittable  # a state ending at n is cached whole
            points = self.checkpoints(reused, limit) if checkpointing else ()
            return Prefill(reused, self.batches(reused, n), n, points)
        n_reusable = n if n >= self.exact_batch or not self.exact else 0
        if (
            caching
            and not self.splittable
            and (limit - reused >= self.exact_batch or limit == reused > 0)
        ):
            batches = self.batches(reused, limit) + self.batches(limit, n)
            return Prefill(reused, batches, n_reusable, (limit,))
        return Prefill(reused, self.batches(reused, n), n_reusable)

    def next_turn(self, prompt: Sequence[int], target: Sequence[int] | None) -> list[int] | None:
        """`target` (what every next turn of a chat starts with) if it may be read ahead: it extends
        the prompt by at least b tokens (aligned: by at least one); else None."""
        least = 1 if self.chunk else self.exact_batch
        if target is None or len(target) - len(prompt) < least:
            return None
        return list(target) if common_prefix(target, prompt) == len(prompt) else None

    def finish(
        self,
        prompt: Sequence[int],
        live: LiveSequence,
        target: Sequence[int] | None,
        keep_reply: bool,
        *,
        caching: bool = False,
    ) -> Finish:
        """The live sequence after a reply to `prompt` (live holds the prompt, then generated tokens).

        With a next-turn `target`, it is read as batches in place of the reply (in fast mode only if
        tokens were generated). Otherwise exact mode drops the generated cells, or with keep_reply
        re-reads them as batches when there are at least b; fast mode keeps everything as it is.
        On the aligned schedule the re-read starts at the last multiple of C at or before the reply
        (the cold run of the next turn has a chunk there), and with `caching` a state that cannot
        be cut is saved at the last multiple of C it reaches.
        """
        p, tokens = len(prompt), live.tokens
        if self.chunk:
            return self._finish_aligned(prompt, live, target, keep_reply, caching)
        if self.exact and live.n_reusable < p:  # an unreusable prompt makes its reply unreusable
            return Finish(p, list(tokens[:p]), live.n_reusable)
        target = self.next_turn(prompt, target) if self.may_reuse else None
        if target is not None and (self.exact or len(tokens) > p):
            return Finish(p, target, len(target), self.batches(p, len(target)))
        if self.exact and len(tokens) > p:
            if keep_reply and self.may_reuse and len(tokens) - p >= self.exact_batch:
                return Finish(p, list(tokens), len(tokens), self.batches(p, len(tokens)))
            return Finish(p, list(tokens[:p]), p)
        return Finish(len(tokens), list(tokens), live.n_reusable)

    def _finish_aligned(
        self,
        prompt: Sequence[int],
        live: LiveSequence,
        target: Sequence[int] | None,
        keep_reply: bool,
        caching: bool,
    ) -> Finish:
        p, tokens = len(prompt), live.tokens
        if live.n_reusable < p:
            return Finish(p, list(tokens[:p]), live.n_reusable)
        read = self.next_turn(prompt, target)
        if read is None and keep_reply and len(tokens) > p:
            read = list(tokens)
        if read is None:
            return Finish(p, list(tokens[:p]), p)
        kept = self.align(p)
        points = (
            self.checkpoints(kept + 1, self.limit(len(read)))[-1:]
            if caching and not self.splittable
            else ()
        )
        return Finish(kept, read, len(read), self.batches(kept, len(read)), points)


__all__ = [
    "LiveSequence",
    "Query",
    "ReuseRules",
    "Prefill",
    "Finish",
    "common_prefix",
    "check_token_ids",
    "MAX_CHECKPOINTS",
]


def check_token_ids(tokens: Sequence[int], n_vocab: int, what: str = "the prompt") -> list[int]:
    """`tokens` as a list of ints in [0, n_vocab). Raises TypeError for a str, bytes or non-sequence
    and ValueError for an empty list or an id out of range."""
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise TypeError(f"{what} must be a sequence of int token ids")
    out = [int(t) for t in tokens]
    if not out:
        raise ValueError(f"{what} is empty: give at least one token")
    if min(out) < 0 or max(out) >= n_vocab:
        raise ValueError(f"token ids must be in [0, {n_vocab})")
    return out
