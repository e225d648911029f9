"""The reuse plan: what of a prompt to restore, what to evaluate in which batches, what to re-read.

Owns the rules of the README's "Exactness" section as pure functions over token lists and lengths;
never touches llama.cpp, a context or a cache (llm.py carries a plan out, cache.py finds hits).
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
    tokens (or, in fast mode, any cell). Generated tokens, decoded one at a time, lie past it in exact mode.
    """

    tokens: list[int] = field(default_factory=list)
    n_reusable: int = 0

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
class Prefill:
    """How to bring a context to an n-token prompt: keep or restore `reused` tokens, then decode
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


@dataclass(frozen=True)
class Finish:
    """What the live sequence becomes after a reply: drop every cell from `keep` on, decode
    `tokens[keep:]` in `batches`, then hold `tokens` with `n_reusable` of them reusable; save whole
    states at `checkpoints` as Prefill does."""

    keep: int
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
            whole = caching and not self.splittable  # (a state ending at n is cached whole)
            points = self.checkpoints(reused, limit) if whole else ()
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
        keep = self.align(p)
        points = (
            self.checkpoints(keep + 1, self.limit(len(read)))[-1:]
            if caching and not self.splittable
            else ()
        )
        return Finish(keep, read, len(read), self.batches(keep, len(read)), points)


__all__ = [
    "LiveSequence",
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
