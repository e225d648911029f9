"""TieredStore (RAM -> disk -> Redis, write-through, promotion on hit), named views, and compression."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache import LLM
from promptcache.config import CacheConfig
from promptcache.errors import CapacityError, CorruptEntryError, StoreUnavailableError
from promptcache.store import envelope
from promptcache.store.compression import Compressor, decompress
from promptcache.store.disk import DiskStore
from promptcache.store.memory import MemoryStore
from promptcache.store.tiered import NamespacedStore, TieredStore

FP = "model-a"
COMPRESSIBLE = b"the same few words again and again " * 300


# -- compression ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "level"), [("zstd", 1), ("zstd", 3), ("lz4", 0), ("lz4", 9)])
def test_compressible_values_shrink_and_round_trip(name: str, level: int) -> None:
    comp = Compressor(name, level)
    packed, flags = comp.compress(COMPRESSIBLE)
    assert flags == comp.flag != 0
    assert len(packed) < len(COMPRESSIBLE) / 5
    assert decompress(bytes(packed), flags) == COMPRESSIBLE


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=5000), st.sampled_from(["none", "zstd", "lz4"]))
def test_compression_round_trips_any_bytes(value: bytes, name: str) -> None:
    packed, flags = Compressor(name).compress(value)
    assert decompress(bytes(packed), flags) == value
    assert len(packed) <= len(value)  # a value that does not shrink is kept raw


def test_incompressible_values_are_stored_raw() -> None:
    noise = os.urandom(10_000)
    for name in ("zstd", "lz4"):
        packed, flags = Compressor(name).compress(noise)
        assert flags == 0 and packed == noise


def test_bad_compressed_payloads_and_unknown_flags_are_corrupt() -> None:
    packed, flags = Compressor("zstd").compress(COMPRESSIBLE)
    with pytest.raises(CorruptEntryError):
        decompress(bytes(packed)[:-7], flags)
    with pytest.raises(CorruptEntryError):
        decompress(b"not lz4 at all", envelope.FLAG_LZ4)
    with pytest.raises(CorruptEntryError):
        decompress(b"x", 0x80)
    with pytest.raises(CorruptEntryError):
        decompress(b"x", envelope.FLAG_LZ4 | envelope.FLAG_ZSTD)


def test_unknown_codec_or_level_names_the_accepted_values() -> None:
    with pytest.raises(ValueError, match="none, zstd, lz4"):
        Compressor("gzip")
    with pytest.raises(ValueError, match="0 to 16"):
        Compressor("lz4", 17)


def test_disk_store_compresses_and_any_reader_decompresses(tmp_path: Path) -> None:
    zstd_disk = DiskStore(tmp_path, 1 << 20, compression="zstd")
    zstd_disk.put("k1", COMPRESSIBLE, fingerprint=FP)
    assert zstd_disk.size() < len(COMPRESSIBLE) / 5  # capacity counts stored (compressed) bytes
    assert zstd_disk.get("k1", fingerprint=FP) == COMPRESSIBLE
    plain = DiskStore(tmp_path, 1 << 20)  # another process, other settings, same directory
    assert plain.get("k1", fingerprint=FP) == COMPRESSIBLE
    plain.put("k2", COMPRESSIBLE, fingerprint=FP)
    assert zstd_disk.get("k2", fingerprint=FP) == COMPRESSIBLE
    assert zstd_disk.stats()["compression"] == "zstd"


def test_disk_entry_that_does_not_decompress_is_a_removed_miss(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path, 1 << 20, compression="lz4")
    disk.put("k1", COMPRESSIBLE, fingerprint=FP)
    # A foreign writer: a valid envelope (checksum matches) whose payload is not lz4.
    path = tmp_path / "entries" / "k1"[:2] / "k1"
    path.write_bytes(envelope.pack("k1", b"garbage" * 10, FP, envelope.FLAG_LZ4))
    assert disk.get("k1", fingerprint=FP) is None
    assert disk.stats()["corrupt"] == 1
    assert not disk.contains("k1") and not path.exists()


# -- the tiered store -----------------------------------------------------------------------------


@pytest.fixture
def tiers(tmp_path: Path) -> tuple[MemoryStore, DiskStore, TieredStore]:
    memory = MemoryStore(1 << 20)
    disk = DiskStore(tmp_path / "kv", 4 << 20)
    return memory, disk, TieredStore([memory, disk])


def test_put_writes_through_every_tier(tiers) -> None:
    memory, disk, store = tiers
    store.put("k1", b"v" * 100, fingerprint=FP)
    assert memory.get("k1") == disk.get("k1", fingerprint=FP) == b"v" * 100
    assert store.contains("k1") and len(store) == 1 and list(store.keys()) == ["k1"]
    assert store.capacity_bytes == 4 << 20


def test_a_disk_hit_is_promoted_into_ram(tiers) -> None:
    memory, disk, store = tiers
    disk.put("k1", b"from disk", fingerprint=FP)
    assert not memory.contains("k1")
    assert store.get_with_tier("k1", fingerprint=FP) == (b"from disk", "disk")
    assert memory.get("k1") == b"from disk"
    assert store.get_with_tier("k1", fingerprint=FP) == (b"from disk", "memory")
    s = store.stats()
    assert (s["hits_disk"], s["hits_memory"], s["promotions"], s["hits"]) == (1, 1, 1, 2)
    assert store.get_with_tier("nope", fingerprint=FP) == (None, "none")
    assert store.stats()["misses"] == 1


def test_foreign_fingerprint_in_disk_is_a_miss_and_not_promoted(tiers) -> None:
    memory, disk, store = tiers
    disk.put("k1", b"other model", fingerprint="model-b")
    assert store.get_with_tier("k1", fingerprint=FP) == (None, "none")
    assert not memory.contains("k1") and not disk.contains("k1")
    assert store.stats()["corrupt"] == disk.stats()["corrupt"] == 1  # the tiers' count, summed


def test_without_fingerprint_only_ram_is_promoted_into(tmp_path: Path) -> None:
    memory = MemoryStore(1 << 20)
    upper_disk = DiskStore(tmp_path / "a", 1 << 20)
    lower_disk = DiskStore(tmp_path / "b", 1 << 20)
    lower_disk.name = "disk2"
    store = TieredStore([memory, upper_disk, lower_disk])
    lower_disk.put("k1", b"value", fingerprint=FP)
    assert store.get_with_tier("k1") == (b"value", "disk2")
    assert memory.contains("k1")
    assert not upper_disk.contains("k1")  # it would be stamped with no fingerprint


def test_a_value_too_big_for_ram_still_lands_on_disk(tiers) -> None:
    memory, disk, store = tiers
    big = b"x" * (2 << 20)
    store.put("big", big, fingerprint=FP)
    assert not memory.contains("big") and disk.get("big", fingerprint=FP) == big
    assert store.get_with_tier("big", fingerprint=FP) == (
        big,
        "disk",
    )  # promotion skipped, no error
    with pytest.raises(CapacityError):
        store.put("huge", b"x" * (5 << 20), fingerprint=FP)


class _BrokenStore(MemoryStore):
    """A tier whose device fails (a full disk, an unreadable index)."""

    name = "broken"

    def put(self, key: str, value: bytes, *, fingerprint: str = "") -> None:
        raise StoreUnavailableError("the disk is full")

    def get(self, key: str, *, fingerprint: str | None = None) -> bytes | None:
        raise StoreUnavailableError("index unreadable")


def test_a_failing_tier_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    memory = MemoryStore(1 << 20)
    store = TieredStore([_BrokenStore(1 << 20), memory])
    store.put("k1", b"value", fingerprint=FP)
    assert memory.get("k1") == b"value"
    assert store.get_with_tier("k1", fingerprint=FP) == (b"value", "memory")
    assert store.stats()["tier_errors"] == 2
    assert "broken tier" in caplog.text


def test_delete_and_clear_reach_every_tier(tiers) -> None:
    memory, disk, store = tiers
    store.put("k1", b"1", fingerprint=FP)
    store.put("k2", b"2", fingerprint=FP)
    assert store.delete("k1") and not store.delete("k1")
    assert not memory.contains("k1") and not disk.contains("k1")
    store.clear()
    assert len(memory) == len(disk) == len(store) == 0


def test_each_tier_holds_its_own_capacity(tmp_path: Path) -> None:
    memory = MemoryStore(3000)
    disk = DiskStore(tmp_path, 20_000)
    store = TieredStore([memory, disk])
    for i in range(30):
        store.put(f"k{i}", bytes([i]) * 1000, fingerprint=FP)
        assert memory.size() <= 3000 and disk.size() <= 20_000
    assert len(memory) == 3 and 10 <= len(disk) < 20
    assert store.get_with_tier("k29", fingerprint=FP)[1] == "memory"
    assert store.get_with_tier("k20", fingerprint=FP)[1] == "disk"
    assert store.gc()["disk"]["evicted"] == 0
    assert set(store.tier_stats()) == {"memory", "disk"}


def test_ram_checks_fingerprints_except_on_entries_promoted_without_one(tmp_path: Path) -> None:
    memory, disk = MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20)
    store = TieredStore([memory, disk])
    disk.put("k", b"from disk", fingerprint=FP)
    assert store.get("k") == b"from disk"  # unchecked read: promoted into RAM without a fingerprint
    assert memory.entries() == [{"key": "k", "size": 9, "fingerprint": ""}]
    assert (
        memory.get("k", fingerprint="model-b") == b"from disk"
    )  # RAM cannot tell: unknown matches
    memory.put("k", b"stamped", fingerprint=FP)
    assert memory.get("k", fingerprint="model-b") is None and memory.stats()["corrupt"] == 1


def test_persistence_and_tier_order_are_declared_by_the_stores(tmp_path: Path) -> None:
    memory, disk = MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20)
    assert not memory.persistent and disk.persistent
    assert not TieredStore([memory]).persistent and TieredStore([memory, disk]).persistent
    assert (memory.latency_rank, disk.latency_rank) == (0, 1)
    store = TieredStore([memory, disk])
    assert store.slowest(["disk", "memory"]) == "disk" and store.slowest(["none"]) == "none"
    assert NamespacedStore(store, "a").slowest(["memory", "disk"]) == "disk"


def test_tier_names_must_differ() -> None:
    with pytest.raises(ValueError, match="differ"):
        TieredStore([MemoryStore(10), MemoryStore(10)])
    with pytest.raises(ValueError):
        TieredStore([])


def test_named_views_share_tiers_not_entries(tiers) -> None:
    _memory, disk, store = tiers
    a, b = NamespacedStore(store, "a"), NamespacedStore(store, "b")
    a.put("k", b"for a", fingerprint=FP)
    b.put("k", b"for b", fingerprint=FP)
    assert a.get("k", fingerprint=FP) == b"for a" and b.get("k", fingerprint=FP) == b"for b"
    assert a.get_with_tier("k", fingerprint=FP) == (b"for a", "memory")
    assert sorted(disk.keys()) == ["a:k", "b:k"]
    a.clear()
    assert not a.contains("k") and b.contains("k") and len(b) == 1 and list(b.keys()) == ["k"]
    with pytest.raises(ValueError, match="cache names"):
        NamespacedStore(store, "Bad:Name")


# -- the engine over tiers ------------------------------------------------------------------------

DOC = (
    "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days. "
    "Returns of damaged items are free within thirty days. Gift cards never expire. "
)


@pytest.fixture(scope="module")
def llm() -> LLM:
    with LLM(cache=None, n_ctx=256) as model:
        yield model


def test_engine_hits_disk_in_a_fresh_process_then_ram(llm: LLM, tmp_path: Path) -> None:
    config = CacheConfig(memory_size="64MB", disk_size="64MB", disk_path=tmp_path / "kv")
    tokens = llm.tokenize(DOC + "Question: how long do refunds take?")
    assert len(tokens) < 80
    llm.cache = config.build_cache()
    llm.reset_context()
    cold = llm.logits(tokens)
    assert llm.last_stats.tokens_reused == 0

    llm.cache = config.build_cache()  # a fresh process: empty RAM tier and index, same disk
    llm.reset_context()
    from_disk = llm.logits(tokens)
    assert llm.last_stats.source == "disk"
    assert llm.last_stats.tokens_reused == len(tokens) - llm.exact_batch
    assert np.array_equal(from_disk, cold)

    llm.reset_context()
    from_ram = llm.logits(tokens)  # the disk hit was promoted
    assert llm.last_stats.source == "memory"
    assert np.array_equal(from_ram, cold)
    llm.cache = None
