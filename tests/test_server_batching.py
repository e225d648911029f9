"""Continuous batching (`--parallel N`): several requests live in one context, driven by the official
openai client against a real server process on loopback.

The promise under test: with exact mode, what a request gets does not depend on what else runs
beside it or on what the cache held. Each answer equals an uncached LLM's (the prompt prefilled, each
token decoded alone: README, "Exactness"), token for token and log-probability for log-probability.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from scenarios import ServerProcess

from promptcache import LLM, GenerationConfig
from promptcache.errors import ConfigError
from promptcache.server import ServerSettings, create_app

PARALLEL = 3
N_CTX = 512
SHARED = (
    "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days; returns of "
    "damaged items are free within thirty days, and gift cards never expire. Question:"
)
QUESTIONS = [" How long do refunds take?", " Are damaged returns free?", " Do gift cards expire?"]
GEN = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("batching")
    proc = ServerProcess(
        tmp / "server.log",
        "--parallel",
        str(PARALLEL),
        "--max-queue",
        "0",
        "--n-ctx",
        str(N_CTX),
        "--prefill-budget",
        "16",
        "--session-dir",
        str(tmp / "sessions"),
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
    log = proc.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference() -> Iterator[LLM]:
    with LLM(cache=None, n_ctx=N_CTX) as llm:
        yield llm


def complete(client: openai.OpenAI, prompt: str) -> tuple[str, list[float], int]:
    r = client.completions.create(
        model="default", prompt=prompt, max_tokens=GEN, temperature=0, logprobs=0
    )
    details = r.usage.prompt_tokens_details
    return r.choices[0].text, r.choices[0].logprobs.token_logprobs, details.cached_tokens


def uncached(llm: LLM, prompt: str) -> tuple[str, list[float]]:
    """The library's greedy answer and its tokens' logprobs, from an LLM without a cache."""
    llm.reset_context()
    config = GenerationConfig(max_tokens=GEN, temperature=0, logprobs=0)
    steps = list(llm.stream_steps(prompt, config))
    return "".join(s.text for s in steps), [e.logprob for s in steps for e in s.logprobs]


def batching(server: ServerProcess) -> dict[str, int]:
    return httpx.get(f"{server.url}/v1/cache/stats").json()["workers"]["batching"]


def test_concurrent_answers_equal_the_uncached_library(server, client, reference):
    prompts = [SHARED + q for q in QUESTIONS]
    expected = [uncached(reference, p) for p in prompts]
    alone = [complete(client, p) for p in prompts]  # one at a time (the first fills the cache)
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: complete(client, p), prompts))
    for (text, logprobs), a, t in zip(expected, alone, together, strict=True):
        assert (a[0], a[1]) == (text, logprobs)
        assert (t[0], t[1]) == (text, logprobs)
    # Later requests reused the shared prefix: from the live sequences or the cache.
    assert all(t[2] > 0 for t in together) and alone[1][2] > 0
    # And the concurrent ones really ran together: one llama_decode call held all their sequences.
    assert batching(server)["peak_sequences"] == len(prompts)


def test_n_choices_fork_one_prompt(client, reference):
    prompt = SHARED + QUESTIONS[0]
    r = client.completions.create(
        model="default", prompt=prompt, max_tokens=GEN, temperature=0, n=2
    )
    text, logprobs = uncached(reference, prompt)
    assert [c.text for c in r.choices] == [text] * 2
    assert r.usage.completion_tokens == 2 * len(logprobs)
    with pytest.raises(openai.BadRequestError, match="n is too large"):
        client.completions.create(model="default", prompt=prompt, max_tokens=2, n=PARALLEL + 1)


def test_a_chat_turn_reuses_the_previous_reply(client):
    messages = [{"role": "user", "content": SHARED + QUESTIONS[2]}]
    first = client.chat.completions.create(
        model="default", messages=messages, max_tokens=GEN, temperature=0
    )
    reply = first.choices[0].message.content
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Thanks."}]
    second = client.chat.completions.create(
        model="default", messages=messages, max_tokens=GEN, temperature=0
    )
    # The second turn's prompt holds the first one and its reply: all of that comes back.
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens


def test_a_short_prompt_reaches_the_shared_cache(server, client):
    """A prompt shorter than a particle-step threshold (KEEP_MIN_TOKENS) is still cached, as the
    one-at-a-time server caches every prompt: another worker or process restores it."""
    before = httpx.get(f"{server.url}/v1/cache/stats").json()
    r = client.completions.create(model="default", prompt="Tents or boots?", max_tokens=2)
    assert 0 < r.usage.prompt_tokens < 32
    after = httpx.get(f"{server.url}/v1/cache/stats").json()
    assert after["workers"]["batching"]["inserts"] == before["workers"]["batching"]["inserts"] + 1
    assert after["cache"]["bytes"] > before["cache"]["bytes"]


def test_full_slots_answer_503_and_a_disconnect_frees_its_sequence(server, client):
    long = SHARED + " Write a long story about tents."
    streams = [
        client.completions.create(
            model="default", prompt=long, max_tokens=200, temperature=0, stream=True
        )
        for _ in range(PARALLEL)
    ]
    for s in streams:
        next(iter(s))  # each is live: it has produced its first chunk
    with pytest.raises(openai.APIStatusError) as busy:
        client.completions.create(model="default", prompt="Hi", max_tokens=2)
    assert busy.value.status_code == 503
    assert int(busy.value.response.headers["Retry-After"]) >= 1
    for s in streams:
        s.close()  # the clients leave mid-stream
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/health").json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    health = httpx.get(f"{server.url}/health").json()
    assert health["busy"] == 0 and health["parallel"] == PARALLEL
    assert complete(client, "Hello")[0] is not None  # served again
    workers = httpx.get(f"{server.url}/v1/cache/stats").json()["workers"]
    assert workers["slots"] == PARALLEL and workers["kv_bytes"] >= PARALLEL * N_CTX * 1000


def test_the_kv_cache_is_bounded_by_a_setting(tmp_path: Path):
    settings = ServerSettings.load(parallel=8, n_ctx=4096, max_kv_bytes=1 << 20, cache="none")
    with pytest.raises(ConfigError, match="max_kv_bytes"):
        create_app(settings)


def test_one_client_past_its_stream_limit_gets_429(tmp_path: Path):
    proc = ServerProcess(
        tmp_path / "server.log",
        "--parallel",
        "2",
        "--n-ctx",
        str(N_CTX),
        "--max-streams-per-client",
        "1",
        "--cache",
        "none",
    )
    try:
        proc.wait_ready()
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="x", max_retries=0, timeout=300)
        stream = client.completions.create(
            model="default", prompt=SHARED, max_tokens=200, temperature=0, stream=True
        )
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as limited:
            client.completions.create(model="default", prompt="Hi", max_tokens=2)
        assert limited.value.response.headers["Retry-After"] == "1"
        assert "at once" in limited.value.message
        stream.close()
        deadline = time.monotonic() + 60
        while True:  # the stream's end releases the client's count
            try:
                client.completions.create(model="default", prompt="Hi", max_tokens=2)
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the closed stream was never released"
                time.sleep(0.2)
    finally:
        proc.stop()
    log = proc.log.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_more_requests_than_sequences_wait_their_turn_and_all_complete(tmp_path: Path, reference):
    """A full server queues: after earlier requests left live sequences behind, N + 1 and then 2N
    streamed requests sent at once to a server of N sequences all complete, none fails, and each
    gets the library's answer."""
    proc = ServerProcess(
        tmp_path / "server.log", "--parallel", str(PARALLEL), "--n-ctx", str(N_CTX)
    )
    try:
        proc.wait_ready()
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="x", max_retries=0, timeout=600)
        for q in QUESTIONS:  # earlier requests: their sequences stay live, idle
            complete(client, SHARED + q)
        prompts = [f"{SHARED} Question {i}: which item is number {i}?" for i in range(2 * PARALLEL)]
        want = {p: uncached(reference, p)[0] for p in prompts}

        def streamed(prompt: str) -> str:
            chunks = client.completions.create(
                model="default", prompt=prompt, max_tokens=GEN, temperature=0, stream=True
            )
            return "".join(c.choices[0].text for c in chunks if c.choices)

        for batch in (prompts[: PARALLEL + 1], prompts):
            with ThreadPoolExecutor(len(batch)) as pool:
                got = list(pool.map(streamed, batch))
            assert got == [want[p] for p in batch]
        stats = httpx.get(f"{proc.url}/v1/cache/stats").json()["workers"]["batching"]
        assert stats["evictions"] > 0 and stats["peak_sequences"] > 1
    finally:
        proc.stop()
    log = proc.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
