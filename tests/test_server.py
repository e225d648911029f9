"""The OpenAI-compatible server, driven as users drive it: real server processes on loopback ports,
the official `openai` client, and httpx for the raw bad requests a client library would refuse to send.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from server_process import ServerProcess as _Server  # the name the tests below use
from server_process import serving

from promptcache.model import default_model_path

API_KEY = "test-key-123"
N_CTX = 1024
MAX_BODY = 65536
SYSTEM = "You are a terse assistant for the Northwind test suite. Answer in a few words."


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, _Server]]:
    """Two servers sharing one session directory, started together (loading in parallel):
    `open`: 2 workers, no key, a RAM cache; `keyed`: 1 worker of one sequence, an API key, a queue
    of 1 (to see 503s) and a tiered cache (RAM, then disk) from a config file's [cache] table."""
    tmp = tmp_path_factory.mktemp("server")
    sessions = tmp / "sessions"
    config = tmp / "promptcache.toml"
    config.write_text(
        f'[cache]\nmemory_size = "256MB"\ndisk_size = "512MB"\ndisk_path = "{tmp / "kv"}"\n'
    )
    tiered = ["--cache", "tiered", "--config", str(config)]
    common = [
        "--log-level",
        "warning",
        "--n-ctx",
        str(N_CTX),
        "--max-body-bytes",
        str(MAX_BODY),
        "--session-dir",
        str(sessions),
    ]
    started = {
        "open": _Server(tmp / "open.log", "--workers", "2", "--max-queue", "8", *common),
        "keyed": _Server(
            tmp / "keyed.log",
            "--workers",
            "1",
            "--parallel",
            "1",
            "--max-queue",
            "1",
            "--api-key",
            API_KEY,
            *tiered,
            *common,
        ),
    }
    with serving(started):
        yield started
    codes = {name: s.proc.returncode for name, s in started.items()}
    # A clean shutdown after everything the tests threw at them: nothing hung (uvicorn re-raises the
    # SIGTERM it caught once it has shut down gracefully) and nothing was logged as an error.
    for name, s in started.items():
        log = s.log.read_text()
        assert codes[name] in (0, -signal.SIGTERM), (name, codes[name], log[-3000:])
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


@pytest.fixture(scope="module")
def server(servers: dict[str, _Server]) -> _Server:
    return servers["open"]


@pytest.fixture(scope="module")
def client(server: _Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int = 6) -> object:
    return client.chat.completions.create(
        model="default", messages=messages, max_tokens=max_tokens, temperature=0
    )


def _stats(url: str, **headers: str) -> dict:
    r = httpx.get(f"{url}/v1/cache/stats", headers=headers, timeout=30)
    assert r.status_code == 200
    return r.json()


# ------------------------------------------------------------------------------------ happy paths


def test_models_lists_the_gguf_stem(client: openai.OpenAI) -> None:
    stem = Path(default_model_path()).stem
    assert [m.id for m in client.models.list().data] == [stem]
    assert client.models.retrieve("default").id == stem


def test_completion(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="default", prompt="The capital of France is", max_tokens=4, temperature=0
    )
    choice = out.choices[0]
    assert out.object == "text_completion" and choice.text.strip()
    assert choice.finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens > 0 and 0 < out.usage.completion_tokens <= 4
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat(client: openai.OpenAI) -> None:
    out = _chat(
        client,
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a colour."}],
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content.strip()
    assert out.model == Path(default_model_path()).stem


def test_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Say something about boats."},
    ]
    whole = _chat(client, messages, max_tokens=8)
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )
    # The repeat's prompt was cached by the first request: all but the last few tokens are reused.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens - 8

    pieces = list(
        client.completions.create(
            model="default", prompt="One, two, three,", max_tokens=5, temperature=0, stream=True
        )
    )
    plain = client.completions.create(
        model="default", prompt="One, two, three,", max_tokens=5, temperature=0
    )
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text


