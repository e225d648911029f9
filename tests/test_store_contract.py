"""The contract every store meets, run against each one (cachetools' CacheTestMixin is the model).

StoreContract holds the contract: get/put/delete/contains/size/len/keys/clear/stats, the declared
capabilities (store.base.BaseStore), the view read (get_view: no copy where the store can), capacity
held after any operations (a hypothesis model of the latest value of each key), and a foreign
fingerprint is a removed miss. PersistedStoreContract adds what a persisted store owes: another
instance sees the entries (a large one as a mapped view where a disk tier holds it), and a corrupt
entry is a removed miss. One subclass per store: memory, disk, redis (a real redis-server, and a
real 3-master Redis Cluster), tiered, namespaced. Each store's own file keeps only the tests
specific to it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptcache.errors import CapacityError
from promptcache.store import DiskStore, MemoryStore, Store, envelope
from promptcache.store.policies import POLICIES
from promptcache.store.redis import RedisStore
from promptcache.store.tiered import NamespacedStore, TieredStore

pytest_plugins = [
    "redis_fixture",  # a real redis-server on a free loopback port
    "redis_cluster_fixture",  # a real 3-master Redis Cluster on loopback
]

FP, OTHER_FP = "model-a", "model-b"
CAPACITY = 8000
BIG = bytes(range(256)) * 8192  # 2 MiB: a disk tier maps it (DiskStore maps from 1 MiB on)
BIG_CAPACITY = 8 << 20  # a tiered store's RAM tier (a third) holds BIG too
Make = Callable[[int], Any]

OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "get", "delete"]),
        st.sampled_from([f"k{i}" for i in range(8)]),
        st.integers(min_value=0, max_value=1500),
    ),
    max_size=30,
)


def packed_size(key: str, value: bytes) -> int:
    """Bytes a persisted store counts for one uncompressed entry under FP: value plus envelope."""
    return len(envelope.pack(key, value, FP))


def flip_a_byte(blob: bytes) -> bytes:
    damaged = bytearray(blob)
    damaged[len(damaged) // 2] ^= 0xFF
    return bytes(damaged)


def corrupt_disk(store: DiskStore, key: str) -> None:
    path = store.path / "entries" / key[:2] / key
    path.write_bytes(flip_a_byte(path.read_bytes()))


def raw_client(store: RedisStore) -> redis.Redis | redis.RedisCluster:
    """A plain redis-py client of the store's Redis: a cluster client where the store found one."""
    if store.cluster:
        return redis.RedisCluster.from_url(store.url.split(",")[0])
    return redis.Redis.from_url(store.url)


def corrupt_redis(store: RedisStore, key: str) -> None:
    with raw_client(store) as client:
        vkey = f"{store.namespace}:v:{key}"
        client.set(vkey, flip_a_byte(client.get(vkey)), keepttl=True)


def tier_rows(store: Store) -> dict[str, dict[str, Any]]:
    return store.tier_stats()


