"""PromptCache over synthetic fixed-width states: token-granular hits, shared prefixes once, capacity, fingerprints."""

from __future__ import annotations

import sys
import threading

import pytest
from conftest import WIDTH, synthetic_state
from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache import CapacityError, FixedWidthCodec, MemoryStore, OpaqueCodec, PromptCache

FP = "model-a"
seqs = st.lists(st.integers(0, 2), min_size=1, max_size=40)


def brute_force(cached, query, limit):
    best = 0
    for seq in cached:
        k = 0
        while k < min(len(seq), len(query), limit) and seq[k] == query[k]:
            k += 1
        best = max(best, k)
    return best


@settings(max_examples=200, deadline=None)
@given(st.lists(seqs, max_size=8), seqs, st.integers(1, 9))
def test_lookup_equals_brute_force_and_returns_exact_state(cached, query, block):
    cache = PromptCache(codec=FixedWidthCodec(WIDTH), block_size=block)
    for seq in cached:
        cache.insert(seq, synthetic_state(seq), FP)
    expected = brute_force(cached, query, len(query))
    hit = cache.lookup(query, FP)
    if expected == 0:
        assert hit is None
    else:
        assert hit.tokens_reused == expected
        assert hit.state == synthetic_state(query[:expected])


@settings(max_examples=100, deadline=None)
@given(st.lists(seqs, min_size=1, max_size=8), seqs)
def test_max_tokens_caps_the_hit(cached, query):
    cache = PromptCache(codec=FixedWidthCodec(WIDTH), block_size=4)
    for seq in cached:
        cache.insert(seq, synthetic_state(seq), FP)
    limit = max(0, len(query) - 2)
    hit = cache.lookup(query, FP, max_tokens=limit)
    expected = brute_force(cached, query, limit)
    assert (hit.tokens_reused if hit else 0) == expected


def test_hit_inside_a_longer_cached_sequence_and_strict_prefix():
    cache = PromptCache(codec=FixedWidthCodec(WIDTH), block_size=4)
    long = list(range(100, 130))
    cache.insert(long, synthetic_state(long), FP)
    prompt = long[:13] + [1, 2, 3]
    hit = cache.lookup(prompt, FP)
    assert hit.tokens_reused == 13 and hit.state == synthetic_state(long[:13])
    hit = cache.lookup(long[:21], FP)  # a strict prefix of a cached sequence
    assert hit.tokens_reused == 21 and hit.state == synthetic_state(long[:21])


