"""RedisStore against a real redis-server (and, where a test takes `any_redis`, a real Redis Cluster):
capacity, TTL, corrupt and foreign values, outages, and two processes sharing prefixes through one
Redis with the real engine (tests/test_redis_cluster.py: what only a cluster has)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from promptcache import LLM, PromptCache
from promptcache.errors import CapacityError
from promptcache.store import envelope
from promptcache.store.memory import MemoryStore
from promptcache.store.redis import RedisStore, redact
from promptcache.store.tiered import TieredStore

if TYPE_CHECKING:
    from redis_cluster_fixture import RedisUnderTest
    from redis_fixture import RedisServer

# A real redis-server on a free loopback port, and a real 3-master Redis Cluster: the tests that take
# `any_redis` run on both.
pytest_plugins = ["redis_fixture", "redis_cluster_fixture"]

FP = "model-a"
COMPRESSIBLE = b"the same few words again and again " * 300


def entry_bytes(key: str, value: bytes, fingerprint: str = FP) -> int:
    return len(envelope.pack(key, value, fingerprint))


def test_stats_say_redis_is_available(any_redis: RedisUnderTest) -> None:
    """The round trip, capacity and accounting are the contract's (test_store_contract.py)."""
    store = RedisStore(any_redis.url, 1 << 20)
    store.put("k1", b"value one", fingerprint=FP)
    s = store.stats()
    assert (s["available"], s["unavailable"], s["url"], s["namespace"]) == (
        1,
        0,
        any_redis.url,
        "promptcache",
    )


def test_lru_capacity_is_held_across_clients(any_redis: RedisUnderTest) -> None:
    value = b"x" * 1000
    size = entry_bytes("k0", value)
    a = RedisStore(any_redis.url, 3 * size)
    b = RedisStore(any_redis.url, 3 * size)  # another process or machine, same namespace
    a.put("k0", value, fingerprint=FP)
    b.put("k1", value, fingerprint=FP)
    a.put("k2", value, fingerprint=FP)
    time.sleep(0.01)
    assert b.get("k0", fingerprint=FP) == value  # k0 is now the most recently used
    b.put("k3", value, fingerprint=FP)
    assert sorted(a.keys()) == ["k0", "k2", "k3"]  # k1 was least recently used
    assert a.size() == 3 * size <= a.capacity_bytes
    assert b.stats()["evictions"] == 1
    with pytest.raises(CapacityError):
        a.put("huge", b"x" * (3 * size), fingerprint=FP)


@pytest.mark.parametrize(("policy", "evicted"), [("fifo", "k0"), ("size", "big")])
def test_other_policies(any_redis: RedisUnderTest, policy: str, evicted: str) -> None:
    store = RedisStore(any_redis.url, 3000, policy=policy)
    store.put("k0", b"a" * 500, fingerprint=FP)
    store.put("big", b"b" * 1200, fingerprint=FP)
    store.get("k0", fingerprint=FP)  # fifo and size ignore reads
    store.put("k2", b"c" * 500, fingerprint=FP)
    store.put("k3", b"d" * 700, fingerprint=FP)
    assert evicted not in set(store.keys())
    assert store.size() <= 3000


def test_corrupt_values_are_removed_misses(any_redis: RedisUnderTest) -> None:
    store = RedisStore(any_redis.url, 1 << 20)
    store.put("k1", b"good value", fingerprint=FP)
    with any_redis.client() as raw:
        raw.set("promptcache:v:k1", b"garbage that is no envelope")
        assert store.get("k1", fingerprint=FP) is None
        assert raw.exists("promptcache:v:k1") == 0
        store.put("k2", b"good value", fingerprint=FP)
        blob = raw.get("promptcache:v:k2")
        raw.set("promptcache:v:k2", blob[:-3])  # truncated
        assert store.get("k2", fingerprint=FP) is None
        store.put("k3", b"good value", fingerprint=FP)
        flipped = bytearray(raw.get("promptcache:v:k3"))
        flipped[-20] ^= 1
        raw.set("promptcache:v:k3", bytes(flipped))  # one bit flipped in the payload
        assert store.get("k3", fingerprint=FP) is None
    assert store.stats()["corrupt"] == 3
    assert store.size() == 0 and len(store) == 0  # the accounting went with the values