class StoreContract:
    """The contract. Subclasses give a `make` fixture (capacity_bytes -> a new, empty store) and
    entry_size (the bytes size() counts for one entry, None where size() is not such a sum)."""

    persistent = False

    def entry_size(self, key: str, value: bytes) -> int | None:
        raise NotImplementedError

    @pytest.fixture
    def store(self, make: Make) -> Store:
        return make(CAPACITY)

    # -- the protocol ---------------------------------------------------------------------------

    def test_is_a_store_with_declared_capabilities(self, store: Store) -> None:
        assert isinstance(store, Store)
        assert store.persistent is self.persistent
        assert store.capacity_bytes == CAPACITY
        names = list(tier_rows(store))
        assert names and all(isinstance(n, str) for n in names)
        assert store.tier_names() == tuple(names)  # what the KV events name a medium by
        ranks = [store.tier_rank(n) for n in names]
        assert ranks == sorted(set(ranks)), "tiers are listed fastest first, each slower"
        assert store.slowest(names) == names[-1] and store.slowest([]) == "none"
        assert store.tier_rank("no-such-tier") > max(ranks)

    def test_round_trip(self, store: Store) -> None:
        assert store.get("k1", fingerprint=FP) is None and not store.contains("k1")
        store.put("k1", b"value one", fingerprint=FP)
        assert store.get("k1", fingerprint=FP) == b"value one"
        assert store.get("k1") == b"value one"  # no fingerprint: unchecked
        assert store.contains("k1") and not store.contains("k2")
        assert len(store) == 1 and list(store.keys()) == ["k1"]
        store.put("k2", b"", fingerprint=FP)
        store.put("k3", bytes(range(256)) * 3, fingerprint=FP)
        assert store.get("k2", fingerprint=FP) == b""
        assert store.get("k3", fingerprint=FP) == bytes(range(256)) * 3
        assert sorted(store.keys()) == ["k1", "k2", "k3"] and len(store) == 3

    def test_put_replaces_and_delete_removes(self, store: Store) -> None:
        store.put("k1", b"first", fingerprint=FP)
        store.put("k1", b"second value", fingerprint=FP)
        assert store.get("k1", fingerprint=FP) == b"second value" and len(store) == 1
        assert store.delete("k1") is True and store.delete("k1") is False
        assert store.get("k1", fingerprint=FP) is None and not store.contains("k1")
        assert len(store) == 0 and list(store.keys()) == [] and store.size() == 0

    def test_size_counts_what_is_held(self, store: Store) -> None:
        values = {"k1": b"a" * 100, "k2": b"b" * 700}
        for key, value in values.items():
            store.put(key, value, fingerprint=FP)
        both = store.size()
        store.delete("k1")
        one = store.size()
        assert both > one > 0
        if self.entry_size("k1", b"") is not None:  # size() is a sum over entries
            assert both == sum(self.entry_size(k, v) for k, v in values.items())  # type: ignore[misc]
            assert one == self.entry_size("k2", values["k2"])

    def test_clear_empties_it(self, store: Store) -> None:
        for i in range(5):
            store.put(f"k{i}", b"x" * 100, fingerprint=FP)
        store.clear()
        assert len(store) == 0 and list(store.keys()) == [] and store.size() == 0
        assert store.get("k0", fingerprint=FP) is None and not store.contains("k0")
        store.put("k0", b"again", fingerprint=FP)  # usable after clear
        assert store.get("k0", fingerprint=FP) == b"again"

    def test_stats_count_hits_misses_puts(self, store: Store) -> None:
        before = store.stats()
        assert store.get("k1", fingerprint=FP) is None
        store.put("k1", b"v" * 50, fingerprint=FP)
        assert store.get("k1", fingerprint=FP) == b"v" * 50
        after = store.stats()
        for counter in ("hits", "misses", "puts"):
            assert int(after[counter]) == int(before[counter]) + 1, counter
        assert after["entries"] == len(store) == 1
        assert after["bytes"] == store.size() and after["capacity_bytes"] == store.capacity_bytes

    def test_a_value_larger_than_capacity_raises_and_changes_nothing(self, store: Store) -> None:
        store.put("small", b"x" * 10, fingerprint=FP)
        with pytest.raises(CapacityError):
            store.put("huge", b"x" * (CAPACITY + 1), fingerprint=FP)
        assert list(store.keys()) == ["small"] and store.get("small", fingerprint=FP) == b"x" * 10

    def test_a_foreign_fingerprint_is_a_removed_miss(self, store: Store) -> None:
        store.put("k1", b"state of model a", fingerprint=FP)
        store.put("k2", b"another", fingerprint=FP)
        assert store.get("k1", fingerprint=OTHER_FP) is None
        assert not store.contains("k1") and store.get("k1", fingerprint=FP) is None
        assert store.get("k2", fingerprint=FP) == b"another"

    def test_get_with_tier_names_the_tier_that_answered(self, store: Store) -> None:
        store.put("k1", b"v", fingerprint=FP)
        value, tier = store.get_with_tier("k1", fingerprint=FP)
        assert value == b"v" and tier in tier_rows(store)
        assert store.get_with_tier("nope", fingerprint=FP) == (None, "none")

    def test_maintenance_listing_and_close(self, store: Store) -> None:
        store.put("k1", b"one", fingerprint=FP)
        store.put("k2", b"two", fingerprint=FP)
        assert store.expire() == 0  # no age limit: nothing expires
        assert isinstance(store.gc(), dict)
        rows = store.entries()
        assert sorted(str(r["key"]) for r in rows) == ["k1", "k2"]
        assert all(int(r.get("size", 1)) > 0 for r in rows)
        store.close()
        assert store.get("k2", fingerprint=FP) == b"two"  # usable again after close
        store.put("k3", b"three", fingerprint=FP)
        assert store.contains("k3")

    def test_get_view_reads_what_get_reads_and_never_changes(self, make: Make) -> None:
        store = make(BIG_CAPACITY)
        store.put("big", BIG, fingerprint=FP)
        store.put("small", b"abc", fingerprint=FP)
        view, tier = store.get_view_with_tier("big", fingerprint=FP)
        assert view == BIG and memoryview(view).readonly and tier in tier_rows(store)
        assert store.get_view("small", fingerprint=FP) == b"abc"
        assert type(store.get("big", fingerprint=FP)) is bytes  # get() gives bytes, views or not
        assert store.get_view("nope", fingerprint=FP) is None
        assert store.get_view_with_tier("nope", fingerprint=FP) == (None, "none")
        store.put("big", BIG[::-1], fingerprint=FP)  # a view outlives a replacement...
        store.delete("big")  # ...and a removal of its entry
        assert view == BIG
        store.put("big", BIG, fingerprint=FP)
        assert store.get_view("big", fingerprint=OTHER_FP) is None  # foreign: a removed miss
        assert not store.contains("big") and store.get_view("big", fingerprint=FP) is None

    # -- capacity, under any operations ---------------------------------------------------------

    # `make` is function-scoped but builds a new, empty store for every example. The one test
    # method runs under each store's class (differing executors): a failing example replayed from
    # the database into another store's class is still a valid operation sequence there.
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.differing_executors,
        ],
    )
    @given(ops=OPS)
    def test_capacity_holds_and_no_stale_value_is_served(self, make: Make, ops) -> None:
        store = make(CAPACITY)
        latest: dict[str, bytes] = {}
        for n, (op, key, size) in enumerate(ops):
            if op == "put":
                value = bytes([n % 256]) * size
                store.put(key, value, fingerprint=FP)
                latest[key] = value
                assert store.get(key, fingerprint=FP) == value  # the newest entry is kept
            elif op == "delete":
                held = key in set(store.keys())
                assert store.delete(key) == held
                latest.pop(key, None)
            else:
                assert store.get(key, fingerprint=FP) in (None, latest.get(key))
            self.check_invariants(store, latest)
        store.close()

    def check_invariants(self, store: Store, latest: dict[str, bytes]) -> None:
        held = list(store.keys())
        assert set(held) <= set(latest) and len(held) == len(set(held)) == len(store)
        assert all(store.contains(k) for k in held)
        assert 0 <= store.size() <= store.capacity_bytes
        for name, row in tier_rows(store).items():
            assert 0 <= int(row["bytes"]) <= int(row["capacity_bytes"]), name
        sizes = [self.entry_size(k, latest[k]) for k in held]
        if all(s is not None for s in sizes):
            assert store.size() == sum(sizes)  # type: ignore[arg-type]


