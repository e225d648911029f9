"""CachedCausalLM on the real default model: LLaMPPL's LM API, batched and exact."""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from promptcache import LLM, PromptCache
from promptcache.engines.llama_cpp import Engine
from promptcache.lm import CachedCausalLM, log_softmax
from promptcache.store.disk import DiskStore

PROMPT = "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days. The"


@pytest.fixture(scope="module")
def reference() -> LLM:
    with LLM(cache=None, n_ctx=256) as llm:
        yield llm


@pytest.fixture(scope="module")
def lm() -> CachedCausalLM:
    return CachedCausalLM(LLM(cache=PromptCache(), n_ctx=256), n_seq=6, n_ctx=256, cache_size=64)


def uncached_logprobs(reference: LLM, tokens: list[int]) -> np.ndarray:
    reference.reset_context()
    return log_softmax(reference.logits(tokens))


def test_logprobs_are_normalised_exact_and_cached_by_sequence(lm, reference):
    prompt = lm.tokenizer.encode(PROMPT)
    first = lm.next_token_logprobs_unbatched(prompt)
    assert first.shape == (lm.vocab_size,) == (len(lm.str_vocab),) and first.dtype == np.float32
    assert not first.flags.writeable
    assert np.isclose(np.exp(first.astype(np.float64)).sum(), 1.0, atol=1e-4)
    assert np.array_equal(first, uncached_logprobs(reference, prompt))
    evaluated, hits = lm.engine.stats.tokens_evaluated, lm.hits
    again = asyncio.run(
        lm.next_token_logprobs(prompt)
    )  # a cloned particle asking the same question
    assert again is first and lm.hits == hits + 1
    assert lm.engine.stats.tokens_evaluated == evaluated  # the model did not run


def test_concurrent_queries_run_as_one_batch_equal_to_the_unbatched_path(lm, reference):
    prompt = lm.tokenizer.encode(PROMPT)
    lm.cache_kv(prompt)
    nexts = [int(t) for t in np.argsort(-lm.next_token_logprobs_unbatched(prompt))[:4]]
    queries = [prompt + [t] for t in nexts]
    batches = lm.engine.stats.batches

    async def particles() -> list[np.ndarray]:
        return await asyncio.gather(*(lm.next_token_logprobs(q) for q in queries))

    batched = asyncio.run(particles())
    assert lm.engine.stats.batches == batches + 1  # four particles' queries in one llama_decode
    alone = CachedCausalLM(LLM(cache=None, n_ctx=256), n_seq=2, n_ctx=256, cache_size=0)
    for q, got in zip(queries, batched, strict=True):
        assert np.array_equal(
            got, alone.next_token_logprobs_unbatched(q)
        )  # bit for bit, exact mode
        assert np.array_equal(got, uncached_logprobs(reference, q))
    stacked = asyncio.run(lm.batch_next_token_logprobs(queries))
    assert stacked.shape == (4, lm.vocab_size) and np.array_equal(stacked[2], batched[2])
    assert np.array_equal(lm.batch_next_token_logprobs_sync(queries[::-1]), stacked[::-1])


def test_fast_mode_batches_with_a_measured_drift(reference):
    lm = CachedCausalLM(LLM(cache=None, exact=False, n_ctx=256), n_seq=4, n_ctx=256)
    prompt = lm.tokenizer.encode(PROMPT)
    lm.cache_kv(prompt)
    nexts = [int(t) for t in np.argsort(-lm.next_token_logprobs_unbatched(prompt))[:3]]
    evaluated = lm.engine.stats.tokens_evaluated
    out = lm.batch_next_token_logprobs_sync([prompt + [t] for t in nexts])
    assert lm.engine.stats.tokens_evaluated - evaluated == 3  # one row a particle, no re-read
    drift = max(
        float(np.abs(o - uncached_logprobs(reference, prompt + [t])).max())
        for o, t in zip(out, nexts, strict=True)
    )
    assert drift < 2.0  # measured 0.5 to 1.0 here; exact mode: 0


def test_tokenizer_and_vocabularies_are_hugging_face_shaped(lm):
    tok = lm.tokenizer
    ids = tok.encode(PROMPT)
    assert tok.decode(ids) == PROMPT and ids == lm.llm.tokenize(PROMPT)
    assert tok.encode(" the", add_special_tokens=False) == [lm.str_vocab.index(" the")]
    assert (
        tok.convert_ids_to_tokens(lm.str_vocab.index(" the")) == "Ġthe"
    )  # byte-level BPE text, as HF
    assert (
        tok.eos_token_id in tok.all_special_ids and tok.decode([tok.eos_token_id]) == tok.eos_token
    )
    assert len(lm.byte_vocab) == len(lm.str_vocab) == lm.vocab_size
    assert b"".join(lm.byte_vocab[i] for i in ids).decode() == PROMPT
    masks = lm.masks
    assert masks.EOS == {tok.eos_token_id} and lm.str_vocab.index(".") in masks.END_PUNCTUATION
    assert lm.str_vocab.index(" the") in masks.STARTS_NEW_WORD
    assert all(masks._token_lengths[i] == 0 for i in tok.all_special_ids)
    # LLaMPPL deep-copies every particle's LMContext, which holds a mask (ALL_TOKENS after each
    # token): the masks are immutable and shared, and the masks derived from them too
    from llamppl import LMContext

    context = LMContext(lm, PROMPT)
    assert copy.deepcopy(context).model_mask is context.model_mask is masks.ALL_TOKENS
    banned = masks.ALL_TOKENS - masks.CONTAINS_WHITESPACE
    assert copy.deepcopy(banned) is banned and banned == set(masks.ALL_TOKENS) - set(
        masks.CONTAINS_WHITESPACE
    )
    with pytest.raises(AttributeError):
        masks.ALL_TOKENS.add(0)  # type: ignore[attr-defined]
    with pytest.warns(DeprecationWarning):
        assert lm.vocab is lm.str_vocab
    assert copy.deepcopy(lm) is lm  # particles are deep-copied, their LM is shared