def test_foreign_values_are_removed_misses(any_redis: RedisUnderTest) -> None:
    store = RedisStore(any_redis.url, 1 << 20)
    store.put("k1", b"another model's state", fingerprint="model-b")
    assert store.get("k1", fingerprint=FP) is None  # another model fingerprint
    assert not store.contains("k1")
    store.put("k2", b"value of k2", fingerprint=FP)
    with any_redis.client() as raw:
        raw.set("promptcache:v:k3", raw.get("promptcache:v:k2"))  # another key's entry
    assert store.get("k3", fingerprint=FP) is None
    assert store.get("k2", fingerprint=FP) == b"value of k2"
    assert store.stats()["corrupt"] == 2


def test_a_replaced_value_is_not_removed_by_a_stale_reader(any_redis: RedisUnderTest) -> None:
    """Removal of a corrupt value is conditional: a writer that replaced it meanwhile keeps its entry."""
    store = RedisStore(any_redis.url, 1 << 20)
    store.put("k1", b"good", fingerprint=FP)
    store._forget_if_unchanged("k1", b"the corrupt bytes we had read", "test")
    assert store.get("k1", fingerprint=FP) == b"good"


def test_namespaces_share_nothing(any_redis: RedisUnderTest) -> None:
    a = RedisStore(any_redis.url, 1 << 20, namespace="team-a")
    b = RedisStore(any_redis.url, 1 << 20, namespace="team-b")
    a.put("k", b"a's", fingerprint=FP)
    assert b.get("k", fingerprint=FP) is None and len(b) == 0
    b.put("k", b"b's", fingerprint=FP)
    b.clear()
    assert a.get("k", fingerprint=FP) == b"a's" and len(b) == 0


def test_compressed_values_are_read_by_any_client(any_redis: RedisUnderTest) -> None:
    zstd = RedisStore(any_redis.url, 1 << 20, compression="zstd")
    zstd.put("k1", COMPRESSIBLE, fingerprint=FP)
    assert zstd.size() < len(COMPRESSIBLE) / 5
    assert RedisStore(any_redis.url, 1 << 20).get("k1", fingerprint=FP) == COMPRESSIBLE


def test_ttl_expires_values_and_gc_drops_their_accounting(any_redis: RedisUnderTest) -> None:
    store = RedisStore(
        any_redis.url, 1 << 20, ttl=1.5
    )  # room for a loaded CI machine between put and get
    store.put("k1", b"short-lived", fingerprint=FP)
    store.put("k2", b"short-lived", fingerprint=FP)
    assert store.get("k1", fingerprint=FP) == b"short-lived"
    time.sleep(1.8)
    assert not store.contains("k1")  # Redis expired the value itself
    assert store.get("k1", fingerprint=FP) is None  # and the read dropped its accounting
    assert len(store) == 1
    assert store.gc()["expired"] == 1
    assert len(store) == 0 and store.size() == 0