def test_multi_turn_chat_reuses_the_conversation(client: openai.OpenAI) -> None:
    messages = [
        {
            "role": "system",
            "content": SYSTEM + " The secret word of this conversation is pelican-42.",
        },
        {"role": "user", "content": "What is the secret word?"},
    ]
    first = _chat(client, messages)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Spell it backwards."},
    ]
    second = _chat(client, messages)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0
    # Turn 2 restores at least turn 1's whole prompt (less the few tokens re-read for exact logits).
    assert cached >= first.usage.prompt_tokens - 8
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_concurrent_requests_match_sequential(client: openai.OpenAI, server: _Server) -> None:
    questions = [f"Question {i}: what is {i} plus {i + 1}?" for i in range(8)]

    def ask(q: str) -> str:
        out = _chat(
            client,
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            max_tokens=8,
        )
        return out.choices[0].message.content

    sequential = [ask(q) for q in questions]
    before = _stats(server.url)["cache"]["hits"]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, questions))
    assert concurrent == sequential
    assert _stats(server.url)["cache"]["hits"] > before  # the shared cache served the second round


# ------------------------------------------------------------------------------------ safety


def test_api_key_accepted_and_refused(servers: dict[str, _Server]) -> None:
    keyed = servers["keyed"]
    good = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    assert good.models.list().data
    assert good.completions.create(
        model="default", prompt="Hello", max_tokens=2, temperature=0
    ).choices
    bad = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path in ("/v1/models", "/metrics", "/v1/cache/stats", "/v1/sessions"):
        r = httpx.get(keyed.url + path, timeout=30)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(
        f"{keyed.url}/v1/completions",
        json={"prompt": "x"},
        headers={"Authorization": "Basic abc"},
        timeout=30,
    )
    assert r.status_code == 401
    assert httpx.get(f"{keyed.url}/health", timeout=30).status_code == 200  # health needs no key


def _long_prompt(tag: str) -> str:
    return f"Report {tag}. " + " ".join(f"Item {i} costs {i * 7 % 97} crowns." for i in range(40))


