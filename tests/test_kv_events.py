"""vLLM-compatible tokenization and KV events of one real server (`--kv-events`), read by an
independent subscriber that decodes the frames with msgpack itself: what a prefix-aware router
(vllm-router's cache_aware and kv_aware) relies on. The router itself: tests/test_fleet.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import msgpack
import pytest
import zmq
from server_process import ServerProcess, free_port, serving

from promptcache.server.kv_blocks import ROOT, Removed, Stored, chain_hash
from promptcache.server.kv_events import encode

pytest_plugins = ["redis_fixture"]  # a real redis-server on a free loopback port

BLOCK = 16
SYSTEM = "You are the terse assistant of the Northwind outdoor shop. " * 4
STORED_KEYS = {
    "type",
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
}


class Subscriber:
    """A SUB socket on the server's events, collecting (sequence number, topic, events) in a thread."""

    def __init__(self, endpoint: str) -> None:
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.connect(endpoint)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.batches: list[tuple[int, bytes, list]] = []
        self.payloads: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        time.sleep(0.5)  # ZMQ's slow joiner: the connection settles before anything is published

    def _read(self) -> None:
        while not self._stop.is_set():
            if self._sub.poll(50):
                topic, seq, payload = self._sub.recv_multipart()
                ts, events, rank = msgpack.unpackb(payload)
                assert isinstance(ts, float) and rank == 0
                self.batches.append((int.from_bytes(seq, "big"), topic, events))
                self.payloads.append(payload)

    def events(self) -> list[dict]:
        return [e for _, _, events in self.batches for e in events]

    def wait_for(self, what, timeout: float = 30.0) -> list[dict]:  # noqa: ANN001
        """The events so far, once `what(events)` holds (AssertionError after `timeout` s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events()
            if what(events):
                return events
            time.sleep(0.05)
        raise AssertionError(f"events never satisfied the condition: {self.events()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One sequence (a second prompt evicts the first's live KV) and a 4 MiB RAM cache (about 180
    tokens of SmolLM2: a third prompt evicts the first's entry)."""
    tmp = tmp_path_factory.mktemp("kv_events")
    events, replay = free_port(), free_port()
    started = ServerProcess(
        tmp / "server.log",
        "--log-level",
        "warning",
        "--parallel",
        "1",
        "--n-ctx",
        "512",
        "--cache-bytes",
        str(4 << 20),
        "--kv-events",
        f"tcp://127.0.0.1:{events}",
        "--kv-events-replay",
        f"tcp://127.0.0.1:{replay}",
    )
    started.events, started.replay = f"tcp://127.0.0.1:{events}", f"tcp://127.0.0.1:{replay}"
    with serving({"s": started}):
        yield started
    log = started.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def _post(server: ServerProcess, path: str, body: dict) -> dict:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _messages(question: str, reply: str | None = None) -> list[dict[str, str]]:
    out = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return out + ([{"role": "assistant", "content": reply}] if reply is not None else [])


# ------------------------------------------------------------------------------------ tokenize


def test_tokenize_messages_is_what_chat_evaluates(server: ServerProcess) -> None:
    messages = _messages("Which tent is lightest?")
    tokens = _post(server, "/tokenize", {"model": "default", "messages": messages})
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    chat = _post(
        server,
        "/v1/chat/completions",
        {"model": "default", "messages": messages, "max_tokens": 3, "temperature": 0},
    )
    assert chat["usage"]["prompt_tokens"] == tokens["count"]
    # The ids are the chat's own: as a completion's token-id prompt they are found in the cache
    # the chat left (all but the last exact_batch tokens, 2 here), not evaluated again.
    completion = _post(
        server,
        "/v1/completions",
        {"model": "default", "prompt": tokens["tokens"], "max_tokens": 1, "temperature": 0},
    )
    cached = completion["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert tokens["count"] - 8 <= cached < tokens["count"]
    # And a completion of the chat's text evaluates the same ids.
    text = _post(server, "/detokenize", {"tokens": tokens["tokens"]})["prompt"]
    assert (
        _post(server, "/v1/completions/render", {"prompt": text})["token_ids"] == tokens["tokens"]
    )
    # The render endpoints (vllm-router asks them first) give the same ids.
    render = _post(server, "/v1/chat/completions/render", {"messages": messages})
    assert render["token_ids"] == tokens["tokens"]
    # Without the generation prompt the text stops after the user's message: a strict prefix.
    bare = _post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False})
    assert bare["tokens"] == tokens["tokens"][: bare["count"]] and bare["count"] < tokens["count"]


def test_tokenize_continues_the_final_message_as_chat_does(server: ServerProcess) -> None:
    messages = _messages("Which stove is best?", reply="The best stove is the")
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    tokens = _post(server, "/tokenize", body)
    text = _post(server, "/detokenize", {"tokens": tokens["tokens"]})["prompt"]
    assert text.endswith("The best stove is the")  # cut right after the final message's content
    chat = _post(server, "/v1/chat/completions", {**body, "max_tokens": 2, "temperature": 0})
    assert chat["usage"]["prompt_tokens"] == tokens["count"]
    both = httpx.post(
        f"{server.url}/tokenize",
        json={"messages": messages, "continue_final_message": True},
        timeout=30,
    )
    assert both.status_code == 400
    assert both.json()["error"]["param"] == "continue_final_message"


