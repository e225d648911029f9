"""PrefixMemo against a brute-force oracle: deepest kept prefix (aliases cut), byte bound, seen_twice, clear."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from conftest import WIDTH, synthetic_state
from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache import keys as K
from promptcache.codec import FixedWidthCodec
from promptcache.memo import MEMO_ALIAS_EVERY, PrefixMemo

FP = "model-a"
CODEC = FixedWidthCodec(WIDTH)


def block_keys(tokens: list[int], block_size: int) -> list[str]:
    """The keys of the full blocks of `tokens`, as PromptCache names them (a hash chain)."""
    n = len(tokens) // block_size
    chain = K.block_keys(FP, K.token_bytes(tokens), block_size, n)
    return ["kv-" + k.hex() for k in chain[1:]]


class OracleMemo:
    """What PrefixMemo promises, by brute force over token tuples instead of hash-chained keys."""

    def __init__(
        self, capacity: int, block_size: int, min_blocks: int, alias_every: int, seen_limit: int
    ):
        self.capacity, self.B = capacity, block_size
        self.min_blocks, self.alias_every, self.seen_limit = min_blocks, alias_every, seen_limit
        self.kept: OrderedDict[tuple[int, ...], int] = OrderedDict()  # prefix -> bytes, LRU first
        self.registered: dict[tuple[int, ...], int] = {}  # prefix -> when it was last remembered
        self.clock = 0
        self.seen: OrderedDict[tuple[int, ...], None] = OrderedDict()

    def find(self, tokens: list[int]) -> int:
        """Blocks of the deepest kept prefix of tokens, an alias (every alias_every-th block of a
        longer kept prefix) included; 0 if none. The prefix that answers becomes the most recent."""
        for d in range(len(tokens) // self.B, self.min_blocks - 1, -1):
            p = tuple(tokens[: d * self.B])
            owners = [p] if p in self.kept else []
            if not owners and d % self.alias_every == 0:
                owners = [k for k in self.kept if len(k) > len(p) and k[: len(p)] == p]
            if owners:
                self.kept.move_to_end(max(owners, key=self.registered.__getitem__))
                return d
        return 0

    def remember(self, tokens: list[int]) -> bool:
        d = len(tokens) // self.B
        p, size = tuple(tokens[: d * self.B]), d * self.B * WIDTH
        if d < self.min_blocks:
            return False
        self.kept.pop(p, None)
        if size > self.capacity:
            return False
        while sum(self.kept.values()) + size > self.capacity:
            self.kept.popitem(last=False)
        self.kept[p] = size
        self.clock += 1
        self.registered[p] = self.clock
        return True

    def seen_twice(self, tokens: list[int]) -> bool:
        d = len(tokens) // self.B
        p = tuple(tokens[: d * self.B])
        if d < self.min_blocks:
            return False
        if p in self.seen:
            return True
        self.seen[p] = None
        while len(self.seen) > self.seen_limit:
            self.seen.popitem(last=False)
        return False

    def clear(self) -> None:
        self.kept.clear()
        self.seen.clear()


ops = st.lists(
    st.tuples(
        st.sampled_from(["remember"] * 4 + ["find"] * 4 + ["seen"] * 2 + ["clear"]),
        st.lists(st.integers(0, 1), max_size=24),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    ops,
    st.integers(1, 3),  # block_size
    st.integers(1, 4),  # min_blocks
    st.integers(1, 4),  # alias_every
    st.integers(0, 60),  # capacity in tokens
    st.integers(0, 4),  # seen_limit
)
def test_memo_equals_brute_force(
    ops, block_size, min_blocks, alias_every, capacity_tokens, seen_limit
):
    capacity = capacity_tokens * WIDTH
    memo = PrefixMemo(
        capacity, block_size, min_blocks=min_blocks, alias_every=alias_every, seen_limit=seen_limit
    )
    oracle = OracleMemo(capacity, block_size, min_blocks, alias_every, seen_limit)
    for op, tokens in ops:
        n_full = len(tokens) // block_size
        keys = block_keys(tokens, block_size)
        if op == "remember":
            segment = synthetic_state(tokens[: n_full * block_size])
            assert memo.remember(CODEC, keys, segment) == oracle.remember(tokens)
        elif op == "find":
            hit, expected = memo.find(CODEC, keys), oracle.find(tokens)
            assert (hit.n_blocks if hit else 0) == expected
            if hit:  # the merged state of exactly those blocks (an alias's is cut to them)
                assert hit.segment == synthetic_state(tokens[: expected * block_size])
        elif op == "seen":
            assert memo.seen_twice(CODEC, keys) == oracle.seen_twice(tokens)
        else:
            memo.clear()
            oracle.clear()
        assert memo.nbytes <= capacity  # the byte bound holds after every operation
        assert memo.nbytes == sum(oracle.kept.values()) and len(memo) == len(oracle.kept)


def test_a_long_prefix_answers_at_every_16th_block_cut_to_it():
    block = 2
    memo = PrefixMemo(1 << 20, block)
    system = list(range(1000, 1100))  # 50 blocks
    assert memo.remember(CODEC, block_keys(system, block), synthetic_state(system))
    for n_blocks, expected in ((50, 50), (49, 48), (47, 32), (40, 32), (31, 16), (16, 16), (15, 0)):
        question = system[: n_blocks * block] + [7, 7, 7]
        hit = memo.find(CODEC, block_keys(question, block))
        assert (hit.n_blocks if hit else 0) == expected
        if hit:
            assert hit.segment == synthetic_state(system[: expected * block])
    assert MEMO_ALIAS_EVERY == 16


def test_an_alias_outlives_a_longer_prefix_that_shared_it():
    """Two kept prefixes share their first 16 blocks; dropping the newer keeps the alias alive."""
    block = 1
    memo = PrefixMemo(60 * WIDTH, block)
    a = list(range(20))
    b = list(range(16)) + [99] * 20
    memo.remember(CODEC, block_keys(a, block), synthetic_state(a))
    memo.remember(CODEC, block_keys(b, block), synthetic_state(b))
    assert len(memo) == 2
    assert memo.find(CODEC, block_keys(a, block)).n_blocks == 20  # a is now the most recent
    d = [50] * 8
    memo.remember(CODEC, block_keys(d, block), synthetic_state(d))  # 20 + 36 + 8 > 60: b leaves
    assert len(memo) == 2
    hit = memo.find(CODEC, block_keys(b, block))  # b is gone; a still answers for their first 16
    assert hit.n_blocks == 16 and hit.segment == synthetic_state(list(range(16)))


def test_seen_twice_clear_and_the_byte_bound():
    block = 4
    memo = PrefixMemo(10 * block * WIDTH, block)
    seq = list(range(40))  # 10 blocks
    keys = block_keys(seq, block)
    assert not memo.seen_twice(CODEC, keys)
    assert memo.seen_twice(CODEC, keys) and memo.seen_twice(CODEC, keys)
    assert not memo.seen_twice(CODEC, keys[:3])  # shorter than min_blocks: never merged
    assert not memo.seen_twice(CODEC, keys[:3])
    assert memo.remember(CODEC, keys, synthetic_state(seq)) and memo.nbytes == 40 * WIDTH
    assert not memo.remember(
        CODEC, block_keys(seq + [1] * 4, block), synthetic_state(seq + [1] * 4)
    )
    assert memo.find(CODEC, keys).n_blocks == 10  # a segment over the bound is not kept, nor evicts
    memo.clear()
    assert memo.find(CODEC, keys) is None and memo.nbytes == 0 and len(memo) == 0
    assert not memo.seen_twice(CODEC, keys)  # clear forgets sightings too


def test_a_zero_byte_memo_keeps_nothing():
    memo = PrefixMemo(0, 2)
    seq = list(range(20))
    assert not memo.keeps(10)
    assert not memo.remember(CODEC, block_keys(seq, 2), synthetic_state(seq))
    assert memo.find(CODEC, block_keys(seq, 2)) is None


@pytest.mark.parametrize("args", [(-1, 4), (10, 0)])
def test_bad_bounds_are_a_clear_error(args):
    with pytest.raises(ValueError):
        PrefixMemo(*args)


def test_holds_answers_as_find_does_without_cutting():
    codec = FixedWidthCodec(4)
    memo = PrefixMemo(1 << 20, 1, min_blocks=2, alias_every=2)
    keys = [f"k{i}" for i in range(6)]
    assert not memo.holds(codec, keys)
    memo.remember(codec, keys[:4], b"x" * 16)
    for n in range(7):
        assert memo.holds(codec, keys[:n]) == (memo.find(codec, keys[:n]) is not None)
    assert not memo.holds(codec, ["other", "keys", "here"])
