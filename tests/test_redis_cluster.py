"""RedisStore on a real 3-master Redis Cluster, what only a cluster has: values spread over the
masters, capacity and LRU held for the whole store across nodes and clients, the URL forms, an
unreachable cluster, a dead client's lease, and two caches sharing a prefix through the cluster.

The store contract runs on the cluster too (test_store_contract.py), as do test_redis.py's tests
that take `any_redis`.
"""

from __future__ import annotations

import random
import threading
import time
from typing import TYPE_CHECKING

import pytest
from conftest import WIDTH, synthetic_state

from promptcache import FixedWidthCodec, PromptCache
from promptcache.config import CacheConfig
from promptcache.store import envelope
from promptcache.store.redis import RedisStore

if TYPE_CHECKING:
    from redis_cluster_fixture import RedisClusterServers, RedisUnderTest

pytest_plugins = [
    "redis_fixture",
    "redis_cluster_fixture",
]  # real redis-server processes on loopback

FP = "model-a"
NS = "spread"


def value_bytes_per_master(cluster: RedisClusterServers, namespace: str) -> dict[int, int]:
    """Each master's bytes of the namespace's values, read from that node alone."""
    out = {}
    for port in cluster.ports:
        with cluster.node(port) as node:
            keys = list(node.scan_iter(match=f"{namespace}:v:*", count=1000))
            out[port] = sum(node.strlen(k) for k in keys)
    return out


def test_values_spread_over_the_masters_and_the_accounting_sits_in_one_slot(
    redis_cluster: RedisClusterServers, redis_cluster_url: str
) -> None:
    store = RedisStore(redis_cluster_url, 1 << 20, namespace=NS)
    for i in range(60):
        store.put(f"segment-{i}", bytes([i]) * 1000, fingerprint=FP)
    per_master = value_bytes_per_master(redis_cluster, NS)
    assert all(n > 0 for n in per_master.values()), per_master  # every master holds values
    assert max(per_master.values()) < 0.6 * sum(per_master.values())  # none holds most of them
    assert sum(per_master.values()) == store.size()
    with redis_cluster.client() as raw:
        slots = {raw.keyslot(f"{NS}:v:segment-{i}") for i in range(60)}
        meta = [k for k in raw.scan_iter(match=f"{NS}:{{{NS}}}:*")]
        assert len(slots) > 50 and {raw.keyslot(k) for k in meta} == {raw.keyslot(f"{{{NS}}}")}
    holders = []
    for port in redis_cluster.ports:
        with redis_cluster.node(port) as node:
            holders += [port] * len(list(node.scan_iter(match=f"{NS}:{{{NS}}}:*")))
    assert len(set(holders)) == 1 and len(holders) == len(meta) >= 4  # one node, one slot


def test_capacity_and_lru_hold_for_the_whole_store_across_nodes(
    redis_cluster: RedisClusterServers, redis_cluster_url: str
) -> None:
    """Three clients (as three servers) write into one namespace: the capacity is the whole
    store's (the sum over every master), and the least recently used entries leave first,
    whichever node holds them and whichever client wrote them."""
    value = b"v" * 1000
    size = len(envelope.pack("k00", value, FP))
    held = 12
    clients = [
        RedisStore(url, held * size, namespace=NS)
        for url in [redis_cluster_url, *redis_cluster.urls]
    ]
    for i in range(40):
        clients[i % 3].put(f"k{i:02d}", value, fingerprint=FP)
        if i >= 5:
            assert clients[(i + 1) % 3].get("k03", fingerprint=FP) == value  # k03 stays recent
    survivors = {"k03", *(f"k{i:02d}" for i in range(29, 40))}
    assert set(clients[0].keys()) == survivors
    per_master = value_bytes_per_master(redis_cluster, NS)
    assert sum(per_master.values()) == clients[1].size() == held * size
    assert sum(1 for n in per_master.values() if n) >= 2  # the survivors sit on several nodes
    assert sum(c.stats()["evictions"] for c in clients) == 40 - held


def test_concurrent_writers_never_take_the_store_past_its_capacity(
    redis_cluster: RedisClusterServers, redis_cluster_url: str
) -> None:
    """Four writers at once, entries of random sizes: the counted bytes never pass the capacity
    (sampled throughout: one atomic counter), and at the end the values held on every master add
    up to exactly what is counted, with nothing left in flight."""
    capacity = 40_000
    stores = [RedisStore(redis_cluster_url, capacity, namespace=NS) for _ in range(4)]
    sampler = RedisStore(redis_cluster_url, capacity, namespace=NS)
    done = threading.Event()
    counted: list[int] = []

    def write(n: int) -> None:
        rng = random.Random(n)
        for i in range(60):
            key = f"w{n}-{rng.randrange(30)}" if i % 4 else f"shared-{rng.randrange(5)}"
            stores[n].put(key, bytes([i % 256]) * rng.randrange(100, 6000), fingerprint=FP)

    def sample() -> None:
        while not done.is_set():
            counted.append(sampler.size())

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    watcher = threading.Thread(target=sample)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert counted and max(counted) <= capacity
    assert sum(value_bytes_per_master(redis_cluster, NS).values()) == sampler.size() <= capacity
    assert sampler.size() > capacity // 2  # the store was full, not emptied
    with redis_cluster.client() as raw:
        assert raw.hlen(f"{NS}:{{{NS}}}:leases") == 0
    assert sum(int(s.stats()["evictions"]) for s in stores) > 0


