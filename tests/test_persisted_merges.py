"""Persisted merges (issue 15): a fresh process over a shared store reads one merged segment and a
few blocks, gets the same bytes as the block path, and a damaged merge is a miss, never a wrong answer."""

from __future__ import annotations

import logging

from conftest import WIDTH, synthetic_state
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import disk_cache, long_seq

from promptcache import PromptCache
from promptcache.codec import FixedWidthCodec
from promptcache.memo import PERSIST_EVERY, PERSIST_MIN_BLOCKS, memo_key
from promptcache.store import MemoryStore, envelope
from promptcache.store.disk import DiskStore

FP = "model-a"
CODEC = FixedWidthCodec(WIDTH)


def merge_keys(store) -> list[str]:  # noqa: ANN001
    return [k for k in store.keys() if k.startswith("memo-")]


def fresh(store, block: int = 1, **kw) -> PromptCache:  # noqa: ANN001
    """A PromptCache with an empty index and memo over `store`: what a new process starts with."""
    return PromptCache(store, codec=CODEC, block_size=block, shared=True, **kw)


def brute_force(cached: list[list[int]], query: list[int], limit: int) -> int:
    best = 0
    for seq in cached:
        n = 0
        while n < min(len(seq), limit) and seq[n] == query[n]:
            n += 1
        best = max(best, n)
    return best


prefixes = st.lists(st.integers(0, 50), min_size=0, max_size=80)
tails = st.lists(st.integers(0, 50), min_size=0, max_size=60)


@settings(max_examples=80, deadline=None)
@given(prefixes, st.lists(tails, min_size=1, max_size=4), tails, st.integers(1, 2))
def test_a_fresh_process_reads_the_same_state_through_a_merge_as_through_the_blocks(
    prefix, suffixes, query_tail, block
):
    store = MemoryStore(1 << 24)
    writer = fresh(store, block)
    cached = [prefix + s for s in suffixes if prefix + s]
    for seq in cached:
        writer.insert(seq, synthetic_state(seq), FP)
    query = prefix + query_tail
    with_merges, blocks_only = fresh(store, block), fresh(store, block, persist_merges=False)
    a = with_merges.lookup(query, FP)
    b = blocks_only.lookup(query, FP)
    assert (a is None) == (b is None)
    if a is not None:
        assert a.tokens_reused == b.tokens_reused
        assert a.state == b.state == synthetic_state(query[: a.tokens_reused])
    # A cached sequence the prompt starts with is found to the token (the block path's promise).
    assert (a.tokens_reused if a else 0) >= max(
        (len(s) for s in cached if query[: len(s)] == s), default=0
    )
    assert (a.tokens_reused if a else 0) <= brute_force(cached, query, len(query))
    # Merges end at multiples of PERSIST_EVERY blocks of at least PERSIST_MIN_BLOCKS.
    for seq in cached:
        n_full = len(seq) // block
        expect = n_full // PERSIST_EVERY * PERSIST_EVERY
        if expect >= PERSIST_MIN_BLOCKS:
            assert any(store.contains(k) for k in merge_keys(store))


def test_a_fresh_process_hit_reads_one_merge_and_a_few_blocks(tmp_path):
    seq = long_seq(1312)
    writer = disk_cache(tmp_path)
    writer.insert(seq, synthetic_state(seq), FP)
    assert writer.stats()["merges_written"] == 1
    reader = disk_cache(tmp_path)
    reader_store = reader.store
    hit = reader.lookup(seq, FP, max_tokens=1310)
    assert hit is not None and hit.tokens_reused == 1310 and hit.source == "disk"
    assert hit.state == synthetic_state(seq[:1310])
    assert reader.stats()["merges_read"] == 1
    # 1,310 tokens: the merge of 160 blocks, then blocks 160-162 and the 164th block cut to 6 tokens.
    assert reader_store.stats()["hits"] == 1 + 3 + 1
    # The merge is in RAM now: the next lookup reads no merge from the store.
    reader.lookup(seq, FP, max_tokens=1310)
    assert reader.stats()["merges_read"] == 1 and reader.stats()["memo_hits"] >= 1


