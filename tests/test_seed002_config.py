"""Seed 002 (LlamaHome's cache system): its YAML and TOML files load unchanged and mean what they say.

The files in tests/seed002/ are copied verbatim from the seed's page (seed_002.txt, the list items'
indentation removed); the first test checks that they still are.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache.config import ARTEFACT_CACHES, CacheConfig, read_config_file
from promptcache.errors import ConfigError
from promptcache.manager import CacheManager
from promptcache.store.disk import DiskStore
from promptcache.store.memory import MemoryStore

SEED = Path(__file__).parent / "seed002"
MB = 1 << 20
SNIPPETS = [
    "core_settings.yaml",
    "model_cache.yaml",
    "training_cache.yaml",
    "system_cache.yaml",
    "cache.toml",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting leaks in from the machine; relative paths in the seed's files land in tmp_path."""
    for name in ("PROMPTCACHE_CONFIG", "CACHE_MEMORY_SIZE", "CACHE_DISK_SIZE", "CACHE_POLICY"):
        monkeypatch.delenv(name, raising=False)
    for name in CacheConfig.model_fields:
        monkeypatch.delenv(f"PROMPTCACHE_{name.upper()}", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("name", SNIPPETS)
def test_the_files_are_the_seeds_own_words(name: str) -> None:
    page = (SEED / "seed_002.txt").read_text().splitlines()
    lines = (SEED / name).read_text().splitlines()
    starts = [i for i, line in enumerate(page) if line.strip() == lines[0].strip()]
    indent = [len(page[i]) - len(page[i].lstrip()) for i in starts]
    assert any(
        page[i : i + len(lines)] == [" " * pad + line for line in lines]
        for i, pad in zip(starts, indent, strict=True)
    ), f"{name} is not a verbatim block of the seed"


def test_core_settings_yaml_means_megabytes_and_its_tier_settings() -> None:
    c = CacheConfig.from_file(SEED / "core_settings.yaml")
    assert (c.memory_size, c.disk_size) == (1000 * MB, 10000 * MB)
    assert (c.memory_policy, c.memory_compression) == ("lru", "zstd")
    assert c.disk_path == Path("cache")  # "./cache", relative to the working directory
    assert c.tier_cleanup_interval("disk") == 3600.0
    assert c.tier_cleanup_interval("memory") == c.cleanup_interval == 60.0
    store = c.build_store()
    memory, disk = store.tiers
    assert isinstance(memory, MemoryStore) and memory.capacity_bytes == 1000 * MB
    assert memory.policy.name == "lru" and memory.compressor.name == "zstd"
    assert isinstance(disk, DiskStore) and disk.capacity_bytes == 10000 * MB
    assert disk.path.resolve() == (Path.cwd() / "cache").resolve()
    assert disk.compressor.name == "none"  # compression: true was said of the memory tier only
    store.close()


def test_compression_true_compresses_the_memory_tier() -> None:
    c = CacheConfig.from_file(SEED / "core_settings.yaml", disk_size=0)
    memory = c.memory_store()
    value = b"the same words again " * 5000
    memory.put("k", value)
    assert memory.size() < len(value) // 10  # held compressed, counted compressed
    assert memory.get("k") == value


def test_model_cache_yaml() -> None:
    c = CacheConfig.from_file(SEED / "model_cache.yaml")
    assert (c.model_cache_size, c.model_cache_policy) == (1024 * MB, "lru")
    assert (c.model_cache_format, c.model_cache_compression) == ("safetensors", True)


def test_training_cache_yaml() -> None:
    c = CacheConfig.from_file(SEED / "training_cache.yaml")
    assert (c.training_cache_size, c.training_cache_policy) == (512 * MB, "fifo")
    assert (c.training_cache_batch_buffer, c.training_cache_prefetch) == (32, 4)


def test_system_cache_yaml() -> None:
    c = CacheConfig.from_file(SEED / "system_cache.yaml")
    assert (c.system_cache_size, c.system_cache_policy) == (256 * MB, "time")
    assert c.system_cache_path == Path(".cache/temp")
    assert c.system_cache_max_age == 86400.0


def test_all_yaml_sections_in_one_file(tmp_path: Path) -> None:
    """The page's snippets pasted into one settings file: [cache] plus the three cache types."""
    combined = tmp_path / "llamahome.yaml"
    combined.write_text("".join((SEED / n).read_text() for n in SNIPPETS if n.endswith(".yaml")))
    c = CacheConfig.from_file(combined)
    assert (c.memory_size, c.disk_size) == (1000 * MB, 10000 * MB)
    assert (c.model_cache_size, c.training_cache_size, c.system_cache_size) == (
        1024 * MB,
        512 * MB,
        256 * MB,
    )
    with CacheManager(c, cleanup=False) as manager:
        assert manager.model_cache.store.capacity_bytes == 1024 * MB
        assert manager.model_cache.store.policy == "lru"
        assert manager.training_cache.store.capacity_bytes == 512 * MB
        assert manager.training_cache.store.policy == "fifo"
        assert manager.training_cache.prefetch == 4
        system = manager.system_cache.store
        assert (system.capacity_bytes, system.policy, system.max_age) == (256 * MB, "time", 86400)
        assert system.path.resolve() == (tmp_path / ".cache" / "temp").resolve()


def test_cache_toml() -> None:
    c = CacheConfig.from_file(SEED / "cache.toml")
    assert (c.memory_size, c.disk_size, c.policy) == (4 << 30, 100 << 30, "lru")
    assert c.eviction_threshold == 0.9
    assert (c.memory_max_items, c.tier_cleanup_interval("memory")) == (1000, 300.0)
    assert c.disk_path == Path(".cache/training") and c.disk_use_mmap
    store = c.build_store()
    memory, disk = store.tiers
    assert (memory.max_items, memory.eviction_threshold) == (1000, 0.9)
    assert (disk.use_mmap, disk.eviction_threshold) == (True, 0.9)
    store.close()


def test_the_seeds_environment_and_python_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_MEMORY_SIZE", "4GB")
    monkeypatch.setenv("CACHE_DISK_SIZE", "100GB")
    monkeypatch.setenv("CACHE_POLICY", "lru")
    c = CacheConfig()
    assert (c.memory_size, c.disk_size, c.policy) == (4 << 30, 100 << 30, "lru")
    c = CacheConfig(memory_size="4GB", disk_size="100GB", policy="lru", eviction_threshold=0.9)
    assert (c.memory_size, c.eviction_threshold) == (4 << 30, 0.9)
    available = 8_123_456_789  # ResourceManager().get_available_memory() in bytes
    assert CacheConfig(memory_size=available * 0.3).memory_size == int(available * 0.3)


# -- bare numbers: MB in the seed's sections, bytes at promptcache's names, refused where ambiguous ---


def test_bare_sizes_by_place(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[cache]\nredis_size = 4096\n[cache.memory]\nsize = 1000\n[cache.disk]\nsize = '1.5'\n"
    )
    c = CacheConfig.from_file(path)
    assert c.memory_size == 1000 * MB  # a section's size: MB
    assert c.disk_size == int(1.5 * MB)
    assert c.redis_size == 4096  # promptcache's flat name: bytes
    assert CacheConfig(memory_size=1000).memory_size == 1000  # keyword: bytes
    path.write_text("[cache.memory]\nsize = '2GB'\n[cache.disk]\nsize = 0\n")
    assert (CacheConfig.from_file(path).memory_size, CacheConfig.from_file(path).disk_size) == (
        2 << 30,
        0,
    )


@pytest.mark.parametrize("size", [1_000_000, 1048576, "2000000", 1e7])
def test_a_section_size_that_may_mean_bytes_is_refused(tmp_path: Path, size: object) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"cache:\n  memory:\n    size: {size!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=r"ambiguous.*MB.*write '.+B' if you meant bytes"):
        CacheConfig.from_file(path)


def test_llamahome_environment_size_without_unit_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CACHE_MEMORY_SIZE", "1000")
    with pytest.raises(ConfigError, match="CACHE_MEMORY_SIZE=1000MB or CACHE_MEMORY_SIZE=1000B"):
        CacheConfig()
    assert CacheConfig(memory_size="1GB").memory_size == 1 << 30  # not used: no refusal
    monkeypatch.setenv("PROMPTCACHE_MEMORY_SIZE", "1000")  # promptcache's own name: bytes
    assert CacheConfig().memory_size == 1000


def test_a_setting_given_twice_in_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[cache]\nmemory_size = "4GB"\n[cache.memory]\nsize = 1000\n')
    with pytest.raises(ConfigError, match=r"memory_size is set twice.*cache.memory_size.*size"):
        CacheConfig.from_file(path)
    path.write_text("[cache]\n[cache.system_cache]\nsize = 1\n[system_cache]\nsize = 2\n")
    with pytest.raises(ConfigError, match="both at the top level and under"):
        CacheConfig.from_file(path)


def test_section_synonyms_and_errors_name_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cache:\n  memory:\n    type: lfu\n")
    with pytest.raises(ConfigError, match=r"memory_policy='lfu'.*lru, fifo, ttl, size"):
        CacheConfig.from_file(path)
    assert read_config_file(SEED / "system_cache.yaml") == {
        "system_cache_size": "256MB",
        "system_cache_path": ".cache/temp",
        "system_cache_max_age": 86400,
        "system_cache_policy": "time",
    }
    for bad, words in [
        ({"eviction_threshold": 0}, ["eviction_threshold", "above 0"]),
        ({"eviction_threshold": 1.5}, ["eviction_threshold", "at most 1"]),
        ({"memory_max_items": 0}, ["memory_max_items", "1 or more"]),
        ({"training_cache_prefetch": -1}, ["training_cache_prefetch", "0 or more"]),
        ({"model_cache_format": "onnx"}, ["model_cache_format", "gguf, safetensors"]),
        ({"system_cache_max_age": None}, ["system_cache_max_age", "time"]),
        ({"disk_policy": "ttl"}, ["disk_policy", "max_age"]),
    ]:
        with pytest.raises(ConfigError) as info:
            CacheConfig(**bad)
        for word in words:
            assert word in str(info.value)


# -- the settings do what they say in the stores ------------------------------------------------------


def test_max_items_caps_the_memory_tier() -> None:
    memory = CacheConfig(memory_size="1MB", disk_size=0, memory_max_items=3).memory_store()
    for i in range(5):
        memory.put(f"k{i}", b"v")
    assert sorted(memory.keys()) == ["k2", "k3", "k4"] and memory.evictions == 2


def _oracle_lru(ops: list[tuple[str, int]], capacity: int, threshold: float) -> list[str]:
    """LRU with an eviction threshold, written out plainly: the keys held after `ops` (puts of sizes)."""
    held: OrderedDict[str, int] = OrderedDict()
    for key, size in ops:
        held.pop(key, None)
        if sum(held.values()) + size > capacity:
            while held and sum(held.values()) + size > int(threshold * capacity):
                held.popitem(last=False)
        held[key] = size
    return list(held)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from("abcdefgh"), st.integers(min_value=1, max_value=400)),
        max_size=40,
    ),
    threshold=st.sampled_from([0.3, 0.5, 0.9, 1.0]),
)
def test_eviction_threshold_in_memory_matches_the_oracle(
    ops: list[tuple[str, int]], threshold: float
) -> None:
    memory = MemoryStore(1000, eviction_threshold=threshold)
    for key, size in ops:
        memory.put(key, b"x" * size)
    assert list(memory.keys()) == _oracle_lru(ops, 1000, threshold)
    assert memory.size() <= 1000