def test_full_queue_answers_503_with_retry_after(servers: dict[str, _Server]) -> None:
    keyed = servers[
        "keyed"
    ]  # 1 sequence, 1 waiting place: of 5 requests sent at once, at least 3 are turned away
    headers = {"Authorization": f"Bearer {API_KEY}"}
    tag = os.urandom(2).hex()  # fresh prompts: nothing cached makes these requests quick

    def send(i: int) -> httpx.Response:
        body = {"prompt": _long_prompt(f"{tag}-{i}"), "max_tokens": 8, "temperature": 0}
        return httpx.post(f"{keyed.url}/v1/completions", json=body, headers=headers, timeout=120)

    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(send, range(5)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and codes.count(503) >= 3 and codes.count(200) >= 1, codes
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "server_busy"
    assert send(99).status_code == 200  # and it serves again once the queue drains


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": ', 400, None, "invalid_json"),
        ("/v1/completions", b"[1, 2, 3]", 400, None, "invalid_json"),
        ("/v1/completions", b"", 400, None, "invalid_json"),
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": NaN}', 400, None, "invalid_json"),
        (
            "/v1/completions",
            {"prompt": "hi", "max_tokens": "5"},
            400,
            "max_tokens",
            "invalid_value",
        ),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        (
            "/v1/completions",
            {"prompt": "hi", "temperature": "hot"},
            400,
            "temperature",
            "invalid_value",
        ),
        ("/v1/completions", {"prompt": 42}, 400, "prompt", "invalid_value"),
        ("/v1/completions", {"max_tokens": 4}, 400, "prompt", "invalid_value"),
        ("/v1/completions", {"prompt": [10**7]}, 400, "prompt", "invalid_value"),
        ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "n", "invalid_value"),
        (
            "/v1/completions",
            {"prompt": "hi", "suffix": "x"},
            400,
            "suffix",
            "unsupported_parameter",
        ),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", "invalid_value"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
            400,
            "tools",
            "unsupported_parameter",
        ),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4o"}, 404, "model", "model_not_found"),
        (
            "/v1/completions",
            {"prompt": "hi", "max_tokens": N_CTX + 1},
            400,
            "max_tokens",
            "invalid_value",
        ),
        (
            "/v1/completions",
            {"prompt": "word " * N_CTX, "max_tokens": 8},
            400,
            "prompt",
            "context_length_exceeded",
        ),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "invalid_value"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "wizard", "content": "hi"}]},
            400,
            "messages[0].role",
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": 7}]},
            400,
            "messages[0].content",
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
            400,
            "stream",
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "model": "nope"},
            404,
            "model",
            "model_not_found",
        ),
        ("/v1/sessions/bad.id/save", {"prompt": "hi"}, 400, "session_id", "invalid_session_id"),
        ("/v1/sessions/never-saved/restore", {}, 404, "session_id", "session_not_found"),
    ],
)
def test_bad_input_gets_the_right_4xx(
    server: _Server, path: str, body: object, status: int, param: str | None, code: str
) -> None:
    if isinstance(body, bytes):
        r = httpx.post(
            server.url + path,
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
    else:
        r = httpx.post(server.url + path, json=body, timeout=60)
    error = _error(r, status)
    assert (error["param"], error["code"]) == (param, code)


def test_oversized_unknown_and_wrong_method_then_still_serving(
    server: _Server, client: openai.OpenAI
) -> None:
    big = b'{"prompt": "' + b"a" * (MAX_BODY * 2) + b'"}'
    assert (
        _error(httpx.post(f"{server.url}/v1/completions", content=big, timeout=60), 413)["code"]
        == "request_too_large"
    )
    assert (
        _error(httpx.get(f"{server.url}/v1/nothing-here", timeout=60), 404)["code"] == "not_found"
    )
    assert (
        _error(httpx.get(f"{server.url}/v1/completions", timeout=60), 405)["code"]
        == "method_not_allowed"
    )
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], n=17
        )
    # Nothing above killed a worker: both still answer, and the health check says so.
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health["workers"] == 2 and health["status"] == "ok"
    with ThreadPoolExecutor(2) as pool:
        outs = list(
            pool.map(lambda q: _chat(client, [{"role": "user", "content": q}], 3), ["Hi", "Hello"])
        )
    assert all(o.choices[0].message.content for o in outs)