def test_two_caches_share_a_prefix_through_the_cluster(
    redis_cluster: RedisClusterServers, redis_cluster_url: str
) -> None:
    """As two servers would: one PromptCache inserts a sequence's state through one node's URL,
    another, given every node's URL, finds it and restores it from Redis."""
    tokens = list(range(100, 140))
    writer = PromptCache(
        RedisStore(redis_cluster_url), codec=FixedWidthCodec(WIDTH), block_size=8, shared=True
    )
    assert writer.insert(tokens, synthetic_state(tokens), FP) > 0
    reader_store = RedisStore(redis_cluster.url)
    reader = PromptCache(reader_store, codec=FixedWidthCodec(WIDTH), block_size=8, shared=True)
    hit = reader.lookup([*tokens, 7, 8], FP)
    assert hit is not None and hit.source == "redis"
    assert hit.tokens_reused == len(tokens)
    assert bytes(hit.state) == synthetic_state(tokens)
    assert reader_store.stats()["hits"] > 0 and reader_store.cluster is True


def test_the_cluster_url_forms(
    redis_cluster: RedisClusterServers, redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    RedisStore(redis_cluster_url, namespace=NS).put("k", b"shared", fingerprint=FP)
    comma = redis_cluster.url  # "redis://127.0.0.1:P1,redis://127.0.0.1:P2,redis://127.0.0.1:P3"
    forms = [
        RedisStore(comma, namespace=NS),
        RedisStore(redis_cluster.urls, namespace=NS),  # a Python list
        RedisStore(["redis://127.0.0.1:1", *redis_cluster.urls[1:]], namespace=NS),  # one down
        RedisStore(redis_cluster.urls[2], namespace=NS, cluster=True),  # said, not asked
        CacheConfig(redis_url=redis_cluster.urls, namespace=NS).redis_store(),
        CacheConfig(
            redis_url=redis_cluster.urls[1], redis_cluster=True, namespace=NS
        ).redis_store(),
    ]
    monkeypatch.setenv("PROMPTCACHE_REDIS_URL", comma)
    forms.append(CacheConfig(namespace=NS).redis_store())
    for store in forms:
        assert store is not None and store.get("k", fingerprint=FP) == b"shared", store
        assert store.cluster is True and store.stats()["cluster"] == 1
    assert forms[1].url == forms[4].url == forms[6].url == comma
    assert CacheConfig(redis_url=redis_cluster.urls).redis_url == comma
    with_db = RedisStore(f"{redis_cluster.urls[0]}/2", namespace=NS)  # a cluster has only db 0
    assert with_db.get("k", fingerprint=FP) == b"shared" and with_db.cluster is True
    # A cluster node's URL told it is one server: every key of another node's slots is refused
    # (MOVED), counted as errors, never raised.
    single = RedisStore(redis_cluster_url, namespace=NS, cluster=False)
    for i in range(6):
        single.get(f"k{i}", fingerprint=FP)
    assert single.cluster is False and single.stats()["errors"] > 0


@pytest.mark.parametrize(
    ("url", "cluster", "message"),
    [
        ("redis://a:7000,redis://b:7001", False, "cluster=False"),
        ("redis://a:7000/1,redis://b:7001", None, "only db 0"),
        (["redis://a:7000", "unix:///tmp/r.sock"], None, "TCP"),
        ("redis://:x@a:7000,redis://:y@b:7001", None, "share a scheme"),
        ("redis://a:7000,", None, "invalid Redis URL"),
        (["redis://a:7000", "http://b:7001"], None, "invalid Redis URL"),
    ],
)
def test_malformed_cluster_urls_are_refused(url, cluster, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisStore(url, cluster=cluster)
    with pytest.raises(ValueError, match=message.split()[0]):
        CacheConfig(redis_url=url, redis_cluster=cluster).redis_store()


def test_an_unreachable_cluster_is_a_miss_not_an_error() -> None:
    store = RedisStore("redis://127.0.0.1:1,redis://127.0.0.1:2", retry_after=10)
    store.put("k", b"v", fingerprint=FP)
    assert store.get("k", fingerprint=FP) is None and not store.contains("k")
    assert store.stats()["entries"] == -1 and store.stats()["available"] == 0
    assert store.stats()["outages"] == 1 and store.cluster is True


def test_a_client_that_dies_mid_put_holds_its_bytes_until_its_lease_is_reclaimed(
    any_redis: RedisUnderTest,
) -> None:
    """A writer that reserved and wrote but never committed (killed between the two): its bytes
    stay counted, other clients leave the key alone until the lease runs out, then gc deletes
    the value and frees its bytes."""
    dead = RedisStore(any_redis.url, 10_000, namespace=NS)
    blob = envelope.pack("k1", b"x" * 3000, FP)
    conn = dead._connection()
    assert conn.ledger.reserve("k1", len(blob), dead.capacity_bytes, [])[0] == 1
    conn.client.set(conn.keys.value("k1"), blob)  # ...and the process dies before committing
    other = RedisStore(any_redis.url, 10_000, namespace=NS)
    other.lease_seconds = 0.5
    assert other.size() == len(blob)  # counted from the reservation on: capacity holds
    other.put("k1", b"another value", fingerprint=FP)  # in flight elsewhere: skipped
    assert other.stats()["puts"] == 0
    other.put("k2", b"y" * 7500, fingerprint=FP)  # no room but what the lease holds: skipped
    assert other.size() == len(blob) and not other.contains("k2")
    time.sleep(0.6)
    counts = other.gc()
    assert counts["reclaimed"] == 1 and not other.contains("k1")
    other.put("k2", b"y" * 7500, fingerprint=FP)
    assert other.get("k2", fingerprint=FP) == b"y" * 7500
    assert other.size() == len(envelope.pack("k2", b"y" * 7500, FP))