def test_eviction_threshold_on_disk_evicts_below_it(tmp_path: Path) -> None:
    config = CacheConfig(memory_size=0, disk_size=10_000, disk_path=tmp_path / "kv")
    for threshold in (None, 0.5):
        disk = CacheConfig(**{**config.model_dump(), "eviction_threshold": threshold}).disk_store()
        disk.clear()
        disk.put("k0", b"v" * 950)
        entry = disk.size()  # the value plus its envelope
        fit = 10_000 // entry
        for i in range(1, fit):
            disk.put(f"k{i}", b"v" * 950)
        assert len(disk) == fit  # full: nothing evicted yet
        disk.put("new", b"v" * 950)
        kept = int(disk.eviction_threshold * 10_000) // entry  # the new entry included
        assert len(disk) == kept and kept == (fit if threshold is None else 10_000 // 2 // entry)
        assert "new" in list(disk.keys()) and "k0" not in list(disk.keys())  # oldest first
        disk.close()


def test_use_mmap_is_accepted_and_reads_as_without_it(tmp_path: Path) -> None:
    """The seed's use_mmap loads and is reported; reads (one pread into the value, checked in place)
    are the same either way, and a damaged entry is still a logged, removed miss."""
    config = CacheConfig.from_file(SEED / "cache.toml", memory_size=0, disk_size="1MB")
    disk = config.disk_store()
    assert disk.use_mmap and disk.stats()["use_mmap"] == 1
    disk.put("k", b"value" * 1000, fingerprint="fp")
    assert disk.get("k", fingerprint="fp") == b"value" * 1000
    path = disk.path / "entries" / "k" / "k"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    assert disk.get("k", fingerprint="fp") is None and len(disk) == 0
    off = CacheConfig(memory_size=0, disk_size="1MB", disk_path=tmp_path / "plain").disk_store()
    assert not off.use_mmap
    off.put("k", b"v")
    assert off.get("k") == b"v"
    disk.close()
    off.close()


def test_per_tier_cleanup_intervals(tmp_path: Path) -> None:
    config = CacheConfig(
        memory_size="1MB",
        disk_size="1MB",
        disk_path=tmp_path / "kv",
        max_age=0.2,
        memory_cleanup_interval=0.05,
        disk_cleanup_interval=3600,
        cleanup_interval=3600,
    )
    with CacheManager(config) as manager:
        manager.put("k", b"v")
        memory, disk = manager.store.tiers
        deadline = time.monotonic() + 10
        while len(memory) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(memory) == 0  # the RAM tier's cleanup removed it
        assert len(disk) == 1  # the disk tier's cleanup has not run yet (its index still lists it)
        assert manager.stats()["cleanup"]["tier_interval_s"] == {"memory": 0.05, "disk": 3600.0}


def test_system_cache_max_age_expires_artefacts(tmp_path: Path) -> None:
    config = CacheConfig(
        memory_size="1MB",
        disk_size=0,
        system_cache_path=tmp_path / "temp",
        system_cache_max_age="0.2",
    )
    with CacheManager(config, cleanup=False) as manager:
        manager.system_cache.put("scratch", b"data")
        assert manager.system_cache.get("scratch") is not None
        time.sleep(0.3)
        assert manager.system_cache.get("scratch") is None


def test_model_cache_compression_is_not_silent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = CacheConfig.from_file(
        SEED / "model_cache.yaml", memory_size="1MB", model_cache_path=tmp_path / "models"
    )
    with caplog.at_level(logging.WARNING, logger="promptcache.config"):
        config.model_cache().close()
    assert "kept uncompressed" in caplog.text


def test_every_setting_is_in_the_documented_table() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    table = [line for line in doc.splitlines() if line.startswith("| `")]
    documented = {name for line in table for name in line.split("|")[1].split("`")[1::2]}
    assert set(CacheConfig.model_fields) <= documented
    for kind in ARTEFACT_CACHES:
        assert f"`{kind}`" in doc
