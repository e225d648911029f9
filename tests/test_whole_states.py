"""Whole states (issue 15): a fresh process repeating a long cached sequence maps its one whole-state
file and loads it as it is (trim), with the same answer as the block path; a damaged or foreign whole
state is a logged miss, never a wrong answer; the whole states one cache writes stay in their bound."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import WIDTH, synthetic_state
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import disk_cache, long_seq

from promptcache import LLM, PromptCache
from promptcache.codec import FixedWidthCodec
from promptcache.memo import PERSIST_MIN_BLOCKS, PersistedMerges, whole_key
from promptcache.store import MemoryStore
from promptcache.store.disk import DiskStore

FP = "model-a"
CODEC = FixedWidthCodec(WIDTH)


def whole_files(store) -> list[str]:  # noqa: ANN001
    return [k for k in store.keys() if k.startswith("whole-")]


def test_a_fresh_process_repeat_reads_one_whole_state_and_trims_it(tmp_path):
    seq = long_seq(1312)
    writer = disk_cache(tmp_path)
    writer.insert(seq, synthetic_state(seq), FP)
    assert writer.stats()["wholes_written"] == 1
    reader = disk_cache(tmp_path)
    reader_store = reader.store
    hit = reader.lookup(seq, FP, max_tokens=1310, trim=True)
    assert hit is not None and hit.source == "disk"
    assert (hit.tokens_reused, hit.state_tokens, hit.trimmed) == (1310, 1312, True)
    # The stored state as it is, its first 1,310 tokens the prefix's.
    assert hit.state == synthetic_state(seq)
    assert hit.state[: 1310 * WIDTH] == synthetic_state(seq[:1310])
    assert reader_store.stats()["hits"] == 1 and reader.stats()["wholes_read"] == 1
    assert reader.stats()["merges_read"] == 0
    # Without trim the caller gets exactly its tokens: the merge and blocks path, never the whole state.
    exact = disk_cache(tmp_path)
    plain = exact.lookup(seq, FP, max_tokens=1310)
    assert plain is not None and not plain.trimmed and plain.state == synthetic_state(seq[:1310])
    assert exact.stats()["wholes_read"] == 0


def test_a_prompt_that_goes_on_past_the_whole_state_reads_the_blocks(tmp_path):
    seq = long_seq(400)
    disk_cache(tmp_path).insert(seq, synthetic_state(seq), FP)
    longer = seq + [5, 6, 7, 8, 9]
    reader = disk_cache(tmp_path)
    hit = reader.lookup(longer, FP, max_tokens=len(longer) - 2, trim=True)
    assert hit is not None and hit.tokens_reused == 400 and not hit.trimmed
    assert hit.state == synthetic_state(seq)
    assert reader.stats()["wholes_read"] == 0


prefixes = st.lists(st.integers(0, 9), min_size=0, max_size=60)
tails = st.lists(st.integers(0, 9), min_size=0, max_size=40)


@settings(max_examples=60, deadline=None)
@given(prefixes, st.lists(tails, min_size=1, max_size=3), tails, st.integers(0, 3))
def test_a_trimmed_hit_agrees_with_the_exact_hit(prefix, suffixes, query_tail, cut):
    """Over a shared store, a fresh cache's trim lookup reuses as many tokens as an exact lookup,
    and its state's first tokens_reused tokens are exactly that prefix's state."""
    store = MemoryStore(1 << 24)
    writer = PromptCache(store, codec=CODEC, block_size=1, shared=True)
    cached = [prefix + s for s in suffixes if prefix + s]
    for seq in cached:
        writer.insert(seq, synthetic_state(seq), FP)
    query = prefix + query_tail
    if not query:
        return
    limit = max(1, len(query) - cut)
    trimmed = PromptCache(store, codec=CODEC, block_size=1, shared=True)
    exact = PromptCache(store, codec=CODEC, block_size=1, shared=True, persist_merges=False)
    a = trimmed.lookup(query, FP, max_tokens=limit, trim=True)
    b = exact.lookup(query, FP, max_tokens=limit)
    assert (a is None) == (b is None)
    if a is None:
        return
    assert a.tokens_reused == b.tokens_reused
    assert bytes(a.state[: a.tokens_reused * WIDTH]) == b.state
    assert a.state == synthetic_state(query[: a.tokens_reused]) or a.trimmed
    if a.trimmed:  # a cached sequence the query repeats to its end, read whole
        assert any(query[: len(s)] == s and len(s) == a.state_tokens for s in cached)
        assert len(a.state) == a.state_tokens * WIDTH


def test_a_damaged_whole_state_is_a_logged_miss_and_the_blocks_answer(tmp_path, caplog):
    seq = long_seq(600)
    disk_cache(tmp_path).insert(seq, synthetic_state(seq), FP)
    store = DiskStore(tmp_path)
    [key] = whole_files(store)
    path = tmp_path / "entries" / key[:2] / key
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    reader = PromptCache(store, codec=CODEC, block_size=8)
    with caplog.at_level(logging.WARNING):
        hit = reader.lookup(seq, FP, max_tokens=598, trim=True)
    assert hit is not None and hit.tokens_reused == 598 and not hit.trimmed
    assert hit.state == synthetic_state(seq[:598])
    assert "unusable" in caplog.text and not store.contains(key)
    assert reader.stats()["wholes_read"] == 0


def test_a_whole_state_of_the_wrong_length_is_dropped_not_served():
    store = MemoryStore(1 << 24)
    seq = long_seq(300)
    writer = PromptCache(store, codec=CODEC, block_size=8, shared=True)
    writer.insert(seq, synthetic_state(seq), FP)
    [key] = whole_files(store)
    store.put(key, synthetic_state(seq[:296]), fingerprint=FP)  # well formed, 4 tokens short
    reader = PromptCache(store, codec=CODEC, block_size=8, shared=True)
    hit = reader.lookup(seq, FP, max_tokens=298, trim=True)
    assert hit is not None and not hit.trimmed and hit.state == synthetic_state(seq[:298])
    assert not store.contains(key)


def test_a_whole_state_under_another_fingerprint_is_a_miss(tmp_path):
    seq = long_seq(300)
    disk_cache(tmp_path).insert(seq, synthetic_state(seq), "model-b")
    reader = disk_cache(tmp_path)
    assert reader.lookup(seq, FP, max_tokens=298, trim=True) is None


def test_short_sequences_get_no_whole_state():
    store = MemoryStore(1 << 24)
    writer = PromptCache(store, codec=CODEC, block_size=8, shared=True)
    short = long_seq(PERSIST_MIN_BLOCKS * 8 - 1)
    writer.insert(short, synthetic_state(short), FP)
    assert whole_files(store) == [] and writer.stats()["wholes_written"] == 0


def test_whole_states_one_cache_writes_stay_within_whole_bytes():
    store = MemoryStore(1 << 26)
    merges = PersistedMerges(store, 8, whole_bytes=3 * 300 * WIDTH)
    keys = []
    for salt in range(5):
        seq = long_seq(300, salt)
        key, written = merges.persist_whole(CODEC, f"kv-{salt:02x}", synthetic_state(seq), 300, FP)
        assert written == 300 * WIDTH
        keys.append(key)
    assert [k for k in keys if store.contains(k)] == keys[2:]  # the oldest two were deleted
    assert merges.persist_whole(CODEC, "kv-big", b"x" * (4 * 300 * WIDTH), 1200, FP) is None


def test_forgetting_a_sequence_deletes_its_whole_state():
    store = MemoryStore(1 << 26)
    cache = PromptCache(store, codec=CODEC, block_size=8, shared=True)
    seq = long_seq(300)
    cache.insert(seq, synthetic_state(seq), FP)
    assert len(whole_files(store)) == 1
    assert cache.remove(seq, FP)
    assert whole_files(store) == []


def test_get_view_maps_large_entries_and_checks_them(tmp_path):
    store = DiskStore(tmp_path)
    big = bytes(range(256)) * 8192  # 2 MiB
    store.put("kv-big", big, fingerprint=FP)
    store.put("kv-small", b"abc", fingerprint=FP)
    view = store.get_view("kv-big", fingerprint=FP)
    assert isinstance(view, memoryview) and view.readonly and view == big
    assert store.get_view("kv-small", fingerprint=FP) == b"abc"
    assert store.get_view("kv-big", fingerprint="model-b") is None  # foreign: removed
    assert not store.contains("kv-big")
    store.put("kv-big", big, fingerprint=FP)
    path = tmp_path / "entries" / "kv" / "kv-big"
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 1
    path.write_bytes(bytes(blob))
    assert store.get_view("kv-big", fingerprint=FP) is None
    assert store.stats()["corrupt"] == 2 and not store.contains("kv-big")
    # A view outlives the replacement of its file: it keeps the verified bytes it mapped.
    store.put("kv-big", big, fingerprint=FP)
    kept = store.get_view("kv-big", fingerprint=FP)
    store.put("kv-big", big[::-1], fingerprint=FP)
    assert kept == big and store.get("kv-big", fingerprint=FP) == big[::-1]


# ---------------------------------------------------------------- on the real model

LONG_DOC = " ".join(
    f"Rule {i}: item {i * 7 % 13} ships from depot {i % 5} within {i % 9 + 1} days."
    for i in range(24)
)


@pytest.fixture(scope="module")
def ref() -> LLM:
    with LLM(cache=None, n_ctx=1024) as llm:
        yield llm


def test_a_fresh_process_repeat_from_a_whole_state_is_bit_exact(tmp_path, ref):
    prompt = LONG_DOC + " Question: which depot ships item 3?"
    script = textwrap.dedent(
        f"""
        from promptcache import LLM, PromptCache
        from promptcache.store.disk import DiskStore
        llm = LLM(cache=PromptCache(DiskStore({str(tmp_path)!r})), n_ctx=1024)
        llm.logits(llm.tokenize({prompt!r}))
        assert llm.cache.stats()["wholes_written"] == 1, llm.cache.stats()
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    with LLM(cache=PromptCache(DiskStore(tmp_path)), n_ctx=1024) as llm:
        tokens = llm.tokenize(prompt)
        assert len(tokens) >= PERSIST_MIN_BLOCKS * 8
        out = llm.logits(tokens)
        assert llm.last_stats.source == "disk"
        assert llm.last_stats.tokens_reused == len(tokens) - llm.exact_batch
        assert llm.cache.stats()["wholes_read"] == 1
        assert llm.tokens == tokens
        ref.reset_context()
        assert np.array_equal(out, ref.logits(tokens))
        # The context holds exactly the prompt: a longer prompt next reuses it live, still exact.
        longer = tokens + llm.tokenize(" Answer: depot", add_bos=False)
        out = llm.logits(longer)
        assert llm.last_stats.source == "live"
        ref.reset_context()
        assert np.array_equal(out, ref.logits(longer))