class PersistedStoreContract(StoreContract):
    """What a store that outlives the process owes besides: `reopen(store)` is another instance
    (another process) over the same place; `corrupt(store, key)` damages the persisted bytes."""

    persistent = True
    maps_large_entries = False  # whether a disk tier holds entries (and maps the large ones)

    def reopen(self, store: Any) -> Store:
        raise NotImplementedError

    def corrupt(self, store: Any, key: str) -> None:
        raise NotImplementedError

    def test_another_instance_sees_the_entries(self, store: Store) -> None:
        store.put("k1", b"persisted", fingerprint=FP)
        store.close()
        other = self.reopen(store)
        assert other.get("k1", fingerprint=FP) == b"persisted"
        assert other.contains("k1") and "k1" in set(other.keys())
        other.close()

    def test_another_instance_reads_a_large_entry_as_a_mapped_view(self, make: Make) -> None:
        """A fresh process's first read of a large entry: mapped and checked in place where a disk
        tier holds it (mapped_reads counts it), and promoted into RAM as that view, not a copy."""
        store = make(BIG_CAPACITY)
        store.put("big", BIG, fingerprint=FP)
        store.close()
        other = self.reopen(store)
        assert other.mapped_reads == 0
        view, tier = other.get_view_with_tier("big", fingerprint=FP)
        assert view == BIG and memoryview(view).readonly
        if not self.maps_large_entries:
            assert other.mapped_reads == other.stats()["mapped_reads"] == 0
            other.close()
            return
        assert tier == "disk" and isinstance(view, memoryview)
        assert other.mapped_reads == other.stats()["mapped_reads"] == 1
        again, tier_again = other.get_view_with_tier("big", fingerprint=FP)
        if tier_again != tier:  # promoted into a faster tier: the same mapped pages, no copy
            assert tier_again == "memory" and again is view
        assert type(other.get("big", fingerprint=FP)) is bytes
        other.close()

    def test_a_corrupt_entry_is_a_removed_miss(self, store: Store) -> None:
        store.put("k1", b"will be damaged " * 20, fingerprint=FP)
        store.put("k2", b"stays intact", fingerprint=FP)
        self.corrupt(store, "k1")
        assert store.get("k1", fingerprint=FP) is None
        assert sum(int(row.get("corrupt", 0)) for row in tier_rows(store).values()) >= 1
        assert not store.contains("k1") and "k1" not in set(store.keys())
        assert store.get("k2", fingerprint=FP) == b"stays intact"


