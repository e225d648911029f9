"""Engine on the real default model: many sequences in one context, exact against lone evaluations."""

from __future__ import annotations

import numpy as np
import pytest

from promptcache import LLM, PromptCache
from promptcache.codec.kv_streams import single_stream, stream_state
from promptcache.engines.llama_cpp import Engine, Model, Query
from promptcache.errors import ContextOverflowError
from promptcache.store.disk import DiskStore

PROMPT = (
    "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days; returns of "
    "damaged items are free within thirty days, and gift cards never expire. The"
)


@pytest.fixture(scope="module")
def model() -> Model:
    return Model()


@pytest.fixture(scope="module")
def reference() -> LLM:
    with LLM(cache=None, n_ctx=512) as llm:
        yield llm


def fresh(reference: LLM, tokens: list[int]) -> np.ndarray:
    """Logits of an uncached single-sequence prefill of `tokens`."""
    reference.reset_context()
    return reference.logits(tokens)


@pytest.fixture(scope="module")
def prompt(reference: LLM) -> list[int]:
    return reference.tokenize(PROMPT)


def top(logits: np.ndarray, k: int) -> list[int]:
    return [int(t) for t in np.argsort(-logits, kind="stable")[:k]]


def test_particles_in_one_batch_equal_single_sequence_prefills(model, reference, prompt):
    engine = Engine(model, cache=None, n_seq=6, n_ctx=256)
    (first,) = engine.evaluate([prompt])
    assert np.array_equal(first, fresh(reference, prompt))
    particles = [prompt + [t] for t in top(first, 4)]
    for step in range(5):
        if step == 2:  # a resample: particle 3 dies, particle 0 is cloned in its place
            particles[3] = list(particles[0])
        out = engine.evaluate(particles)
        for p, logits in zip(particles, out, strict=True):
            assert np.array_equal(logits, fresh(reference, p)), f"step {step}"
        particles = [
            p + [top(x, 4)[i]] for i, (p, x) in enumerate(zip(particles, out, strict=True))
        ]
    s = engine.stats
    # The prompt once, then per step and distinct particle its new token and its previous one re-read
    # (exact mode; step 2 asks 3 distinct lists: the clone's is its parent's).
    assert s.tokens_evaluated == len(prompt) + 2 * (4 + 4 + 3 + 4 + 4)
    assert s.rows_reread == 4 + 4 + 3 + 4 + 4
    # Step 0: three particles fork the prompt's sequence, one extends it; step 3: the clone forks its parent.
    assert s.forks == 4 and s.batches == 6


def test_fast_mode_shares_cells_and_reads_one_row_per_step(model, reference, prompt):
    query = prompt + [top(fresh(reference, prompt), 1)[0]]
    expected = fresh(reference, query)
    exact = Engine(model, cache=None, n_seq=2, n_ctx=256)
    exact.evaluate([prompt])
    assert np.array_equal(exact.evaluate([query])[0], expected)
    assert exact.stats.rows_reread == exact.exact_batch - 1 == 1
    fast = Engine(model, cache=None, exact=False, n_seq=2, n_ctx=256)
    fast.evaluate([prompt])
    drift = float(np.abs(fast.evaluate([Query(query, len(prompt))])[0] - expected).max())
    assert fast.stats.rows_reread == 0
    assert fast.stats.tokens_evaluated == len(prompt) + 1
    assert (
        drift < 2.0
    )  # measured 0.5 to 1.0 here (module docstring); exact mode's re-read removes it


def test_fork_and_free_share_cells_without_evaluating_again(model, reference, prompt):
    engine = Engine(model, cache=None, n_seq=4, n_ctx=256)
    engine.evaluate([prompt])
    (seq,) = engine.sequences
    child = engine.fork(seq, n_tokens=len(prompt) - 5)
    assert engine.sequences[child] == tuple(prompt[:-5])
    engine.pin(seq)
    before = engine.stats.tokens_evaluated
    a, b = engine.evaluate([prompt[:-5] + [prompt[-1], prompt[-2]], prompt + [11]])
    assert (
        engine.stats.tokens_evaluated - before == 4
    )  # two rows each, nothing of the shared prefix again
    assert np.array_equal(a, fresh(reference, prompt[:-5] + [prompt[-1], prompt[-2]]))
    assert np.array_equal(b, fresh(reference, prompt + [11]))
    assert engine.sequences[seq] == tuple(prompt)  # pinned: forked from, never extended
    engine.free(child)
    assert child not in engine.sequences
    with pytest.raises(ValueError):
        engine.free(child)


