"""The OpenAI fields real clients send (issue 13), through the official `openai` client against real
servers: logprobs and top_logprobs, echo with prompt logprobs, n > 1, response_format, penalties and
logit_bias. A cached server and an uncached one (`--cache none`) must give the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from server_process import cached_and_uncached, serving

PROMPT = "Question: which animal says moo? Answer:"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, openai.OpenAI]]:
    """`cached`: a RAM prefix cache; `none`: no cache (every echo evaluates its whole prompt)."""
    tmp = tmp_path_factory.mktemp("fields")
    with serving(cached_and_uncached(tmp, "--n-ctx", "512", "--workers", "1")) as servers:
        yield {
            name: openai.OpenAI(
                base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=300
            )
            for name, s in servers.items()
        }
    for s in servers.values():
        log = s.log.read_text()
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def test_completion_logprobs_streaming_equals_whole(pair: dict[str, openai.OpenAI]) -> None:
    client = pair["cached"]
    args = {"model": "default", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 3}
    whole = client.completions.create(**args).choices[0]
    lp = whole.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == whole.text and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and logprob <= 0
        assert top[token] == logprob == max(top.values())  # greedy: the chosen token is the top one
    chunks = list(client.completions.create(**args, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.token_logprobs] == lp.token_logprobs
    assert [t for s in streamed for t in s.text_offset] == lp.text_offset
    # The same request against the uncached server: the same numbers, bit for bit.
    assert pair["none"].completions.create(**args).choices[0].logprobs == lp


def test_chat_logprobs_streaming_and_uncached(pair: dict[str, openai.OpenAI]) -> None:
    messages = [{"role": "user", "content": "Name a fruit."}]
    args = {
        "model": "default",
        "messages": messages,
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = pair["cached"].chat.completions.create(**args).choices[0]
    content = whole.logprobs.content
    assert "".join(c.token for c in content) == whole.message.content
    for c in content:
        assert bytes(c.bytes).decode(errors="replace") == c.token
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob
    chunks = list(pair["cached"].chat.completions.create(**args, stream=True))
    streamed = [
        c
        for k in chunks
        if k.choices and k.choices[0].logprobs
        for c in k.choices[0].logprobs.content
    ]
    assert streamed == content
    again = pair["cached"].chat.completions.create(**args)
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the repeat came from the cache
    assert again.choices[0].logprobs.content == content
    assert pair["none"].chat.completions.create(**args).choices[0].logprobs.content == content
    # logprobs false: none reported; top_logprobs without logprobs: a 400 naming it.
    plain = pair["cached"].chat.completions.create(
        **{**args, "logprobs": False, "top_logprobs": None}
    )
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as err:
        pair["cached"].chat.completions.create(**{**args, "logprobs": False})
    assert err.value.body["param"] == "top_logprobs"


def _echo(client: openai.OpenAI, prompt: str | list[int], **kw: object) -> object:
    return client.completions.create(
        model="default", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0, **kw
    )


def test_echo_scores_the_prompt_exactly_from_the_cache(pair: dict[str, openai.OpenAI]) -> None:
    context = (
        "The farmer walked to the barn at dawn and heard a sound. The animal that says moo is a"
    )
    answers = [" cow", " horse that neighs", " duck"]
    for answer in answers:
        cached = _echo(pair["cached"], context + answer)
        cold = _echo(pair["none"], context + answer)
        choice = cached.choices[0]
        assert choice.text == context + answer and choice.finish_reason == "length"
        assert cached.usage.completion_tokens == 0
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # as OpenAI and vLLM
        assert len(lp.tokens) == cached.usage.prompt_tokens
        assert "".join(lp.tokens) == choice.text
        assert lp == cold.choices[0].logprobs  # bit for bit, restored or not
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
    # The later answers restored the shared context (its prompt logprobs remembered with its KV).
    assert cached.usage.prompt_tokens_details.cached_tokens >= cached.usage.prompt_tokens // 2
    # echo with generation: the prompt, then the completion, in one text and one logprobs block.
    both = pair["cached"].completions.create(
        model="default", prompt=context, max_tokens=2, echo=True, logprobs=0, temperature=0
    )
    choice = both.choices[0]
    assert (
        choice.text.startswith(context) and len(choice.logprobs.tokens) == both.usage.total_tokens
    )
    assert choice.logprobs.top_logprobs[-1] == {}  # logprobs 0: the chosen token only


def test_max_tokens_zero_needs_echo(pair: dict[str, openai.OpenAI]) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        pair["cached"].completions.create(model="default", prompt=PROMPT, max_tokens=0)
    assert err.value.body["param"] == "max_tokens"


def test_n_choices_share_one_prefill(pair: dict[str, openai.OpenAI]) -> None:
    client = pair["cached"]
    out = client.completions.create(
        model="default", prompt=PROMPT + " A", max_tokens=4, temperature=1.0, n=3, seed=7
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    for i, choice in enumerate(out.choices):
        alone = client.completions.create(
            model="default", prompt=PROMPT + " A", max_tokens=4, temperature=1.0, seed=7 + i
        )
        assert alone.choices[0].text == choice.text
    assert len({c.text for c in out.choices}) > 1
    assert out.usage.completion_tokens <= 12
    greedy = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=3,
        temperature=0,
        n=2,
        stream=True,
    )
    texts = ["", ""]
    for chunk in greedy:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts[0] and texts[0] == texts[1]


def test_response_format_json(pair: dict[str, openai.OpenAI]) -> None:
    client = pair["cached"]
    messages = [{"role": "user", "content": "Describe a cat as JSON."}]
    out = client.chat.completions.create(
        model="default",
        messages=messages,
        max_tokens=40,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "cat",
                "schema": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 8},
                        "age": {"type": "integer"},
                    },
                    "required": ["name", "age"],
                },
            },
        },
    )
    value = json.loads(out.choices[0].message.content)
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    free = client.chat.completions.create(
        model="default",
        messages=messages,
        max_tokens=6,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert free.choices[0].message.content.lstrip().startswith(("{", "["))
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="default", messages=messages, max_tokens=4, response_format={"type": "yaml"}
        )
    assert err.value.body["param"] == "response_format"


def _tokens(client: openai.OpenAI, text: str) -> list[int]:
    url = str(client.base_url).replace("/v1/", "/tokenize")
    r = httpx.post(url, json={"prompt": text, "add_special_tokens": False}, timeout=30)
    assert r.status_code == 200
    return r.json()["tokens"]


def test_logit_bias_and_penalties_change_the_tokens(pair: dict[str, openai.OpenAI]) -> None:
    client = pair["cached"]
    args = {"model": "default", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 0}
    base = client.completions.create(**args).choices[0]
    first = _tokens(client, base.text)[0]
    banned = client.completions.create(**args, logit_bias={str(first): -100}).choices[0]
    assert banned.text != base.text
    # logprobs stay the model's (before bias): the banned token is still the top alternative.
    assert banned.logprobs.top_logprobs[0] == base.logprobs.top_logprobs[0]
    bang = _tokens(client, "!")[0]
    forced = client.completions.create(**args, logit_bias={str(bang): 100}).choices[0]
    assert forced.text == "!" * 8
    loop = {**args, "prompt": "one one one one one one one one", "max_tokens": 6}
    repeated = client.completions.create(**loop).choices[0]
    tokens = repeated.logprobs.tokens
    assert len(set(tokens)) < len(tokens)  # greedy decoding repeats itself here...
    penalised = client.completions.create(**loop, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].text != repeated.text  # ...and the penalties change that
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**args, logit_bias={"not-a-token": 1})
    assert err.value.body["param"] == "logit_bias"


def test_sampler_penalties_and_bias_against_a_brute_force_oracle() -> None:
    """Sampler (no model): greedy over logits minus OpenAI's penalties plus the bias, step by step."""
    import numpy as np

    from promptcache.engines.llama_cpp.generation import GenerationConfig, Sampler

    rng = np.random.default_rng(0)
    for _ in range(50):
        logits = rng.normal(size=12).astype(np.float32)
        bias = {int(rng.integers(12)): float(rng.normal() * 3)}
        presence, frequency = float(rng.uniform(-2, 2)), float(rng.uniform(-2, 2))
        config = GenerationConfig(
            temperature=0, presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias
        )
        sampler, counts = Sampler(config, rng), {}
        for _ in range(6):
            expect = [
                float(logits[t])
                - (presence * (counts.get(t, 0) > 0) + frequency * counts.get(t, 0))
                + bias.get(t, 0.0)
                for t in range(12)
            ]
            token = sampler(logits)
            assert expect[token] >= max(expect) - 1e-4
            counts[token] = counts.get(token, 0) + 1


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-12])
def test_a_tiny_temperature_samples_the_top_token(temperature: float) -> None:
    """Found by fuzzing the server (schemathesis): logits / 5e-324 overflowed, inf - inf made the
    probabilities NaN and the request failed inside a worker."""
    import warnings

    import numpy as np

    from promptcache.engines.llama_cpp.generation import GenerationConfig, sample

    logits = np.array([1.0, 3.5, -2.0, 3.25], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for top_p in (1.0, 0.5):
            config = GenerationConfig(temperature=temperature, top_p=top_p)
            assert sample(logits, config, np.random.default_rng(0)) == 1


def test_any_integer_is_a_seed() -> None:
    """Found by fuzzing the server: a negative seed raised inside numpy, in the worker."""
    import numpy as np

    from promptcache.engines.llama_cpp.generation import GenerationConfig, TokenLoop

    logits = np.random.default_rng(1).normal(size=50).astype(np.float32)

    def draw(seed: int) -> list[int]:
        loop = TokenLoop(
            GenerationConfig(temperature=1.0, seed=seed),
            8,
            is_eog=lambda t: False,
            piece=lambda t: b"x",
        )
        return [loop.sampler(logits) for _ in range(8)]

    for seed in (-1, -(2**70), 2**70, 0):
        assert draw(seed) == draw(seed)  # reproducible
    assert draw(-1) != draw(-2)
