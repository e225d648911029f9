"""BlockCounts, the pure core of the KV events: property tests against a brute-force model (every
holder's blocks recomputed from scratch), without a model or a socket."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache.keys import token_bytes
from promptcache.server.kv_blocks import ROOT, BlockCounts, Removed, Stored, chain_hash


def brute_chain(tokens: list[int], block_size: int) -> list[int]:
    """Every full block's hash, each from its parent's: the definition, computed from scratch."""
    out, parent = [], ROOT
    for i in range(len(tokens) // block_size):
        block = np.asarray(tokens[i * block_size : (i + 1) * block_size], dtype="<u4").tobytes()
        parent = chain_hash(parent, block)
        out.append(parent)
    return out


class Subscriber:
    """What a consumer (vllm-router) rebuilds from the events, checking what it must be able to trust."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks: dict[int, tuple[int, ...]] = {}  # announced hash -> its tokens

    def apply(self, events: list[Stored | Removed]) -> None:
        for event in events:
            if isinstance(event, Stored):
                # Its parent was announced before (a store with an unknown parent is dropped).
                assert event.parent is None or event.parent in self.blocks
                assert len(event.tokens) == self.block_size * len(event.hashes)
                prev = ROOT if event.parent is None else event.parent
                for i, h in enumerate(event.hashes):
                    assert h not in self.blocks, "a block announced twice"
                    bs = self.block_size
                    block = event.tokens[i * bs : (i + 1) * bs]
                    # Each hash chains its tokens onto the block before it (the parent first).
                    assert h == chain_hash(prev, np.asarray(block, dtype="<u4").tobytes())
                    self.blocks[h], prev = block, h
            else:
                for h in event.hashes:
                    assert h in self.blocks, "a removal of a block never announced"
                    del self.blocks[h]


holders = st.integers(0, 3)
# A small alphabet so that holders share prefixes (and whole blocks) often.
token_lists = st.lists(st.integers(0, 2), max_size=14)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("hold"), holders, token_lists),
        st.tuples(st.just("release"), holders, st.just([])),
        st.tuples(st.just("restate"), st.just(0), st.just([])),
        st.tuples(st.just("release_all"), st.just(0), st.just([])),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(block_size=st.integers(1, 4), ops=operations)
def test_announced_blocks_are_the_blocks_some_holder_covers(block_size: int, ops: list) -> None:
    counts = BlockCounts(block_size)
    sub = Subscriber(block_size)
    model: dict[int, list[int]] = {}  # holder -> the tokens it covers
    for op, holder, tokens in ops:
        if op == "hold":
            sub.apply(counts.hold(holder, token_bytes(tokens)))
            model[holder] = tokens
        elif op == "release":
            sub.apply(counts.release(holder))
            model.pop(holder, None)
        elif op == "release_all":
            sub.apply(counts.release_all())
            model.clear()
        else:  # AllBlocksCleared, then everything stated again from scratch
            restated = counts.restate()
            sub = Subscriber(block_size)
            sub.apply(restated)
        expected: dict[int, tuple[int, ...]] = {}
        for covered in model.values():
            for i, h in enumerate(brute_chain(covered, block_size)):
                expected[h] = tuple(covered[i * block_size : (i + 1) * block_size])
        assert sub.blocks == expected
        assert len(counts) == len(expected) and all(h in counts for h in expected)


def test_hashes_name_content_only() -> None:
    """Two servers (two BlockCounts) give the same tokens the same hashes; another prefix before the
    same block gives it another hash."""
    a, b = BlockCounts(2), BlockCounts(2)
    (sa,) = a.hold("seq", token_bytes([5, 6, 7, 8]))
    (sb,) = b.hold(("cache", b"x"), token_bytes([5, 6, 7, 8, 9]))
    assert sa == sb and sa.parent is None and sa.tokens == (5, 6, 7, 8)
    (other,) = BlockCounts(2).hold(0, token_bytes([1, 2, 7, 8]))
    assert other.hashes[1] != sa.hashes[1] and all(0 <= h < 2**63 for h in sa.hashes)


def test_a_second_holder_adds_nothing_and_the_last_removes_deepest_first() -> None:
    counts = BlockCounts(2)
    (stored,) = counts.hold(1, token_bytes([1, 2, 3, 4, 5, 6]))
    assert counts.hold(2, token_bytes([1, 2, 3, 4])) == []  # covered already
    assert counts.release(1) == [Removed((stored.hashes[2],))]
    assert counts.release(2) == [Removed(stored.hashes[1::-1])]
    # A holder moving to another branch: the new branch chained onto the shared block, then the old
    # branch's blocks removed.
    counts.hold(3, token_bytes([1, 2, 3, 4]))
    new, gone = counts.hold(3, token_bytes([1, 2, 9, 9]))
    assert new == Stored((brute_chain([1, 2, 9, 9], 2)[1],), stored.hashes[0], (9, 9))
    assert gone == Removed((stored.hashes[1],))


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        BlockCounts(0)