def test_a_prefix_not_live_is_restored_from_the_cache_of_another_process(
    model, reference, prompt, tmp_path
):
    writer = Engine(model, cache=PromptCache(DiskStore(tmp_path)), n_seq=2, n_ctx=256)
    writer.prefill(prompt)
    assert writer.stats.inserts == 1
    # A fresh engine and PromptCache over the same directory: as a new process would start.
    reader = Engine(model, cache=PromptCache(DiskStore(tmp_path)), n_seq=2, n_ctx=256)
    query = prompt + [top(fresh(reference, prompt), 1)[0]]
    (out,) = reader.evaluate([query])
    assert reader.stats.restores == 1 and reader.stats.tokens_restored == len(prompt) - 1
    assert reader.stats.tokens_evaluated == 2
    assert np.array_equal(out, fresh(reference, query))
    # The multi-sequence state is the LLM's format: a plain LLM on the same cache restores it exactly.
    llm = LLM(cache=PromptCache(DiskStore(tmp_path)), n_ctx=256)
    assert np.array_equal(llm.logits(query), out)
    assert llm.last_stats.tokens_reused >= len(prompt) - llm.exact_batch


def test_more_queries_than_sequences_run_in_rounds_and_evict(model, reference, prompt):
    engine = Engine(model, cache=None, n_seq=2, n_ctx=256)
    queries = [prompt[k : k + 20] for k in (0, 5, 10)]  # no common prefix: one sequence each
    out = engine.evaluate(queries + [queries[0]])
    assert out[0] is out[3] and len(engine.sequences) == 2 and engine.stats.evictions >= 1
    for q, x in zip(queries, out[:3], strict=True):
        assert np.array_equal(x, fresh(reference, q))


def test_bounds_and_bad_input(model, prompt):
    engine = Engine(model, cache=None, n_seq=2, n_ctx=64)
    with pytest.raises(ContextOverflowError):
        engine.evaluate([prompt * 8])  # n_ctx is rounded up to 256 cells
    with pytest.raises(ValueError):
        engine.evaluate([[]])
    with pytest.raises(ValueError):
        engine.evaluate([[engine.n_vocab]])
    with pytest.raises(TypeError):
        engine.evaluate(["text"])
    with pytest.raises(ValueError):
        Engine(model, n_seq=0)


def test_states_are_written_in_the_single_stream_layout_of_an_llm(model, prompt):
    engine = Engine(model, cache=None, n_seq=3, n_ctx=256)
    engine.evaluate([prompt[:7], prompt])
    seq = next(s for s, t in engine.sequences.items() if len(t) == len(prompt))
    mine = engine.state(seq)
    llm = LLM(cache=None, n_ctx=256)
    llm.logits(prompt)
    theirs = llm.state_bytes()
    # Same layout and K/V bytes; only the sequence ids differ (in the header and each cell's metadata:
    # i32 pos, u32 n_seq_id = 1, i32 seq id), and llama.cpp reads a state into any sequence.
    n = len(prompt)
    meta = 16 + 12 * n
    assert len(mine) == len(theirs) and mine[8:16] == theirs[8:16] and mine[meta:] == theirs[meta:]
    cells = np.frombuffer(mine[16:meta], dtype="<i4").reshape(n, 3)
    assert np.array_equal(
        cells[:, :2], np.frombuffer(theirs[16:meta], dtype="<i4").reshape(n, 3)[:, :2]
    )
    assert single_stream(stream_state(mine, 3)) == mine


def test_a_short_prompt_is_cached_only_when_kept(model, prompt):
    """Particles' steps add few tokens and are not inserted; a scheduler's prompt is, however short."""
    engine = Engine(model, cache=PromptCache(), n_seq=2, n_ctx=256)
    short = prompt[:20]
    engine.advance([short])
    assert engine.stats.inserts == 0
    engine.advance([Query(prompt[:24], insert=True)])
    assert engine.stats.inserts == 1
    hit = engine.cache.lookup(prompt[:24], engine.fingerprint, codec=engine.codec)
    assert hit is not None and hit.tokens_reused > 16


def test_the_engine_takes_every_cache_its_docstring_names(model, tmp_path, monkeypatch):
    """A PromptCache, "ram", "disk", "tiered", "none" and None (promptcache.config.build_cache)."""
    from promptcache.store import MemoryStore

    monkeypatch.setenv("PROMPTCACHE_DISK_PATH", str(tmp_path / "kv"))
    monkeypatch.setenv("PROMPTCACHE_REDIS_URL", "")
    mine = PromptCache()
    assert Engine(model, cache=mine).cache is mine
    assert isinstance(Engine(model, cache="ram").cache.store, MemoryStore)
    assert isinstance(Engine(model, cache="disk").cache.store, DiskStore)
    assert list(Engine(model, cache="tiered").cache.store.tier_stats()) == ["memory", "disk"]
    assert Engine(model, cache="none").cache is None and Engine(model, cache=None).cache is None
    with pytest.raises(ValueError, match="'ram', 'disk', 'tiered'"):
        Engine(model, cache="redis-please")
    engine = Engine(model, cache=None, n_seq=2, n_ctx=256)
    engine.use_cache("ram")  # LLM.cache = ... switches the same way
    engine.prefill(engine.model.tokenize(PROMPT))
    assert engine.stats.inserts == 1 and len(engine.cache) == 1
