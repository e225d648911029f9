"""The radix index: longest-prefix match equals a brute-force scan; removal keeps the tree consistent."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache.index import RadixIndex
from promptcache.keys import token_bytes

small_tokens = st.lists(st.integers(0, 3), min_size=1, max_size=12)


def brute_force(cached: list[list[int]], query: list[int]) -> int:
    best = 0
    for seq in cached:
        k = 0
        while k < min(len(seq), len(query)) and seq[k] == query[k]:
            k += 1
        best = max(best, k)
    return best


@settings(max_examples=300, deadline=None)
@given(st.lists(small_tokens, max_size=12), st.lists(st.integers(0, 3), max_size=14))
def test_match_equals_brute_force_scan(cached, query):
    index = RadixIndex()
    for seq in cached:
        index.insert(token_bytes(seq))
    assert index.match(token_bytes(query)).length == brute_force(cached, query)


@settings(max_examples=200, deadline=None)
@given(st.lists(small_tokens, min_size=1, max_size=10, unique_by=tuple), st.data())
def test_remove_keeps_match_exact(cached, data):
    index = RadixIndex()
    for seq in cached:
        index.insert(token_bytes(seq))
    gone = data.draw(st.lists(st.sampled_from(cached), unique_by=tuple))
    for seq in gone:
        index.remove(index.find(token_bytes(seq)))
    left = [s for s in cached if s not in gone]
    assert len(index) == len(left)
    for query in cached:
        assert index.match(token_bytes(query)).length == brute_force(left, query)
    assert sorted(index.tokens_of(n) for n in index.sequences()) == sorted(
        token_bytes(s) for s in left
    )


def test_match_ends_inside_an_edge_and_reports_terminals():
    index = RadixIndex()
    index.insert(token_bytes([1, 2, 3, 4, 5, 6]))
    index.insert(token_bytes([1, 2]))
    m = index.match(token_bytes([1, 2, 3, 9]))
    assert m.length == 3
    assert [t.depth for t in m.terminals] == [2]
    assert index.tokens_of(index.terminal_below(m.node)) == token_bytes([1, 2, 3, 4, 5, 6])


def test_lru_evicts_leaves_before_the_prefix_they_share():
    index = RadixIndex()
    prefix, _ = index.insert(token_bytes([7, 7, 7]))
    index.touch(prefix, now=0.0)  # the shared prefix is the oldest of all...
    a, _ = index.insert(token_bytes([7, 7, 7, 1]))
    b, _ = index.insert(token_bytes([7, 7, 7, 2]))
    index.touch(a, now=1.0)
    index.touch(b, now=2.0)
    index.touch(prefix, now=0.0)
    # ...yet it is not a leaf, so its branches go first, oldest first.
    assert index.lru_leaf() is a
    index.remove(a)
    assert index.lru_leaf() is b
    index.remove(b)
    assert index.lru_leaf() is prefix