def test_tokenize_prompt_is_what_completions_evaluate(server: ServerProcess) -> None:
    prompt = "Tokenize me: the Northwind stove boils a litre in three minutes."
    tokens = _post(server, "/tokenize", {"model": "default", "prompt": prompt})
    render = _post(server, "/v1/completions/render", {"prompt": prompt})
    completion = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert render["token_ids"] == tokens["tokens"]
    assert completion["usage"]["prompt_tokens"] == tokens["count"] == len(tokens["tokens"])


def test_load_and_server_info(server: ServerProcess) -> None:
    (load,) = httpx.get(f"{server.url}/get_load", timeout=30).json()
    assert load["num_reqs"] == 0 and load["num_tokens"] >= 0
    info = httpx.get(f"{server.url}/get_server_info", timeout=30).json()
    assert info["kv_events"]["block_size"] == BLOCK and info["context_length"] == 512


# ------------------------------------------------------------------------------------ events


def _blocks(tokens: list[int]) -> list[int]:
    """The hashes the server must announce for these tokens (full blocks), computed here."""
    out, parent = [], ROOT
    for i in range(len(tokens) // BLOCK):
        block = b"".join(t.to_bytes(4, "little") for t in tokens[i * BLOCK : (i + 1) * BLOCK])
        parent = chain_hash(parent, block)
        out.append(parent)
    return out


def _held(events: list[dict], medium: str) -> set[int]:
    """The blocks a consumer holds for `medium` after replaying the events (checking parents)."""
    held: set[int] = set()
    for e in events:
        if e["type"] == "AllBlocksCleared":
            held.clear()
        elif e.get("medium") == medium and e["type"] == "BlockStored":
            assert e["parent_block_hash"] is None or e["parent_block_hash"] in held
            held.update(e["block_hashes"])
        elif e.get("medium") == medium:
            held.difference_update(e["block_hashes"])
    return held


def test_events_follow_what_the_server_holds(server: ServerProcess) -> None:
    sub = Subscriber(server.events)
    try:
        prompts = [
            f"Item {name}: " + f"{name} is a fine product of the shop. " * 8 for name in "ABC"
        ]
        ids = [_post(server, "/tokenize", {"prompt": p})["tokens"] for p in prompts]
        first = _blocks(ids[0])
        assert len(first) >= 4
        _post(server, "/v1/completions", {"prompt": prompts[0], "max_tokens": 2})
        # Live (GPU) and cached (CPU) blocks of the prompt, with the token ids a router hashes.
        events = sub.wait_for(lambda ev: set(first) <= _held(ev, "GPU") & _held(ev, "CPU"))
        stored = [e for e in events if e["type"] == "BlockStored"]
        assert all(set(e) == STORED_KEYS and e["block_size"] == BLOCK for e in stored)
        by_hash = {h: e for e in stored for h in e["block_hashes"]}
        head = by_hash[first[0]]
        assert head["parent_block_hash"] is None
        assert head["token_ids"][:BLOCK] == ids[0][:BLOCK]
        # One sequence: the second prompt evicts the first's live KV (BlockRemoved, GPU).
        _post(server, "/v1/completions", {"prompt": prompts[1], "max_tokens": 2})
        sub.wait_for(lambda ev: not set(first) & _held(ev, "GPU"))
        # A 4 MiB cache: the third prompt evicts the first's entry (BlockRemoved, CPU).
        _post(server, "/v1/completions", {"prompt": prompts[2], "max_tokens": 2})
        events = sub.wait_for(lambda ev: not set(first) & _held(ev, "CPU"))
        removed = [e for e in events if e["type"] == "BlockRemoved"]
        assert {e["medium"] for e in removed} == {"GPU", "CPU"}
        last = _blocks(ids[2])
        assert set(last) <= _held(events, "GPU")
        # Reset: AllBlocksCleared, and the engine holds nothing (no request runs).
        assert httpx.post(f"{server.url}/reset_prefix_cache", timeout=30).status_code == 200
        events = sub.wait_for(lambda ev: ev[-1]["type"] == "AllBlocksCleared")
        assert not _held(events, "GPU") and not _held(events, "CPU")
        seqs = [seq for seq, _, _ in sub.batches]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, ever
        assert all(topic == b"" for _, topic, _ in sub.batches)
        stats = httpx.get(f"{server.url}/v1/cache/stats", timeout=30).json()
        assert stats["kv_events"]["last_seq"] == seqs[-1]
        assert stats["kv_events"]["events"]["AllBlocksCleared"] >= 1
        replayed = _replay(server.replay, seqs[0])
        assert replayed == sub.payloads  # the replay socket sends the very batches published
    finally:
        sub.close()


def _replay(endpoint: str, start: int) -> list[bytes]:
    """Ask the replay socket as vllm-router does (a DEALER: [b"", start]); the payloads until -1."""
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(endpoint)
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        while True:
            assert dealer.poll(10_000), "the replay socket did not answer"
            empty, topic, seq, payload = dealer.recv_multipart()
            if int.from_bytes(seq, "big", signed=True) == -1:
                return out
            out.append(payload)
    finally:
        ctx.destroy(linger=0)


# ------------------------------------------------------------------------------------ the wire


def test_map_layout_is_byte_for_byte_what_vllm_router_accepts() -> None:
    """The bytes vllm-router 0.1.17 was seen to accept (msgspec's encoding of vLLM's structs)."""
    stored = Stored((11, 12), None, (1, 2, 3, 4, 5, 6, 7, 8))
    pack = msgpack.packb
    assert pack([1.5, encode([("GPU", stored)], "map", 4), 0]).hex() == (
        "93cb3ff80000000000009188a474797065ab426c6f636b53746f726564ac626c6f636b5f686173686573920b0c"
        "b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473980102030405060708aa626c6f636b5f"
        "73697a6504a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c000"
    )
    assert pack([1.5, encode([("GPU", Removed((12,)))], "map", 4), 0]).hex() == (
        "93cb3ff80000000000009183a474797065ac426c6f636b52656d6f766564ac626c6f636b5f686173686573910c"
        "a66d656469756da347505500"
    )
    assert pack([1.5, encode([("", None)], "map", 4), 0]).hex() == (
        "93cb3ff80000000000009181a474797065b0416c6c426c6f636b73436c656172656400"
    )


def test_array_layout_is_vllm_array_like() -> None:
    stored = Stored((11, 12), 10, (1, 2, 3, 4, 5, 6, 7, 8))
    events = encode([("CPU", stored), ("CPU", Removed((12,))), ("", None)], "array", 4)
    assert events == [
        ["BlockStored", [11, 12], 10, [1, 2, 3, 4, 5, 6, 7, 8], 4, None, "CPU", None],
        ["BlockRemoved", [12], "CPU"],
        ["AllBlocksCleared"],
    ]


def test_a_taken_endpoint_is_a_config_error() -> None:
    ctx = zmq.Context()
    taken = ctx.socket(zmq.PUB)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        from promptcache.errors import ConfigError
        from promptcache.server.settings import ServerSettings
        from promptcache.server.workers import kv_events

        settings = ServerSettings(kv_events=f"tcp://127.0.0.1:{port}")
        with pytest.raises(ConfigError, match="cannot publish KV events"):
            kv_events(settings, [], None)
    finally:
        ctx.destroy(linger=0)


def test_stats_command_shows_reuse_by_source_and_events(server: ServerProcess) -> None:
    import json

    from typer.testing import CliRunner

    from promptcache.cli import app

    prompt = "Stats: the same words twice. " * 6
    for _ in range(2):
        _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    stats = httpx.get(f"{server.url}/v1/cache/stats", timeout=30).json()
    assert stats["tokens_reused_by_source"]["live"] > 0
    runner = CliRunner()
    done = runner.invoke(app, ["stats", "--server", server.url, "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)[server.url]
    assert report["tokens_reused_by_source"]["live"] == stats["tokens_reused_by_source"]["live"]
    assert report["kv_events"]["batches"] >= stats["kv_events"]["batches"] > 0
    table = runner.invoke(app, ["stats", "--server", server.url, "--server", "http://127.0.0.1:9"])
    assert table.exit_code == 0 and "servers" in table.output and "live" in table.output
    values = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['promptcache_prompt_tokens_reused_total{source="live"}'] > 0
    assert values['promptcache_kv_events_total{type="BlockStored"}'] > 0
    assert values["promptcache_kv_event_batches_total"] >= stats["kv_events"]["batches"]


def test_cache_medium_names_a_servers_own_tiers_only(tmp_path, redis_url: str) -> None:
    """RAM entries are announced as CPU, a disk tier of its own as DISK; a shared Redis tier alone
    says nothing about where to route (None), and a named cache's view reads its tiers' names."""
    from promptcache.server.kv_events import DISK, RAM, cache_medium
    from promptcache.store import DiskStore, MemoryStore
    from promptcache.store.redis import RedisStore
    from promptcache.store.tiered import NamespacedStore, TieredStore

    disk = DiskStore(tmp_path / "d", 1 << 20)
    shared = RedisStore(redis_url, 1 << 20, namespace="medium-test")
    try:
        assert cache_medium(MemoryStore(1 << 20)) == RAM
        assert cache_medium(disk) == DISK
        assert cache_medium(shared) is None
        assert cache_medium(TieredStore([disk, shared])) == DISK
        tiers = TieredStore([MemoryStore(1 << 20), disk, shared])
        assert cache_medium(tiers) == RAM
        assert cache_medium(NamespacedStore(tiers, "team")) == RAM
        assert cache_medium(NamespacedStore(TieredStore([shared]), "team")) is None
    finally:
        disk.close()
        shared.close()