# One process of the tiered test below: LLM over CacheConfig(...).build_cache() (RAM -> disk, as the
# README shows for sharing), one call on the prompt, what it reused and the stores' counters.
TIERED_PROCESS = textwrap.dedent(
    """
    import hashlib, json, sys
    from promptcache import LLM
    from promptcache.config import CacheConfig
    path, prompt = sys.argv[1], sys.argv[2]
    cache = CacheConfig(memory_size=512 << 20, disk_path=path, disk_size=2 << 30).build_cache()
    with LLM(cache=cache, n_ctx=2048) as llm:
        tokens = llm.tokenize(prompt)
        logits = llm.logits(tokens)
        run, store = llm.last_stats, cache.store.stats()
        print(json.dumps({
            "n": len(tokens), "exact_batch": llm.exact_batch, "source": run.source,
            "tokens_reused": run.tokens_reused, "cache": cache.stats(), "store": store,
            "tiers": cache.store.tier_stats(),
            "logits": hashlib.blake2b(logits.tobytes()).hexdigest(),
        }, default=str))
    """
)

ABOUT_1300_TOKENS = " ".join(
    f"Rule {i}: item {i * 7 % 13} ships from depot {i % 5} within {i % 9 + 1} days."
    for i in range(72)
)


def test_a_fresh_process_first_hit_through_config_tiers_restores_from_a_mapped_view(tmp_path):
    """A fresh process's first hit through RAM -> disk tiers (CacheConfig.build_cache, a
    NamespacedStore over a TieredStore) reads the whole state the first process wrote as a view of
    the mapped file, checked in place and promoted into RAM without a copy: counters, not time."""

    def run() -> dict:
        done = subprocess.run(
            [sys.executable, "-c", TIERED_PROCESS, str(tmp_path), ABOUT_1300_TOKENS],
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    assert 1200 <= first["n"] <= 1400 and first["tokens_reused"] == 0
    assert first["cache"]["wholes_written"] == 1 and first["store"]["mapped_reads"] == 0
    fresh = run()
    assert fresh["source"] == "disk"
    assert fresh["tokens_reused"] == fresh["n"] - fresh["exact_batch"]
    assert fresh["cache"]["wholes_read"] == 1
    assert fresh["store"]["mapped_reads"] == fresh["tiers"]["disk"]["mapped_reads"] == 1
    assert fresh["store"]["hits_disk"] >= 1 and fresh["store"]["promotions"] >= 1
    assert fresh["tiers"]["memory"]["puts"] >= 1  # the view promoted into RAM
    assert fresh["logits"] == first["logits"]  # and the answer is the cold run's, bit for bit


def test_whole_key_names_codec_and_chunk():
    assert whole_key("llama-seq-v1", "kv-ab") == "whole-llama-seq-v1-kv-ab"