def test_sequences_over_one_long_system_prompt_share_one_merge():
    store = MemoryStore(1 << 26)
    writer = fresh(store, 8)
    system = long_seq(1568)
    for i in range(10):
        seq = system + long_seq(30, salt=i + 1)
        writer.insert(seq, synthetic_state(seq), FP)
    # Each sequence has 199 full blocks: their merge ends at block 192, inside the system prompt.
    assert len(merge_keys(store)) == 1 and writer.stats()["merges_written"] == 1


def test_short_sequences_get_no_merge():
    store = MemoryStore(1 << 24)
    writer = fresh(store, 8)
    seq = long_seq(8 * PERSIST_MIN_BLOCKS - 1)
    writer.insert(seq, synthetic_state(seq), FP)
    assert merge_keys(store) == []


def _merge_file(store: DiskStore) -> tuple[str, object]:
    (key,) = merge_keys(store)
    return key, store.path / "entries" / key[:2] / key


def test_a_damaged_merge_is_a_logged_miss_and_the_blocks_answer(tmp_path, caplog):
    seq = long_seq(600)
    writer = disk_cache(tmp_path)
    writer.insert(seq, synthetic_state(seq), FP)
    store = DiskStore(tmp_path)
    key, path = _merge_file(store)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    path.write_bytes(bytes(blob))
    reader = PromptCache(store, codec=CODEC, block_size=8)
    with caplog.at_level(logging.WARNING):
        hit = reader.lookup(seq, FP, max_tokens=598)
    assert hit.tokens_reused == 598 and hit.state == synthetic_state(seq[:598])
    assert reader.stats()["merges_read"] == 0 and store.stats()["corrupt"] == 1
    assert not store.contains(key)
    assert any(key in r.getMessage() for r in caplog.records)


def test_a_truncated_merge_is_a_miss_and_the_blocks_answer(tmp_path):
    seq = long_seq(600)
    disk_cache(tmp_path).insert(seq, synthetic_state(seq), FP)
    store = DiskStore(tmp_path)
    key, path = _merge_file(store)
    path.write_bytes(path.read_bytes()[:-100])
    hit = PromptCache(store, codec=CODEC, block_size=8).lookup(seq, FP, max_tokens=598)
    assert hit.tokens_reused == 598 and hit.state == synthetic_state(seq[:598])
    assert not store.contains(key)


def test_a_well_formed_merge_of_the_wrong_length_is_dropped_not_served():
    store = MemoryStore(1 << 24)
    seq = long_seq(600)
    fresh(store, 8).insert(seq, synthetic_state(seq), FP)
    (key,) = merge_keys(store)
    store.put(key, synthetic_state(seq[:100]), fingerprint=FP)  # checksummed, but 100 tokens
    reader = fresh(store, 8)
    hit = reader.lookup(seq, FP, max_tokens=598)
    assert hit.tokens_reused == 598 and hit.state == synthetic_state(seq[:598])
    assert not store.contains(key) and reader.stats()["merges_read"] == 0


def test_a_merge_under_another_fingerprint_is_a_miss(tmp_path):
    seq = long_seq(600)
    disk_cache(tmp_path).insert(seq, synthetic_state(seq), FP)
    store = DiskStore(tmp_path)
    key, path = _merge_file(store)
    payload, flags, _fp = envelope.unpack(path.read_bytes(), key=key)
    path.write_bytes(envelope.pack(key, payload, "model-b", flags))
    hit = PromptCache(store, codec=CODEC, block_size=8).lookup(seq, FP, max_tokens=598)
    assert hit.state == synthetic_state(seq[:598]) and not store.contains(key)


def test_forgetting_the_last_sequence_that_uses_a_merge_deletes_it():
    store = MemoryStore(1 << 24)
    cache = fresh(store, 8)
    a, b = long_seq(600), long_seq(600)[:520] + long_seq(50, salt=3)
    cache.insert(a, synthetic_state(a), FP)
    cache.insert(b, synthetic_state(b), FP)
    key = memo_key(CODEC.name, cache._indexes[FP].find(cache_tb(a)).value.keys[63])
    assert store.contains(key)  # both end their merge at block 64 (512 tokens)
    cache.remove(a, FP)
    assert store.contains(key)  # b still uses block 64
    cache.remove(b, FP)
    assert not store.contains(key)


def cache_tb(seq: list[int]) -> bytes:
    from promptcache.keys import token_bytes

    return token_bytes(seq)
