"""A fleet: two real servers behind the real vllm-router (the test extra's 0.1.17), on loopback.

Two conversations run at once, each turn's two requests sent 0.2 s apart in alternating order. A
router that knows nothing of the servers sends the first of a pair to worker 1 and the second to
the idle worker 2 (measured: kv_aware without events swaps the conversations every other turn), so
"every later turn lands where its conversation's first did" holds only when the router follows the
prefixes: kv_aware through the servers' KV events, cache_aware through the token ids the servers
give it (/v1/chat/completions/render, /tokenize). Where each request landed is read from the
servers' own counters (/v1/cache/stats), and so is the reuse it got there ("live": the
conversation's sequence, still held). The servers share one Redis tier: one restores what the
other computed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from redis_fixture import RedisServer
from server_process import ChildProcess, ServerProcess, free_port, serving

from promptcache.server.router import Worker, router_command

BLOCK = 16
STAGGER_S = 0.2  # orders the pair's arrival; a reply (16 tokens) takes longer than this
TURNS = 3  # the first, then one in each order


class RouterProcess(ChildProcess):
    """vllm-router on a free loopback port in front of `workers`, health-checked every second."""

    def __init__(self, log_path: Path, workers: list[Worker], policy: str) -> None:
        port = free_port()
        cmd = router_command(
            workers,
            policy=policy,
            port=port,
            prometheus_port=free_port(),
            block_size=BLOCK,
            health_check_secs=1,
        )
        super().__init__(cmd, log_path, port)

    def wait_ready(self, timeout: float = 60.0) -> None:
        super().wait_ready(timeout)
        time.sleep(1.0)  # its SUB sockets connect to the servers' events (ZMQ's slow joiner)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Redis, then two servers (a thread and 4 sequences each, a RAM tier and the shared Redis
    tier), each publishing KV events with a replay socket."""
    tmp = tmp_path_factory.mktemp("fleet")
    redis = RedisServer(tmp)
    redis.start()
    config = tmp / "fleet.toml"
    config.write_text(
        f'[cache]\nmemory_size = "256MB"\ndisk_size = 0\nredis_url = "{redis.url}"\n'
        'redis_size = "512MB"\n'
    )
    servers, workers = {}, []
    for name in ("one", "two"):
        events, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        servers[name] = ServerProcess(
            tmp / f"{name}.log",
            *("--log-level", "warning", "--threads", "1", "--parallel", "4", "--n-ctx", "1024"),
            *("--cache", "tiered", "--config", str(config)),
            *("--kv-events", events, "--kv-events-replay", replay),
        )
        workers.append(Worker(servers[name].url, events, replay))
    try:
        with serving(servers):
            yield {"servers": list(servers.values()), "workers": workers, "tmp": tmp}
    finally:
        redis.stop()
    for s in servers.values():
        log = s.log.read_text()
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def _stats(server: ServerProcess) -> dict:
    r = httpx.get(f"{server.url}/v1/cache/stats", timeout=30)
    assert r.status_code == 200
    return r.json()


def _counters(server: ServerProcess) -> tuple[int, int]:
    """(prompt tokens of finished generations, prompt tokens reused from live sequences)."""
    stats = _stats(server)
    return stats["tokens"]["prompt_tokens"], stats["tokens_reused_by_source"].get("live", 0)


def _chat(url: str, messages: list[dict[str, str]], delay: float) -> dict:
    time.sleep(delay)
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "default", "messages": messages, "max_tokens": 16, "temperature": 0},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _conversations(tag: str) -> dict[str, list[dict[str, str]]]:
    """Two conversations whose prompts differ in length by far more than a turn adds, so that a
    server's prompt-token count tells which one it served."""
    return {
        "short": [{"role": "system", "content": f"{tag}: you answer about tents. " * 6}],
        "long": [{"role": "system", "content": f"{tag}: you answer about stoves and fuel. " * 22}],
    }


def _run_conversations(fleet: dict, policy: str, tag: str) -> None:
    servers = fleet["servers"]
    router = RouterProcess(fleet["tmp"] / f"router-{policy}.log", fleet["workers"], policy)
    try:
        router.wait_ready()
        convs = _conversations(tag)
        home: dict[str, int] = {}  # conversation -> the server that served its first turn
        last_prompt: dict[str, int] = {}
        with ThreadPoolExecutor(2) as pool:
            for turn in range(TURNS):
                order = ["short", "long"] if turn % 2 == 0 else ["long", "short"]
                for name, messages in convs.items():
                    messages.append({"role": "user", "content": f"Turn {turn} of {name}: why?"})
                before = [_counters(s) for s in servers]
                futures = {
                    name: pool.submit(_chat, router.url, convs[name], STAGGER_S * i)
                    for i, name in enumerate(order)
                }
                replies = {name: f.result() for name, f in futures.items()}
                after = [_counters(s) for s in servers]
                prompt = {name: r["usage"]["prompt_tokens"] for name, r in replies.items()}
                served = [a[0] - b[0] for a, b in zip(after, before)]
                landed = {}
                for name in convs:
                    where = [i for i, n in enumerate(served) if n == prompt[name]]
                    assert len(where) == 1, (policy, turn, served, prompt)  # not both on one
                    landed[name] = where[0]
                if turn == 0:
                    home = landed
                    assert sorted(home.values()) == [0, 1], (policy, home)
                else:
                    assert landed == home, (policy, turn, landed, home)
                    for name, i in landed.items():
                        live = after[i][1] - before[i][1]
                        assert live >= last_prompt[name], (policy, turn, name, live)
                        details = replies[name]["usage"]["prompt_tokens_details"]
                        assert details["cached_tokens_source"] == "live"
                for name, reply in replies.items():
                    text = reply["choices"][0]["message"]["content"]
                    convs[name].append({"role": "assistant", "content": text})
                last_prompt = prompt
    finally:
        router.stop()


def test_kv_aware_keeps_each_conversation_on_its_server(fleet: dict) -> None:
    _run_conversations(fleet, "kv_aware", "kv")
    for server in fleet["servers"]:
        events = _stats(server)["kv_events"]
        assert events["events"]["BlockStored"] > 0 and events["blocks_announced"]["GPU"] > 0


def test_cache_aware_keeps_each_conversation_on_its_server(fleet: dict) -> None:
    _run_conversations(fleet, "cache_aware", "ca")


def test_a_server_restores_what_another_computed_through_redis(fleet: dict) -> None:
    one, two = fleet["servers"]
    prompt = "Shared through Redis: the Northwind catalogue lists tents, stoves and packs. " * 6
    body = {"model": "default", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    first = httpx.post(f"{one.url}/v1/completions", json=body, timeout=300).json()
    before = _stats(two)["tokens_reused_by_source"].get("redis", 0)
    second = httpx.post(f"{two.url}/v1/completions", json=body, timeout=300).json()
    assert second["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"] - 8
    assert _stats(two)["tokens_reused_by_source"]["redis"] - before == cached
