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
    `batches` ((start, stop) token ranges, in order, covering [reused, n)). With `checkpoint`, save
    a whole state once the batches reach that position (it may equal `reused`: save before decoding).
    `n_reusable`: how many of the prompt's cells a later prompt may reuse (0 in exact mode for a
    prompt shorter than exact_batch: its one batch is too small to match a larger one)."""

    reused: int
    batches: tuple[tuple[int, int], ...]
    n_reusable: int
    checkpoint: int | None = None


@dataclass(frozen=True)
class Finish:
    """What the live sequence becomes after a reply: drop every cell from `keep` on, decode
    `tokens[keep:]` in `batches`, then hold `tokens` with `n_reusable` of them reusable."""

    keep: int
    tokens: list[int]
    n_reusable: int
    batches: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class ReuseRules:
    """The reuse rules for one model, machine and mode (README, "Exactness").

    exact_batch: b, the smallest batch whose floats match one large batch (the probe measures it).
    exact: exact mode; generated tokens' KV (decoded one at a time) is never reused as it is.
    may_reuse: False only in exact mode where the probe found no exact batch: then nothing is reused.
    splittable: states can be cut at any token; otherwise whole states, with a checkpoint at n - b.
    n_batch: the largest batch the context takes (at least 2 * exact_batch).
    """

    exact_batch: int = 2
    exact: bool = True
    may_reuse: bool = True
    splittable: bool = True
    n_batch: int = 512

    def __post_init__(self) -> None:
        if self.exact_batch < 1 or self.n_batch < 2 * self.exact_batch:
            raise ValueError(
                "need 1 <= exact_batch <= n_batch / 2 (a short last batch borrows from the one before)"
            )
        if not (self.may_reuse or self.exact):
            raise ValueError("fast mode always reuses: may_reuse=False needs exact=True")

    def limit(self, n: int) -> int:
        """The longest prefix of an n-token prompt that may be restored: at least b tokens are
        evaluated after a restore, and nothing is restored where reuse is not allowed."""
        return max(0, n - self.exact_batch) if self.may_reuse else 0

    def live_reuse(self, live: LiveSequence, prompt: Sequence[int]) -> int:
        """How much of `prompt` the live sequence supplies: its reusable part, up to the limit."""
        return min(common_prefix(live.reusable, prompt), self.limit(len(prompt)))

    def batches(self, start: int, stop: int) -> tuple[tuple[int, int], ...]:
        """(start, stop) ranges for decoding tokens [start, stop): at most n_batch each, and where
        there is more than one, none smaller than exact_batch (the last one borrows from the one before)."""
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

    def prefill(self, n: int, reused: int, *, caching: bool) -> Prefill:
        """Decode [reused, n). A state that cannot be cut later gets a checkpoint at n - b now (as
        llama-server's context checkpoints), so a repeat of this prompt restores it; both parts are
        then at least b tokens, or the checkpoint is the restored state itself."""
        limit = self.limit(n)
        if not 0 <= reused <= limit:
            raise ValueError(f"cannot reuse {reused} of {n} tokens: at most {limit}")
        n_reusable = n if n >= self.exact_batch or not self.exact else 0
        if (
            caching
            and not self.splittable
            and (limit - reused >= self.exact_batch or limit == reused > 0)
        ):
            batches = self.batches(reused, limit) + self.batches(limit, n)
            return Prefill(reused, batches, n_reusable, checkpoint=limit)
        return Prefill(reused, self.batches(reused, n), n_reusable)

    def next_turn(self, prompt: Sequence[int], target: Sequence[int] | None) -> list[int] | None:
        """`target` (what every next turn of a chat starts with) if it may be read ahead: it extends
        the prompt by at least b tokens; else None."""
        if target is None or len(target) - len(prompt) < self.exact_batch:
            return None
        return list(target) if common_prefix(target, prompt) == len(prompt) else None

    def finish(
        self,
        prompt: Sequence[int],
        live: LiveSequence,
        target: Sequence[int] | None,
        keep_reply: bool,
    ) -> Finish:
        """The live sequence after a reply to `prompt` (live holds the prompt, then generated tokens).

        With a next-turn `target`, it is read as batches in place of the reply (in fast mode only if
        tokens were generated). Otherwise exact mode drops the generated cells, or with keep_reply
        re-reads them as batches when there are at least b; fast mode keeps everything as it is.
        """
        p, tokens = len(prompt), live.tokens
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


__all__ = ["LiveSequence", "ReuseRules", "Prefill", "Finish", "common_prefix"]