# -- one subclass per store -----------------------------------------------------------------------


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def make(self) -> Make:
        return MemoryStore

    def entry_size(self, key: str, value: bytes) -> int:
        return len(value)


@pytest.fixture
def new_dir(tmp_path: Path) -> Callable[[], Path]:
    counter = itertools.count()
    return lambda: tmp_path / f"store{next(counter)}"


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Registers stores to close at the end of the test."""
    opened: list[Any] = []

    def register(store: Any) -> Any:
        opened.append(store)
        return store

    yield register
    for store in opened:
        store.close()


class TestDiskStore(PersistedStoreContract):
    maps_large_entries = True

    @pytest.fixture
    def make(self, new_dir, closing) -> Make:
        return lambda capacity: closing(DiskStore(new_dir(), capacity))

    def entry_size(self, key: str, value: bytes) -> int:
        return packed_size(key, value)

    def reopen(self, store: DiskStore) -> Store:
        return DiskStore(store.path, store.capacity_bytes)

    def corrupt(self, store: DiskStore, key: str) -> None:
        corrupt_disk(store, key)


@pytest.fixture
def new_namespace() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"contract{next(counter)}"


class TestRedisStore(PersistedStoreContract):
    @pytest.fixture
    def make(self, redis_url: str, new_namespace, closing) -> Make:
        return lambda capacity: closing(RedisStore(redis_url, capacity, namespace=new_namespace()))

    def entry_size(self, key: str, value: bytes) -> int:
        return packed_size(key, value)

    def reopen(self, store: RedisStore) -> Store:
        return RedisStore(store.url, store.capacity_bytes, namespace=store.namespace)

    def corrupt(self, store: RedisStore, key: str) -> None:
        corrupt_redis(store, key)


class TestRedisClusterStore(TestRedisStore):
    """The same contract on a real 3-master Redis Cluster, reached by one node's URL: the values
    spread over the masters, the accounting in one slot (tests/test_redis_cluster.py checks both)."""

    @pytest.fixture
    def make(self, redis_cluster_url: str, new_namespace, closing) -> Make:
        def make(capacity: int) -> RedisStore:
            store = RedisStore(redis_cluster_url, capacity, namespace=new_namespace())
            assert store.ping() and store.cluster is True  # detected, not configured
            return closing(store)

        return make


def corrupt_tiers(tiers: TieredStore, key: str) -> None:
    """Drop the RAM copy (RAM holds bytes it was given: nothing there can rot) and damage the rest."""
    for tier in tiers.tiers:
        if isinstance(tier, MemoryStore):
            tier.delete(key)
        elif isinstance(tier, DiskStore):
            corrupt_disk(tier, key)
        elif isinstance(tier, RedisStore):
            corrupt_redis(tier, key)


def reopen_tiers(store: TieredStore) -> TieredStore:
    """The same persisted tiers behind a new, empty RAM tier."""
    tiers: list[Any] = []
    for tier in store.tiers:
        if isinstance(tier, MemoryStore):
            tiers.append(MemoryStore(tier.capacity_bytes))
        elif isinstance(tier, DiskStore):
            tiers.append(DiskStore(tier.path, tier.capacity_bytes))
        elif isinstance(tier, RedisStore):
            tiers.append(RedisStore(tier.url, tier.capacity_bytes, namespace=tier.namespace))
    return TieredStore(tiers)


class TestTieredStore(PersistedStoreContract):
    """RAM -> disk -> Redis, as CacheConfig builds it; RAM a third of the others' capacity."""

    maps_large_entries = True

    @pytest.fixture
    def make(self, new_dir, redis_url: str, new_namespace, closing) -> Make:
        def make(capacity: int) -> TieredStore:
            return closing(
                TieredStore(
                    [
                        MemoryStore(capacity // 3),
                        DiskStore(new_dir(), capacity),
                        RedisStore(redis_url, capacity, namespace=new_namespace()),
                    ]
                )
            )

        return make

    def entry_size(self, key: str, value: bytes) -> None:
        return None  # size() is the largest tier's

    def reopen(self, store: TieredStore) -> Store:
        return reopen_tiers(store)

    def corrupt(self, store: TieredStore, key: str) -> None:
        corrupt_tiers(store, key)


class TestNamespacedStore(PersistedStoreContract):
    """One named cache's view of RAM -> disk tiers, as CacheManager hands them out."""

    maps_large_entries = True

    @pytest.fixture
    def make(self, new_dir, closing) -> Make:
        def make(capacity: int) -> NamespacedStore:
            tiers = TieredStore([MemoryStore(capacity // 3), DiskStore(new_dir(), capacity)])
            return closing(NamespacedStore(tiers, "contract"))

        return make

    def entry_size(self, key: str, value: bytes) -> None:
        return None  # size() is the shared store's

    def reopen(self, store: NamespacedStore) -> Store:
        assert isinstance(store.store, TieredStore)
        return NamespacedStore(reopen_tiers(store.store), store.cache_name)

    def corrupt(self, store: NamespacedStore, key: str) -> None:
        assert isinstance(store.store, TieredStore)
        corrupt_tiers(store.store, f"{store.cache_name}:{key}")


# -- one policy row, the same victims everywhere ---------------------------------------------------


def ticking_clock() -> Callable[[], float]:
    ticks = itertools.count(1_000_000)
    return lambda: float(next(ticks))


@pytest.mark.parametrize("policy", ["lru", "fifo", "ttl"])
def test_a_policy_row_evicts_the_same_entries_in_ram_on_disk_and_in_redis(
    policy: str, tmp_path: Path, redis_url: str
) -> None:
    """Equal-size entries, reads between writes: every store keeps the same keys (the row's
    victim rule for RAM, its ORDER BY for disk, its score for Redis). "size" breaks ties by
    different means in each store, so equal sizes say nothing about it (see each store's file)."""
    max_age = 3600.0 if POLICIES[policy].needs_max_age else None
    value = b"v" * 100
    held = 4
    memory = MemoryStore(held * len(value), policy=policy, max_age=max_age)
    disk = DiskStore(
        tmp_path,
        held * packed_size("k0", value),
        policy=policy,
        max_age=max_age,
        clock=ticking_clock(),
    )
    disk.atime_resolution = 0.0  # every read refreshes, as in RAM
    remote = RedisStore(
        redis_url,
        held * packed_size("k0", value),
        policy=policy,
        ttl=max_age,
        clock=ticking_clock(),
    )
    stores = [memory, disk, remote]
    script = ["k0", "k1", "k2", "k3", "?k0", "k4", "?k2", "k5", "?k1", "k6", "?k0", "k7"]
    for step in script:
        for store in stores:
            if step.startswith("?"):
                store.get(step[1:], fingerprint=FP)
            else:
                store.put(step, value, fingerprint=FP)
        kept = [sorted(store.keys()) for store in stores]
        assert kept[0] == kept[1] == kept[2], (step, kept)
    assert len(memory) == held and memory.stats()["evictions"] > 0
    disk.close()
    remote.close()