def test_gc_reconciles_and_enforces_capacity(any_redis: RedisUnderTest) -> None:
    big = RedisStore(any_redis.url, 1 << 20)  # a client with a larger capacity wrote these
    for i in range(10):
        big.put(f"k{i}", b"v" * 1000, fingerprint=FP)
    with any_redis.client() as raw:
        raw.delete("promptcache:v:k0")  # value gone (maxmemory, by hand): stale accounting
        raw.set("promptcache:v:orphan", b"no accounting")  # value without accounting
    small = RedisStore(any_redis.url, 5000)
    counts = small.gc()
    assert counts["stale_rows"] == 1 and counts["orphans_removed"] == 1
    assert counts["evicted"] == 5
    assert small.size() <= 5000 and len(small) == 4
    with any_redis.client() as raw:
        assert raw.exists("promptcache:v:orphan") == 0
    assert {e["key"] for e in small.entries()} == set(small.keys())
    assert all(e["fingerprint"] == FP and e["size"] > 1000 for e in small.entries())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Redis URL"):
        RedisStore("http://localhost:6379")
    with pytest.raises(ValueError, match="namespace"):
        RedisStore(namespace="a:b")
    with pytest.raises(ValueError, match="ttl"):
        RedisStore(policy="ttl")
    with pytest.raises(ValueError, match="unknown policy"):
        RedisStore(policy="lfu")
    assert redact("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    assert "secret" not in repr(RedisStore("redis://:secret@127.0.0.1:1/0"))


def test_redis_down_at_start_is_a_miss_not_an_error() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", retry_after=10)
    store.put("k", b"v", fingerprint=FP)
    assert store.get("k", fingerprint=FP) is None and not store.contains("k")
    assert store.stats()["entries"] == -1 and store.stats()["available"] == 0
    assert store.stats()["outages"] == 1


def test_redis_stopped_mid_run_then_restarted(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="promptcache.store.redis")
    memory = MemoryStore(1 << 20)
    remote = RedisStore(own_redis.url, 1 << 20, retry_after=0.05, max_retry_after=0.2)
    store = TieredStore([memory, remote])
    store.put("k1", b"before", fingerprint=FP)
    assert remote.get("k1", fingerprint=FP) == b"before"

    own_redis.stop()
    for i in range(20):  # requests keep being served: RAM hits, misses, no-op writes, no exception
        assert store.get("k1", fingerprint=FP) == b"before"
        assert store.get_with_tier(f"new{i}", fingerprint=FP) == (None, "none")
        store.put(f"new{i}", b"during", fingerprint=FP)
        assert not remote.contains("k1")
    assert memory.get("new19") == b"during"
    down = remote.stats()
    assert down["unavailable"] > 0 and down["outages"] == 1 and down["available"] == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()

    own_redis.start()
    deadline = time.monotonic() + 5
    while not remote.contains("anything") and time.monotonic() < deadline:
        remote.put("anything", b"x", fingerprint=FP)  # retried after the backoff
        time.sleep(0.05)
    assert remote.available
    store.put("k2", b"after", fingerprint=FP)
    assert RedisStore(own_redis.url).get("k2", fingerprint=FP) == b"after"
    assert "reachable again" in caplog.text
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


# -- the engine over Redis ------------------------------------------------------------------------

DOC = (
    "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days. "
    "Returns of damaged items are free within thirty days. Gift cards never expire. "
)
WRITER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from promptcache import LLM, PromptCache
    from promptcache.store.redis import RedisStore

    url, out = sys.argv[1], sys.argv[2]
    tokens = json.loads(sys.stdin.read())
    llm = LLM(cache=PromptCache(RedisStore(url), shared=True), n_ctx=256)
    logits = llm.logits(tokens)
    np.save(out, logits)
    print(json.dumps({"reused": llm.last_stats.tokens_reused, "chunks": len(llm.cache.store)}))
    """
)


@pytest.fixture(scope="module")
def llm() -> LLM:
    with LLM(cache=None, n_ctx=256) as model:
        yield model


def test_two_processes_share_prefixes_through_redis(
    llm: LLM, redis_url: str, tmp_path: Path
) -> None:
    first = llm.tokenize(DOC + "Question: how long do refunds take?")
    second = llm.tokenize(DOC + "Question: do gift cards expire?")
    assert len(first) < 80 and len(second) < 80
    out = tmp_path / "logits.npy"
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, redis_url, str(out)],
        input=json.dumps(first),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    written = json.loads(proc.stdout.strip().splitlines()[-1])
    assert written["reused"] == 0 and written["chunks"] > 0

    llm.cache = PromptCache(
        RedisStore(redis_url), shared=True
    )  # this process: nothing cached locally
    llm.reset_context()
    logits = llm.logits(first)
    assert llm.last_stats.source == "redis"
    assert llm.last_stats.tokens_reused == len(first) - llm.exact_batch
    assert np.array_equal(logits, np.load(out))  # the other process's state gives the same logits

    llm.reset_context()
    llm.logits(second)  # shares the document with what the other process cached
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert llm.last_stats.source == "redis"
    assert llm.last_stats.tokens_reused >= shared // 16 * 16 > 0
    llm.cache = None


def test_engine_requests_are_served_while_redis_is_away(llm: LLM, own_redis: RedisServer) -> None:
    remote = RedisStore(own_redis.url, retry_after=0.05, max_retry_after=0.2)
    llm.cache = PromptCache(TieredStore([MemoryStore(64 << 20), remote]), shared=True)
    tokens = llm.tokenize(DOC + "Question: are returns free?")
    llm.reset_context()
    reference = llm.logits(tokens)
    own_redis.stop()
    llm.reset_context()
    assert np.array_equal(llm.logits(tokens), reference)  # served from RAM, Redis skipped
    assert llm.last_stats.source == "memory"
    other = llm.tokenize("A different prompt about tents and stoves.")
    llm.logits(other)  # a miss everywhere, then a write that skips Redis: no exception
    assert remote.stats()["unavailable"] > 0
    own_redis.start()
    time.sleep(0.3)
    llm.logits(llm.tokenize("Yet another prompt, written to Redis once it is back."))
    assert len(RedisStore(own_redis.url)) > 0
    llm.cache = None