def test_shared_prefix_is_stored_once():
    block, prefix_len, k = 16, 2000, 50
    cache = PromptCache(codec=FixedWidthCodec(WIDTH), block_size=block)
    prefix = [(i * 7919) % 40000 for i in range(prefix_len)]
    suffixes = [[50000 + i, 50100 + i, 50200 + i] for i in range(k)]
    for suffix in suffixes:
        seq = prefix + suffix
        cache.insert(seq, synthetic_state(seq), FP)
    unique_tokens = prefix_len + sum(len(s) for s in suffixes)
    # Each sequence repeats at most the part of the prefix inside its last partial block.
    assert cache.nbytes <= (unique_tokens + k * (block - 1)) * WIDTH
    assert cache.nbytes == cache.store.size()
    assert cache.nbytes < 2 * prefix_len * WIDTH  # K x P would be 50x
    assert cache.stats()["chunks_deduplicated"] >= (k - 1) * (prefix_len // block)


@settings(max_examples=100, deadline=None)
@given(st.lists(seqs, min_size=1, max_size=30), st.integers(40, 400))
def test_capacity_holds_after_every_operation(stream, capacity):
    cache = PromptCache(codec=FixedWidthCodec(WIDTH), block_size=4, capacity_bytes=capacity * WIDTH)
    for i, seq in enumerate(stream):
        try:
            cache.insert(seq, synthetic_state(seq), FP)
        except CapacityError:
            assert len(seq) * WIDTH > capacity * WIDTH
        assert cache.store.size() <= cache.capacity_bytes
        assert cache.nbytes == cache.store.size()
        if i % 3 == 0:
            hit = cache.lookup(seq, FP)
            if hit:
                assert hit.state == synthetic_state(seq[: hit.tokens_reused])


def test_eviction_keeps_the_shared_prefix():
    block = 4
    prefix = list(range(1000, 1016))  # 4 full blocks
    cache = PromptCache(
        codec=FixedWidthCodec(WIDTH), block_size=block, capacity_bytes=(16 + 3 * 4) * WIDTH
    )
    for i in range(6):
        seq = prefix + [i] * 4
        cache.insert(seq, synthetic_state(seq), FP)
        assert cache.store.size() <= cache.capacity_bytes
    assert cache.stats()["evicted_sequences"] >= 3
    hit = cache.lookup(prefix + [99], FP)
    assert hit.tokens_reused == 16


def test_another_fingerprint_is_never_loaded():
    cache = PromptCache(codec=FixedWidthCodec(WIDTH), block_size=4)
    seq = list(range(20))
    cache.insert(seq, synthetic_state(seq), "model-a")
    assert cache.lookup(seq, "model-b") is None
    assert cache.lookup(seq, "model-a").tokens_reused == 20


def test_whole_entry_mode_reuses_exact_prefix_entries_only():
    cache = PromptCache(codec=OpaqueCodec())
    a = list(range(10))
    cache.insert(a, b"opaque-state-of-a", FP)
    assert cache.lookup(a[:5], FP) is None  # cannot be cut to 5 tokens
    hit = cache.lookup(a + [42, 43], FP)
    assert hit.tokens_reused == 10 and hit.state == b"opaque-state-of-a"
    assert cache.lookup(a, FP, max_tokens=9) is None


def test_remove_and_clear():
    cache = PromptCache(codec=FixedWidthCodec(WIDTH), block_size=4)
    a, b = list(range(12)), list(range(8)) + [99, 98]
    for s in (a, b):
        cache.insert(s, synthetic_state(s), FP)
    assert cache.remove(a, FP)
    assert not cache.remove(a, FP)
    assert cache.lookup(a, FP).tokens_reused == 8  # b still shares 8 tokens
    assert cache.nbytes == cache.store.size() == len(b) * WIDTH
    cache.clear()
    assert cache.lookup(b, FP) is None and cache.store.size() == 0 and len(cache) == 0


@pytest.mark.parametrize(
    "tokens, state, fp, exc",
    [
        ("hello", b"x" * WIDTH, FP, TypeError),
        ([], b"", FP, ValueError),
        ([1, -2], b"x" * 2 * WIDTH, FP, ValueError),
        ([1, 2], "not bytes", FP, TypeError),
        ([1, 2], b"x" * WIDTH, FP, ValueError),  # state covers 1 token, 2 given
        ([1, 2], b"x" * 2 * WIDTH, "", TypeError),
        ([[1], [2]], b"x" * 2 * WIDTH, FP, TypeError),
    ],
)
def test_bad_input_is_a_clear_error(tokens, state, fp, exc):
    cache = PromptCache(codec=FixedWidthCodec(WIDTH))
    with pytest.raises(exc):
        cache.insert(tokens, state, fp)
    assert len(cache) == 0


def test_a_chunk_lost_from_the_store_is_a_shorter_hit_not_a_wrong_one():
    store = MemoryStore(1 << 20)
    # memo_bytes=0: no merged copy of the prefix, so the lookup must read the store's chunks.
    cache = PromptCache(store, codec=FixedWidthCodec(WIDTH), block_size=4, memo_bytes=0)
    seq = list(range(20))
    cache.insert(seq, synthetic_state(seq), FP)
    keys_in_order = cache._indexes[FP].find(cache_tokens(seq)).value.keys
    store.delete(keys_in_order[2])  # tokens 8..11
    hit = cache.lookup(seq, FP)
    assert hit.tokens_reused == 8 and hit.state == synthetic_state(seq[:8])
    assert cache.stats()["missing_chunks"] >= 1


def cache_tokens(seq):
    from promptcache.keys import token_bytes

    return token_bytes(seq)


@settings(max_examples=150, deadline=None)
@given(st.lists(seqs, min_size=1, max_size=6), seqs, st.integers(1, 6), st.integers(0, 3))
def test_a_fresh_process_finds_what_another_wrote_to_a_shared_store(cached, query, block, margin):
    """A second PromptCache with an empty index over the same store stands for a fresh process."""
    store = MemoryStore(1 << 20)
    writer = PromptCache(store, codec=FixedWidthCodec(WIDTH), block_size=block, shared=True)
    for seq in cached:
        writer.insert(seq, synthetic_state(seq), FP)
    reader = PromptCache(store, codec=FixedWidthCodec(WIDTH), block_size=block, shared=True)
    limit = max(0, len(query) - margin)
    hit = reader.lookup(query, FP, max_tokens=limit)
    best = brute_force(cached, query, limit)
    reused = hit.tokens_reused if hit else 0
    assert reused <= best
    if hit:
        assert hit.state == synthetic_state(query[:reused])
    # A cached sequence that the prompt starts with is found to the token; one that goes on past the
    # prompt is found to the last whole block (its next chunk's key holds tokens the prompt lacks).
    if any(query[: len(s)] == s for s in cached):
        assert reused >= min(max(len(s) for s in cached if query[: len(s)] == s), limit)
    if any(s[: len(query)] == query for s in cached):
        assert reused >= (limit // block) * block


def test_adopt_indexes_a_sequence_another_process_stored():
    store = MemoryStore(1 << 20)
    writer = PromptCache(store, codec=FixedWidthCodec(WIDTH), block_size=4, shared=True)
    reader = PromptCache(store, codec=FixedWidthCodec(WIDTH), block_size=4, shared=True)
    seq = list(range(30))
    writer.insert(seq, synthetic_state(seq), FP)
    assert not reader.adopt(seq + [99], FP)  # the last chunk is not stored
    assert reader.adopt(seq, FP) and reader.contains(seq, FP)
    hit = reader.lookup(seq[:22] + [5], FP)  # token-granular through the adopted index entry
    assert hit.tokens_reused == 22 and hit.state == synthetic_state(seq[:22])
    assert not PromptCache(codec=FixedWidthCodec(WIDTH)).adopt(
        seq, FP
    )  # a private store has nothing to adopt


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=24, max_size=60),
    st.lists(seqs, min_size=3, max_size=6),
    st.integers(2, 5),
)
def test_repeated_prefix_hits_through_the_merged_memo_are_exact(prefix, suffixes, block):
    cache = PromptCache(codec=FixedWidthCodec(WIDTH), block_size=block)
    cache.insert(prefix + suffixes[0], synthetic_state(prefix + suffixes[0]), FP)
    for suffix in suffixes:
        query = prefix + [9] + suffix
        hit = cache.lookup(query, FP)
        assert hit is not None and hit.tokens_reused >= len(prefix)
        assert hit.state == synthetic_state(query[: hit.tokens_reused])
    # Merged on the second hit at the latest (at insert when the prefix ends the inserted blocks).
    assert cache.stats()["memo_hits"] >= len(suffixes) - 2


