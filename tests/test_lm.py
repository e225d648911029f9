"""CachedCausalLM on the real default model: log-probabilities cached by sequence, KV shared by particles."""

from __future__ import annotations

import numpy as np
import pytest

from promptcache import LLM, PromptCache
from promptcache.lm import CachedCausalLM, log_softmax

PROMPT = "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days. The"


@pytest.fixture(scope="module")
def reference() -> LLM:
    with LLM(cache=None, n_ctx=256) as llm:
        yield llm


def uncached_logprobs(reference: LLM, tokens: list[int]) -> np.ndarray:
    reference.reset_context()
    return log_softmax(reference.logits(tokens))


def test_logprobs_are_exact_and_cached_by_sequence(reference):
    lm = CachedCausalLM(LLM(cache=PromptCache(), n_ctx=256), cache_size=8)
    prompt = lm.tokenize(PROMPT)
    first = lm.next_token_logprobs(prompt)
    assert first.shape == (lm.vocab_size,) and not first.flags.writeable
    assert np.isclose(np.exp(first.astype(np.float64)).sum(), 1.0, atol=1e-4)
    assert np.array_equal(first, uncached_logprobs(reference, prompt))
    evaluated = lm.llm.last_stats.tokens_evaluated
    again = lm.next_token_logprobs(prompt)  # a cloned particle asking the same question
    assert again is first and lm.hits == 1 and lm.misses == 1
    assert lm.llm.last_stats.tokens_evaluated == evaluated  # the model did not run


def test_particles_extending_a_cached_prompt_reuse_its_kv_exactly(reference):
    lm = CachedCausalLM(LLM(cache=PromptCache(), n_ctx=256))
    prompt = lm.tokenize(PROMPT)
    lm.cache_kv(prompt)
    for next_token in np.argsort(-lm.next_token_logprobs(prompt))[:3]:
        particle = prompt + [int(next_token)]
        lm.llm.reset_context()  # another particle took the context: the KV must come from the cache
        out = lm.next_token_logprobs(particle)
        assert lm.llm.last_stats.tokens_reused >= len(prompt) - lm.llm.exact_batch
        assert np.array_equal(out, uncached_logprobs(reference, particle))


def test_clearing_and_bounds():
    lm = CachedCausalLM(LLM(cache=PromptCache(), n_ctx=256), cache_size=2)
    prompt = lm.tokenize(PROMPT)
    for k in range(3):
        lm.next_token_logprobs(prompt[: 10 + k])
    assert len(lm._results) == 2  # the LRU holds its size
    lm.clear_kv_cache()
    assert len(lm.llm.cache) == 0 and len(lm._results) == 2
    lm.clear_cache()
    assert len(lm._results) == 0
    with pytest.raises(ValueError):
        lm.next_token_logprobs([])
    with pytest.raises(ValueError):
        CachedCausalLM(lm.llm, cache_size=-1)