def test_client_disconnect_stops_generation(server: _Server) -> None:
    before = _stats(server.url)
    body = {
        "prompt": "Count to a thousand: 1, 2, 3, 4, 5,",
        "max_tokens": 512,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one token arrived: hang up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = _stats(server.url)
        if after["requests"].get("cancelled", 0) > before["requests"].get("cancelled", 0):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the server did not notice the disconnect")
    generated = after["tokens"]["completion_tokens"] - before["tokens"]["completion_tokens"]
    assert 0 < generated < 512


# ------------------------------------------------------------------------------------ sessions, metrics


def test_session_saved_by_one_server_restores_into_another(
    servers: dict[str, _Server], tmp_path: Path
) -> None:
    open_, keyed = servers["open"], servers["keyed"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    messages = [
        {
            "role": "system",
            "content": SYSTEM + " This session is about saving and restoring sessions, id 7781.",
        },
        {"role": "user", "content": "Remember the number 7781."},
    ]
    saved = httpx.post(
        f"{open_.url}/v1/sessions/chat-7781/save", json={"messages": messages}, timeout=60
    ).json()
    assert saved["id"] == "chat-7781" and saved["tokens"] > 20 and saved["bytes"] > 0
    listed = httpx.get(f"{keyed.url}/v1/sessions", headers=headers, timeout=30).json()["data"]
    assert "chat-7781" in [s["id"] for s in listed]

    restored = httpx.post(f"{keyed.url}/v1/sessions/chat-7781/restore", headers=headers, timeout=60)
    assert restored.status_code == 200 and restored.json()["tokens"] == saved["tokens"]
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    out = _chat(client, messages, max_tokens=4)
    assert out.usage.prompt_tokens_details.cached_tokens >= saved["tokens"] - 8

    (Path(_session_dir(keyed)) / "broken.session").write_bytes(b"not a session at all")
    error = _error(
        httpx.post(f"{keyed.url}/v1/sessions/broken/restore", headers=headers, timeout=60), 422
    )
    assert error["code"] == "session_corrupt"
    assert (
        httpx.delete(f"{keyed.url}/v1/sessions/chat-7781", headers=headers, timeout=30).status_code
        == 200
    )
    _error(
        httpx.post(f"{keyed.url}/v1/sessions/chat-7781/restore", headers=headers, timeout=60), 404
    )


def test_session_file_written_whole_or_500(server: _Server) -> None:
    sessions = Path(_session_dir(server))
    saved = httpx.post(
        f"{server.url}/v1/sessions/plain-42/save",
        json={"prompt": "Session file check."},
        timeout=60,
    ).json()
    assert saved["bytes"] == (sessions / "plain-42.session").stat().st_size > 0
    # A directory where the file should go: the write fails, the client gets a 500 and the
    # server leaves no partial or temporary file behind.
    occupied = sessions / "occupied.session"
    occupied.mkdir(parents=True)
    try:
        r = httpx.post(
            f"{server.url}/v1/sessions/occupied/save", json={"prompt": [1, 2, 3]}, timeout=60
        )
        error = _error(r, 500)
        assert error["type"] == "server_error"
        assert error["message"].startswith("cannot write the session")
        assert not [p.name for p in sessions.iterdir() if p.name.endswith(".tmp")]
    finally:
        occupied.rmdir()
    httpx.delete(f"{server.url}/v1/sessions/plain-42", timeout=30).raise_for_status()


def _session_dir(server: _Server) -> str:
    args = server.proc.args
    return args[args.index("--session-dir") + 1]


def _metrics(text: str) -> dict[str, float]:
    """Prometheus text format: series (name and labels) to value."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_and_cache_stats(server: _Server, client: openai.OpenAI) -> None:
    prompt = "Metrics check: the quick brown fox jumps over the lazy dog."
    for _ in range(2):
        client.completions.create(model="default", prompt=prompt, max_tokens=2, temperature=0)
    stats = _stats(server.url)
    assert stats["cache"]["hits"] > 0 and stats["cache"]["bytes"] > 0
    assert stats["tokens"]["tokens_reused"] > 0 and stats["tokens"]["tokens_evaluated"] > 0
    r = httpx.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = _metrics(r.text)
    assert values["promptcache_cache_hits_total"] == stats["cache"]["hits"]
    assert values["promptcache_cache_misses_total"] == stats["cache"]["misses"]
    assert values['promptcache_store_bytes{tier="memory"}'] == stats["cache"]["store"]["bytes"] > 0
    assert 'promptcache_store_evictions_total{tier="memory"}' in values
    assert (
        values["promptcache_prompt_tokens_evaluated_total"] == stats["tokens"]["tokens_evaluated"]
    )
    assert values['promptcache_time_to_first_token_seconds_count{endpoint="/v1/completions"}'] >= 2
    assert values["promptcache_workers"] == 2


def test_tiered_cache_reports_every_tier(servers: dict[str, _Server]) -> None:
    keyed = servers["keyed"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {
        "prompt": "Tiers: the state goes to RAM and to disk.",
        "max_tokens": 2,
        "temperature": 0,
    }
    r = httpx.post(f"{keyed.url}/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200
    tiers = {t["tier"]: t for t in _stats(keyed.url, **headers)["tiers"]}
    assert set(tiers) == {"memory", "disk"}
    assert tiers["memory"]["bytes"] > 0 and tiers["disk"]["bytes"] > 0
    values = _metrics(httpx.get(f"{keyed.url}/metrics", headers=headers, timeout=30).text)
    for tier in ("memory", "disk"):
        assert values[f'promptcache_store_bytes{{tier="{tier}"}}'] == tiers[tier]["bytes"]