def test_a_conversation_turn_joins_from_the_previous_turns_merged_state():
    """insert() keeps the inserted state's full blocks merged: the next, longer prompt starts from it."""
    cache = PromptCache(codec=FixedWidthCodec(WIDTH), block_size=4)
    turn1 = list(range(100, 140))
    cache.insert(turn1, synthetic_state(turn1), FP)
    turn2 = turn1 + [7, 8, 9, 10, 11]
    hit = cache.lookup(turn2, FP)
    assert hit.tokens_reused == 40 and hit.state == synthetic_state(turn1)
    assert cache.stats()["memo_hits"] == 1
    assert (
        cache.lookup(turn2, FP, min_tokens=40) is None
    )  # the caller holds 40 already: nothing fetched
    assert cache.stats()["lookups"] == 1


def test_a_new_question_after_a_cached_prompt_starts_from_its_merged_state():
    """A merged prefix answers, cut, for its earlier prefixes (every 16th block) too."""
    cache = PromptCache(codec=FixedWidthCodec(WIDTH), block_size=2)
    system = list(range(1000, 1050))  # 25 blocks
    cache.insert(system, synthetic_state(system), FP)
    question = system[:40] + [7, 7, 7]
    hit = cache.lookup(question, FP)
    assert hit.tokens_reused == 40 and hit.state == synthetic_state(system[:40])
    assert cache.stats()["memo_hits"] == 1
    cache.clear()
    assert cache.lookup(question, FP) is None


def test_a_miss_is_counted_as_a_lookup_and_a_miss():
    cache = PromptCache(codec=FixedWidthCodec(WIDTH), block_size=4)
    seq = list(range(10))
    assert cache.lookup(seq, FP) is None  # nothing cached: an empty plan reads nothing
    cache.insert(seq, synthetic_state(seq), FP)
    assert cache.lookup([99] + seq, FP) is None  # no shared first token
    assert cache.lookup(seq, FP, max_tokens=0) is None
    s = cache.stats()
    assert (s["lookups"], s["misses"], s["hits"], s["tokens_looked_up"]) == (3, 3, 0, 31)


def test_stats_is_one_consistent_snapshot_while_another_thread_inserts():
    """stats() and len() take the cache's lock: no dict resized under them, no half-done insert seen."""
    cache = PromptCache(codec=FixedWidthCodec(WIDTH), block_size=4)
    done = threading.Event()

    def writer():
        try:
            for i in range(2000):
                seq = [i, i + 1, i + 2]
                cache.insert(seq, synthetic_state(seq), f"model-{i}")  # one more index each time
        finally:
            done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        thread = threading.Thread(target=writer)
        thread.start()
        snapshots = 0
        while not done.is_set() or snapshots == 0:
            s = cache.stats()
            assert s["sequences"] == s["chunks"] == s["inserts"] <= len(cache)
            assert s["bytes"] == 3 * WIDTH * s["chunks"]
            snapshots += 1
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert cache.stats()["sequences"] == len(cache) == 2000
