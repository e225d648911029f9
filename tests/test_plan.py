"""The reuse plan without a model: conversations run on a simulated context, checked against the
README's "Exactness" rules and a brute-force search for the longest allowed reuse."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache.engines.llama_cpp.plan import Finish, LiveSequence, ReuseRules, common_prefix

# A simulated KV cell: (token, exact). Token-granular: a cell is exact when a batch of at least
# exact_batch tokens built it (README: such batches give the floats of one large batch); a generated
# token decoded alone, or a prompt shorter than exact_batch, builds inexact cells. Aligned schedule:
# a cell is exact when the batch that built it starts at a multiple of C and stays inside that chunk
# (the cold run's kernel call for it); a restore at a multiple of C needs every cell before it exact.
Cell = tuple[int, bool]


@st.composite
def rules(draw: st.DrawFn) -> ReuseRules:
    b, exact = draw(st.integers(2, 4)), draw(st.booleans())
    chunk = draw(st.sampled_from([0, 0, 2, 3, 5])) if exact else 0
    n_batch = draw(st.integers(max(2 * b, chunk), 10))
    return ReuseRules(
        exact_batch=b,
        exact=exact,
        may_reuse=True if chunk else draw(st.booleans()) if exact else True,
        splittable=draw(st.booleans()),
        n_batch=n_batch,
        chunk=chunk,
        max_checkpoints=draw(st.integers(1, 3)),
    )


def cell_is_exact(rules: ReuseRules, start: int, stop: int) -> bool:
    if rules.chunk:
        return start % rules.chunk == 0 and stop - start <= rules.chunk
    return stop - start >= rules.exact_batch


@st.composite
def turns(draw: st.DrawFn) -> list[dict]:
    """Prompts over a 3-token alphabet that often extend or branch from earlier ones."""
    out, history = [], [[]]
    for _ in range(draw(st.integers(1, 6))):
        base = draw(st.sampled_from(history))
        base = base[: draw(st.integers(0, len(base)))]
        prompt = base + draw(st.lists(st.integers(0, 2), min_size=0 if base else 1, max_size=12))
        history.append(prompt)
        out.append(
            {
                "prompt": prompt,
                "generated": draw(st.lists(st.integers(0, 2), max_size=5)),
                "keep_reply": draw(st.booleans()),
                "separator": draw(st.one_of(st.none(), st.lists(st.integers(0, 2), max_size=5))),
                "reset": draw(st.booleans()),
            }
        )
    return out


@dataclass
class Sim:
    """A context, a cache of whole states and a live sequence, driven the way llm.py drives them."""

    rules: ReuseRules
    caching: bool
    cells: list[Cell] = field(default_factory=list)
    live: LiveSequence = field(default_factory=LiveSequence)
    cache: dict[tuple[int, ...], list[Cell]] = field(default_factory=dict)
    checkpoints: list[tuple[tuple[int, ...], list[Cell]]] = field(default_factory=list)
    last_checkpoints: tuple[int, ...] = ()

    def lookup(self, prompt: list[int], limit: int, have: int) -> tuple[int, list[Cell]] | None:
        """Brute force over every entry: the longest prefix of `prompt` in (have, limit] it supplies
        (splittable: any prefix of an entry; else only a whole entry that is a prefix of the prompt),
        rounded down to a restore point."""
        best = None
        for tokens, cells in self.cache.items():
            k = self.rules.align(min(common_prefix(tokens, prompt), limit))
            if not self.rules.splittable and (k != len(tokens)):
                continue
            if k > have and (best is None or k > best[0]):
                best = (k, cells[:k])
        return best

    def decode(self, tokens: list[int], batches: tuple[tuple[int, int], ...]) -> None:
        for start, stop in batches:
            assert start == len(self.cells), "batches must continue the context"
            assert 0 < stop - start <= self.rules.n_batch
            self.cells += [(t, cell_is_exact(self.rules, start, stop)) for t in tokens[start:stop]]

    def prefill(self, prompt: list[int]) -> tuple[int, tuple[tuple[int, int], ...]]:
        r = self.rules
        reused, limit = r.live_reuse(self.live, prompt), r.limit(len(prompt))
        hit = self.lookup(prompt, limit, reused) if self.caching and limit > reused else None
        if hit is not None:
            reused, self.cells = hit[0], list(hit[1])
        else:
            self.cells = self.cells[:reused]
        self.live.set(prompt[:reused])
        plan = r.prefill(len(prompt), reused, caching=self.caching)
        assert plan.reused == reused
        self.checkpoints = []
        self.run(prompt, reused, plan.batches, plan.checkpoints)
        self.live.set(prompt, plan.n_reusable)
        self.last_checkpoints = plan.checkpoints
        return reused, plan.batches

    def run(self, tokens: list[int], start: int, batches, points) -> None:
        """Decode batches, saving the cells at each checkpoint (as LLM._evaluate does)."""
        assert set(points) <= {start} | {stop for _, stop in batches}
        if start in points:
            self.checkpoints.append((tuple(tokens[:start]), list(self.cells)))
        for batch in batches:
            self.decode(tokens, (batch,))
            if batch[1] in points:
                self.checkpoints.append((tuple(tokens[: batch[1]]), list(self.cells)))

    def generate(self, tokens: list[int]) -> None:
        for t in tokens:
            self.cells.append((t, False))  # decoded alone: never exact
            self.live.append(t, reusable=not self.rules.exact)

    def finish(self, prompt: list[int], target: list[int] | None, keep_reply: bool) -> Finish:
        r = self.rules
        finish = r.finish(prompt, self.live, target, keep_reply, caching=self.caching)
        self.cells = self.cells[: finish.kept]
        self.run(finish.tokens, finish.kept, finish.batches, finish.checkpoints)
        self.live.set(finish.tokens, finish.n_reusable)
        if self.caching and r.may_reuse:
            for tokens, cells in self.checkpoints:
                self.cache.setdefault(tokens, cells)
            n = len(self.live.tokens)
            whole = r.splittable or r.align(n) == n
            if whole and self.live.n_reusable == n:
                self.cache.setdefault(tuple(self.live.tokens), list(self.cells))
        return finish


def longest_allowed_reuse(sim: Sim, prompt: list[int]) -> int:
    """The oracle: the longest prefix that matches the live cells or a cached entry, made only of
    exact cells in exact mode, with at least exact_batch tokens left to evaluate; 0 where reuse is off."""
    r = sim.rules
    if not r.may_reuse:
        return 0
    limit = r.align(len(prompt) - 1) if r.chunk else max(0, len(prompt) - r.exact_batch)
    best = 0
    for k in range(min(limit, len(sim.cells)), 0, -1):
        if r.align(k) != k:
            continue
        cells = sim.cells[:k]
        if [t for t, _ in cells] == prompt[:k] and (not r.exact or all(e for _, e in cells)):
            best = k
            break
    if sim.caching:
        hit = sim.lookup(prompt, limit, best)
        best = hit[0] if hit else best
    return best


@settings(max_examples=400, deadline=None)
@given(rules(), turns(), st.booleans())
def test_conversations_follow_the_exactness_rules(rules, turns, caching):
    sim = Sim(rules, caching)
    b = rules.exact_batch
    for turn in turns:
        prompt = turn["prompt"]
        if turn["reset"]:
            sim.cells, sim.live = [], LiveSequence()
        expected = longest_allowed_reuse(sim, prompt)
        reused, batches = sim.prefill(prompt)
        n = len(prompt)
        assert reused == expected
        assert [t for t, _ in sim.cells] == prompt
        if rules.chunk:  # restore points and batch starts are multiples of C, within one chunk
            c = rules.chunk
            assert reused % c == 0 and n - reused >= 1 and n - reused <= c or reused < n - c
            assert all(start % c == 0 and stop - start <= c for start, stop in batches)
            assert all(exact for _, exact in sim.cells)  # the cold run's cells, bit for bit
            if caching and not rules.splittable:
                points = sim.last_checkpoints
                assert all(p % c == 0 and reused <= p <= n for p in points)
                assert len(points) <= rules.max_checkpoints
                if reused < rules.limit(n):  # the deepest restore point of a repeat is kept
                    assert rules.limit(n) in points
        else:
            assert reused == 0 or n - reused >= b  # at least b tokens evaluated after a restore
            if len(batches) > 1 or reused > 0:
                assert all(stop - start >= b for start, stop in batches)
            if rules.exact and n >= b:  # logits equal one batch over the whole prompt
                assert all(exact for _, exact in sim.cells)
            if caching and rules.may_reuse and not rules.splittable and n - b - reused >= b:
                assert sim.last_checkpoints[-1:] == (n - b,)
        sim.generate(turn["generated"])
        reply = prompt + turn["generated"]
        target = None if turn["separator"] is None else reply + turn["separator"]
        finish = sim.finish(prompt, target, turn["keep_reply"])
        assert [t for t, _ in sim.cells] == sim.live.tokens
        if rules.exact:  # never reuse generated tokens' KV: everything reusable is exact
            assert all(exact for _, exact in sim.cells[: sim.live.n_reusable])
            assert all(all(e for _, e in cells) for cells in sim.cache.values())
        if rules.chunk and not rules.splittable:  # whole states only at restore points
            assert all(len(tokens) % rules.chunk == 0 for tokens in sim.cache)
        if rules.chunk:
            kept = turn["keep_reply"] and turn["generated"]
            if target is not None and len(target) > n:
                assert finish.tokens == target and finish.kept == rules.align(n)
            elif kept:
                assert sim.live.tokens == reply and finish.kept == rules.align(n)
            else:
                assert sim.live.tokens == prompt
            continue
        read_ahead = (
            target is not None
            and rules.may_reuse
            and len(target) - n >= b
            and (n >= b or not rules.exact)
            and (rules.exact or turn["generated"])
        )
        if read_ahead:
            assert finish.tokens == target and sim.live.n_reusable == len(target)
        elif not rules.exact:
            assert sim.live.tokens == reply and sim.live.n_reusable == len(reply)
        elif turn["keep_reply"] and rules.may_reuse and n >= b and len(turn["generated"]) >= b:
            assert sim.live.tokens == reply and sim.live.n_reusable == len(reply)
        else:
            assert sim.live.tokens == prompt


@given(st.integers(1, 8), st.integers(16, 40), st.integers(0, 100), st.integers(0, 100))
def test_batches_cover_the_range_with_none_too_small(b, n_batch, start, m):
    rules = ReuseRules(exact_batch=b, n_batch=n_batch)
    batches = rules.batches(start, start + m)
    pos = start
    for s, e in batches:
        assert s == pos
        pos = e
    assert pos == start + m
    assert len(batches) == -(-m // n_batch)  # as few as n_batch allows
    assert all(0 < e - s <= n_batch for s, e in batches)
    if len(batches) > 1:
        assert all(e - s >= b for s, e in batches)


def test_the_limit_leaves_exact_batch_tokens_and_nothing_without_reuse():
    assert ReuseRules(exact_batch=2).limit(10) == 8
    assert ReuseRules(exact_batch=8).limit(5) == 0
    with pytest.raises(ValueError):
        ReuseRules(exact_batch=4, n_batch=7)  # a short last batch could not borrow enough
    with pytest.raises(ValueError):
        ReuseRules(exact=False, may_reuse=False)
    assert ReuseRules(exact_batch=2, may_reuse=False).limit(10) == 0
    with pytest.raises(ValueError):
        ReuseRules(exact_batch=2).prefill(10, 9, caching=True)


def test_a_read_ahead_must_extend_the_prompt_by_exact_batch():
    r = ReuseRules(exact_batch=2)
    assert r.next_turn([1, 2], [1, 2, 3]) is None
    assert r.next_turn([1, 2], [1, 9, 3, 4]) is None
    assert r.next_turn([1, 2], [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert r.next_turn([1, 2], None) is None


def test_live_sequence_keeps_its_reusable_part_a_prefix():
    live = LiveSequence([1, 2, 3], 3)
    live.append(4, reusable=False)
    live.append(5, reusable=True)  # after an unreusable token nothing more is reusable
    assert live.tokens == [1, 2, 3, 4, 5] and live.reusable == [1, 2, 3]
    live.set([7, 8])
    assert live.n_reusable == 2
    with pytest.raises(ValueError):
        LiveSequence([1], 2)
    with pytest.raises(ValueError):
        live.set([1], 3)


@given(st.integers(1, 16), st.integers(0, 100), st.integers(0, 100))
def test_aligned_batches_are_the_cold_runs_chunks_and_restores_lose_less_than_a_chunk(c, a, m):
    rules = ReuseRules(chunk=c, n_batch=max(c, 4))
    start = rules.align(a)
    stop = start + m
    batches = rules.batches(start, stop)
    cold = rules.batches(0, stop)
    assert [b for b in cold if b[0] >= start] == list(batches)  # the same kernel calls as cold
    n = stop
    if n:
        limit = rules.limit(n)
        assert limit % c == 0 and n - c <= limit < n


def test_aligned_rules_validate_and_name_their_strategy():
    assert ReuseRules(chunk=4).strategy == "aligned"
    assert ReuseRules().strategy == "token"
    assert ReuseRules(may_reuse=False).strategy == "none"
    assert ReuseRules(exact=False).strategy == "fast"
    with pytest.raises(ValueError):
        ReuseRules(chunk=4, exact=False)  # fast mode reuses as decoded
    with pytest.raises(ValueError):
        ReuseRules(chunk=1024, n_batch=512)
    with pytest.raises(ValueError):
        ReuseRules(chunk=4).prefill(10, 6, caching=True)  # 6 is no restore point
    plan = ReuseRules(chunk=4, splittable=False, max_checkpoints=2).prefill(19, 4, caching=True)
    assert plan.batches == ((4, 8), (8, 12), (12, 16), (16, 19)) and plan.checkpoints == (12, 16)
