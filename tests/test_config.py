"""CacheConfig: sources and their precedence (kwargs > file > environment), parsing, validation, building tiers."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from promptcache import PromptCache
from promptcache.config import (
    CacheConfig,
    build_cache,
    default_cache,
    default_disk_path,
    parse_seconds,
    parse_size,
    read_config_file,
)
from promptcache.errors import ConfigError
from promptcache.store.disk import DiskStore
from promptcache.store.memory import MemoryStore
from promptcache.store.redis import RedisStore
from promptcache.store.tiered import NamespacedStore, TieredStore

ENV_NAMES = [
    "PROMPTCACHE_CONFIG",
    "CACHE_MEMORY_SIZE",
    "CACHE_DISK_SIZE",
    "CACHE_POLICY",
    *(f"PROMPTCACHE_{name.upper()}" for name in CacheConfig.model_fields),
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting leaks in from the machine running the tests; the disk tier lives in tmp_path."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PROMPTCACHE_DISK_PATH", str(tmp_path / "kv"))


def test_defaults_are_documented_values(tmp_path: Path) -> None:
    c = CacheConfig()
    assert c.memory_size == 2 << 30
    assert c.disk_size == 10 << 30
    assert c.disk_path == tmp_path / "kv"
    assert c.redis_url is None
    assert (c.policy, c.max_age, c.compression, c.compression_level) == ("lru", None, "none", None)
    assert c.cleanup_interval == 60.0
    assert c.namespace == "promptcache"


def test_default_disk_path_is_the_user_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMPTCACHE_DISK_PATH")
    import platformdirs

    assert CacheConfig().disk_path == Path(platformdirs.user_cache_dir("promptcache")) / "kv"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GB", 4 << 30),
        ("512MB", 512 << 20),
        ("512 mb", 512 << 20),
        ("1.5GiB", 3 << 29),
        ("100k", 100 << 10),
        ("2T", 2 << 40),
        ("123", 123),
        ("77B", 77),
        (4096, 4096),
        (0, 0),
    ],
)
def test_sizes_are_bytes_or_strings_with_units(text: object, expected: int) -> None:
    assert parse_size(text) == expected
    assert CacheConfig(memory_size=text).memory_size == expected


@given(st.integers(min_value=0, max_value=1 << 50))
def test_any_int_size_is_itself_in_any_spelling(n: int) -> None:
    assert parse_size(n) == parse_size(str(n)) == parse_size(f"{n}B") == n


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90.0),
        ("90", 90.0),
        ("30s", 30.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("0.5", 0.5),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_seconds(text, allow_none=True) == seconds
    assert CacheConfig(max_age=text, cleanup_interval=text).max_age == seconds


def test_max_age_none_and_redis_url_none_spellings() -> None:
    assert CacheConfig(max_age="none").max_age is None
    assert CacheConfig(redis_url="").redis_url is None
    assert CacheConfig(redis_url="off").redis_url is None


def test_environment_variables_and_llamahome_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_MEMORY_SIZE", "4GB")
    monkeypatch.setenv("CACHE_DISK_SIZE", "100GB")
    monkeypatch.setenv("CACHE_POLICY", "FIFO")
    monkeypatch.setenv("PROMPTCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("PROMPTCACHE_MAX_AGE", "1h")
    monkeypatch.setenv("PROMPTCACHE_COMPRESSION", "lz4")
    monkeypatch.setenv("PROMPTCACHE_NAMESPACE", "team-a")
    c = CacheConfig()
    assert (c.memory_size, c.disk_size, c.policy) == (4 << 30, 100 << 30, "fifo")
    assert (c.redis_url, c.max_age, c.compression, c.namespace) == (
        "redis://127.0.0.1:6379/0",
        3600.0,
        "lz4",
        "team-a",
    )
    # The PROMPTCACHE_ name wins over the alias.
    monkeypatch.setenv("PROMPTCACHE_MEMORY_SIZE", "1GB")
    assert CacheConfig().memory_size == 1 << 30


def test_precedence_kwargs_over_file_over_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROMPTCACHE_MEMORY_SIZE", "1GB")
    monkeypatch.setenv("PROMPTCACHE_DISK_SIZE", "2GB")
    monkeypatch.setenv("PROMPTCACHE_POLICY", "fifo")
    path = tmp_path / "cache.toml"
    path.write_text('memory_size = "3GB"\ndisk_size = "4GB"\n')
    c = CacheConfig(config_file=path, memory_size="5GB")
    assert c.memory_size == 5 << 30  # kwargs beat the file
    assert c.disk_size == 4 << 30  # the file beats the environment
    assert c.policy == "fifo"  # the environment fills the rest
    assert CacheConfig.from_file(path, memory_size=7).memory_size == 7


def test_yaml_file_with_cache_section_and_nested_tables(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(
        "server:\n  port: 8000\n"
        "cache:\n"
        "  policy: size\n"
        "  memory:\n    size: 256MB\n"
        "  disk:\n    size: 1GB\n    path: /tmp/elsewhere\n"
        "  redis:\n    url: redis://127.0.0.1:6380/1\n    size: 64MB\n"
        "  cleanup-interval: 5m\n"
    )
    c = CacheConfig.from_file(path)
    assert (c.memory_size, c.disk_size, c.redis_size) == (256 << 20, 1 << 30, 64 << 20)
    assert c.disk_path == Path("/tmp/elsewhere")
    assert (c.redis_url, c.policy, c.cleanup_interval) == (
        "redis://127.0.0.1:6380/1",
        "size",
        300.0,
    )


def test_toml_file_named_by_promptcache_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "cache.toml"
    path.write_text('[cache]\npolicy = "ttl"\nmax_age = "2h"\n[cache.disk]\nsize = "1GB"\n')
    monkeypatch.setenv("PROMPTCACHE_CONFIG", str(path))
    monkeypatch.setenv("PROMPTCACHE_POLICY", "fifo")
    c = CacheConfig()
    assert (c.policy, c.max_age, c.disk_size) == ("ttl", 7200.0, 1 << 30)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"policy": "lfu"}, ["policy", "lru", "fifo", "ttl", "size"]),
        ({"compression": "gzip"}, ["compression", "none", "zstd", "lz4"]),
        ({"memory_size": "lots"}, ["memory_size", "512MB", "4GB"]),
        ({"disk_size": -5}, ["disk_size", "0"]),
        ({"max_age": "soon"}, ["max_age", "30s"]),
        ({"cleanup_interval": 0}, ["cleanup_interval", "more than 0"]),
        ({"redis_url": "http://cache:6379"}, ["redis_url", "redis://"]),
        ({"namespace": "a:b"}, ["namespace", "[0-9A-Za-z_.-]"]),
        ({"compression": "zstd", "compression_level": 40}, ["compression_level", "-7 to 22"]),
        ({"compression": "lz4", "compression_level": "x"}, ["compression_level", "int"]),
        ({"policy": "ttl"}, ["max_age", "ttl"]),
        ({"memory_size": 0, "disk_size": 0}, ["memory_size", "disk_size", "redis_url"]),
        ({"memory_sise": "1GB"}, ["memory_sise", "memory_size"]),
    ],
)
def test_invalid_values_name_the_setting_and_the_accepted_values(
    kwargs: dict, names: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        CacheConfig(**kwargs)
    assert isinstance(info.value, ValueError)
    for name in names:
        assert name in str(info.value)


def test_invalid_environment_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_POLICY", "lfu")
    with pytest.raises(ConfigError, match=r"policy='lfu'.*lru, fifo, ttl, size"):
        CacheConfig()


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        CacheConfig.from_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("memory_size = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        CacheConfig.from_file(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[cache]\neviction_treshold = 0.9\n")
    with pytest.raises(ConfigError, match="unknown cache setting 'eviction_treshold'"):
        CacheConfig.from_file(unknown)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="table of settings"):
        CacheConfig.from_file(listed)


def test_a_config_does_not_change_once_made() -> None:
    c = CacheConfig()
    with pytest.raises(ConfigError, match="build another"):
        c.memory_size = 5
    assert CacheConfig(**{**c.model_dump(), "memory_size": 5}).memory_size == 5


def test_compression_level_is_ignored_without_compression() -> None:
    c = CacheConfig(compression="none", compression_level=99)
    assert c.compressor().name == "none"
    assert CacheConfig(compression="zstd").compressor().level == 3
    assert CacheConfig(compression="lz4", compression_level=9).compressor().level == 9


def test_build_store_turns_on_the_configured_tiers(tmp_path: Path) -> None:
    store = CacheConfig(memory_size="1MB", disk_size=0).build_store()
    assert isinstance(store, TieredStore)
    assert [type(t) for t in store.tiers] == [MemoryStore]

    store = CacheConfig(
        memory_size="1MB",
        disk_size="2MB",
        redis_url="redis://127.0.0.1:1/0",
        redis_size="3MB",
        policy="fifo",
        max_age=60,
        compression="lz4",
        namespace="ns1",
    ).build_store()
    memory, disk, redis_tier = store.tiers
    assert isinstance(memory, MemoryStore) and memory.capacity_bytes == 1 << 20
    assert memory.policy.name == "fifo" and memory.max_age == 60
    assert (
        isinstance(disk, DiskStore)
        and disk.capacity_bytes == 2 << 20
        and disk.path == tmp_path / "kv"
    )
    assert disk.compressor.name == "lz4" and disk.max_age == 60
    assert isinstance(redis_tier, RedisStore) and redis_tier.capacity_bytes == 3 << 20
    assert (redis_tier.namespace, redis_tier.ttl, redis_tier.compressor.name) == ("ns1", 60, "lz4")
    assert store.capacity_bytes == 3 << 20
    store.close()


def test_build_cache_is_shared_when_a_persistent_tier_exists() -> None:
    ram_only = CacheConfig(memory_size="1MB", disk_size=0).build_cache()
    assert isinstance(ram_only, PromptCache) and not ram_only._probe_store
    with_disk = CacheConfig(memory_size="1MB", disk_size="1MB").build_cache()
    assert with_disk._probe_store
    assert isinstance(with_disk.store, NamespacedStore) and with_disk.store.cache_name == "default"


def test_default_cache_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTCACHE_MEMORY_SIZE", "8MB")
    monkeypatch.setenv("PROMPTCACHE_DISK_SIZE", "0")
    cache = default_cache()
    assert cache.capacity_bytes == 8 << 20


# -- build_cache: the one factory -----------------------------------------------------------------


def test_build_cache_builds_every_kind_of_cache(tmp_path: Path) -> None:
    given = PromptCache(capacity_bytes=1 << 20)
    assert build_cache(given) is given and build_cache(None) is None
    config = CacheConfig(memory_size="3MB", disk_size="5MB", policy="fifo")
    ram = build_cache("ram", config)
    assert isinstance(ram.store, MemoryStore) and ram.capacity_bytes == 3 << 20
    assert ram.store.policy.name == "fifo" and not ram._probe_store
    disk = build_cache("disk", config)
    assert isinstance(disk.store, DiskStore) and disk.store.path == tmp_path / "kv"
    assert disk.capacity_bytes == 5 << 20 and disk._probe_store
    tiered = build_cache("tiered", config)
    assert isinstance(tiered.store, NamespacedStore) and tiered.store.persistent
    assert [t.name for t in tiered.store.store.tiers] == ["memory", "disk"]


def test_build_cache_reads_the_environment_without_a_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROMPTCACHE_MEMORY_SIZE", "6MB")
    assert build_cache("ram").capacity_bytes == 6 << 20
    assert build_cache("ram").capacity_bytes == PromptCache(capacity_bytes=6 << 20).capacity_bytes


def test_build_cache_names_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="'ram', 'disk', 'tiered' or None"):
        build_cache("redis")
    with pytest.raises(ConfigError, match="memory_size above 0"):
        build_cache("ram", CacheConfig(memory_size=0))
    with pytest.raises(ConfigError, match="disk_size above 0"):
        build_cache("disk", CacheConfig(disk_size=0))


def test_policy_and_codec_names_come_from_the_stores() -> None:
    from promptcache.store.compression import CODECS
    from promptcache.store.policies import POLICY_NAMES

    for policy in POLICY_NAMES:
        max_age = 60 if policy == "ttl" else None
        assert (
            CacheConfig(policy=policy, max_age=max_age).build_store().tiers[0].policy.name == policy
        )
    for codec in CODECS:
        assert CacheConfig(compression=codec).compressor().name == codec
    with pytest.raises(ConfigError, match="use lru, fifo, size"):
        CacheConfig(policy="ttl")


def test_config_files_are_read_by_the_one_settings_reader(tmp_path: Path) -> None:
    from promptcache.files import read_settings_file

    path = tmp_path / "c.toml"
    path.write_text('[cache]\nmemory-size = "1MB"\n[cache.disk]\nsize = 0\n')
    assert read_settings_file(path) == {"cache": {"memory-size": "1MB", "disk": {"size": 0}}}
    assert read_config_file(path) == {"memory_size": "1MB", "disk_size": 0}
    (tmp_path / "bad.toml").write_text("[cache\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config_file(tmp_path / "bad.toml")


def test_default_disk_path_is_the_disk_store_default() -> None:
    from promptcache.files import user_cache_dir
    from promptcache.store.disk import default_path

    assert default_disk_path() == default_path() == user_cache_dir("kv")