def test_log_probability_cache_is_bounded_in_bytes_and_entries():
    lm = CachedCausalLM(
        LLM(cache=None, n_ctx=256),
        n_seq=2,
        n_ctx=256,
        cache_size=100,
        cache_bytes=3 * 49152 * 4 + 500,
    )
    prompt = lm.tokenizer.encode(PROMPT)
    for k in range(5):
        lm.next_token_logprobs_unbatched(prompt[: 5 + k])
    assert (
        len(lm._results) == 3 and lm.cache_nbytes <= lm.cache_bytes
    )  # bytes bound, not the 100 entries
    lm.clear_cache()
    assert len(lm._results) == 0 and lm.cache_nbytes == 0
    with pytest.raises(ValueError):
        lm.next_token_logprobs_unbatched([])
    with pytest.raises(ValueError):
        CachedCausalLM(lm.engine, cache_size=-1)
    with pytest.raises(ValueError):
        CachedCausalLM.from_pretrained(None, backend="vllm")


def test_reset_async_queries_cancels_what_waits():
    lm = CachedCausalLM(LLM(cache=None, n_ctx=256), n_seq=2, n_ctx=256)

    async def run() -> bool:
        task = asyncio.ensure_future(lm.next_token_logprobs([1, 2, 3]))
        await asyncio.sleep(0)  # queued, not yet evaluated
        lm.reset_async_queries()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(run()) and lm.engine.stats.queries == 0


def test_clear_kv_cache_keeps_another_processes_entries_on_a_shared_disk_store(tmp_path):
    other = textwrap.dedent(
        f"""
        from promptcache import LLM, PromptCache
        from promptcache.store.disk import DiskStore
        llm = LLM(cache=PromptCache(DiskStore({str(tmp_path)!r})), n_ctx=256)
        llm.logits("Another process caches this prompt about lighthouses, ferries and harbour tolls.")
        """
    )
    subprocess.run([sys.executable, "-c", other], check=True, timeout=300)
    store = DiskStore(tmp_path)
    theirs = set(store.keys())
    assert theirs
    lm = CachedCausalLM(LLM(cache=PromptCache(store), n_ctx=256), n_seq=2, n_ctx=256)
    prompt = lm.tokenizer.encode(PROMPT)
    lm.cache_kv(prompt)
    assert lm.engine.stats.inserts == 1 and len(lm.llm.cache) == 1
    lm.clear_kv_cache()
    assert len(lm.llm.cache) == 0 and lm.engine.sequences == {}
    assert theirs <= set(
        DiskStore(tmp_path).keys()
    )  # the other process's entries are all still there
    # and still serve: a new process's lookup of that prompt restores it from disk
    reader = LLM(cache=PromptCache(DiskStore(tmp_path)), n_ctx=256)
    reader.logits(
        "Another process caches this prompt about lighthouses, ferries and harbour tolls."
    )
    assert reader.last_stats.source == "disk"


def test_from_pretrained_builds_on_the_default_model():
    lm = CachedCausalLM.from_pretrained(
        None, backend="llama_cpp", cache_size=8, n_seq=2, n_ctx=256, cache=None
    )
    assert isinstance(lm.engine, Engine) and lm.backend == "llama_cpp" and lm.cache_size == 8
    assert lm.engine.exact and lm.llm.cache is None


def test_more_concurrent_awaits_than_sequences_all_complete(reference):
    """Particles awaiting more queries at once than the engine has sequences (one pinned by cache_kv)
    are evaluated in several rounds, each answer the same bits as alone."""
    lm = CachedCausalLM(LLM(cache=None, n_ctx=256), n_seq=3, n_ctx=256)
    prompt = lm.tokenizer.encode(PROMPT)
    lm.cache_kv(prompt)
    lists = [prompt + [t] for t in range(100, 109)]  # 9 queries, 2 free sequences

    async def run() -> list[np.ndarray]:
        return await asyncio.gather(*(lm.next_token_logprobs(ids) for ids in lists))

    out = asyncio.run(run())
    for ids, x in zip(lists, out, strict=True):
        assert np.array_equal(x, uncached_logprobs(reference, ids))
    assert lm.engine.stats.evictions > 0
