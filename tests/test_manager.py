"""CacheManager: named caches, raw entries, stats per tier, the background cleanup (max_age and
capacity, against a real Redis), inspect, and the stats/gc/inspect/clear commands."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import synthetic_state
from typer.testing import CliRunner

from promptcache import DEFAULT_BLOCK_SIZE, LLM
from promptcache.cli import app
from promptcache.config import ARTEFACT_CACHES, CacheConfig
from promptcache.manager import CacheManager
from promptcache.store.disk import DiskStore
from promptcache.store.redis import RedisStore
from promptcache.values import TAG_BYTES

if TYPE_CHECKING:
    from redis_fixture import RedisServer

pytest_plugins = ["redis_fixture"]  # a real redis-server on a free loopback port

FP = "model-a"


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def config(tmp_path: Path, redis_url: str) -> CacheConfig:
    return CacheConfig(
        memory_size="1MB",
        disk_size="2MB",
        disk_path=tmp_path / "kv",
        redis_url=redis_url,
        redis_size="2MB",
        cleanup_interval=3600,
    )


def test_raw_entries_in_named_caches(config: CacheConfig) -> None:
    with CacheManager(config) as manager:
        manager.put("greeting", b"hello")
        manager.put("greeting", b"bonjour", cache="fr")
        assert manager.get("greeting") == b"hello"
        assert manager.get("greeting", cache="fr") == b"bonjour"
        assert manager.contains("greeting") and not manager.contains("other")
        assert manager.remove("greeting") and not manager.remove("greeting")
        assert manager.get("greeting") is None and manager.get("greeting", cache="fr") == b"bonjour"
        assert sorted(manager.store.tier("redis").keys()) == ["fr:greeting"]
        manager.put("x", b"1", cache="a")
        manager.clear("fr")
        assert manager.get("greeting", cache="fr") is None and manager.get("x", cache="a") == b"1"
        manager.clear()
        assert len(manager.store) == 0


def test_raw_entry_arguments_are_checked(config: CacheConfig) -> None:
    with CacheManager(config, cleanup=False) as manager:
        with pytest.raises(TypeError, match="keys are strings"):
            manager.put(42, b"v")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="never pickle"):
            manager.put("k", {"a": 1})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="cache names"):
            manager.get("k", cache="Bad Name")


def test_named_prompt_caches_share_tiers_not_prefixes(config: CacheConfig, codec) -> None:
    tokens = list(range(40))
    state = synthetic_state(tokens)
    with CacheManager(config, cleanup=False) as manager:
        chat, batch = manager.cache("chat"), manager.cache("batch")
        assert manager.cache("chat") is chat
        chat.insert(tokens, state, FP, codec=codec)
        assert chat.lookup(tokens, FP, codec=codec).tokens_reused == 40
        assert batch.lookup(tokens, FP, codec=codec) is None
        # Another process with the same settings and name finds the prefix in the shared tiers.
        with CacheManager(config, cleanup=False) as other:
            hit = other.cache("chat").lookup(tokens, FP, codec=codec)
            assert hit is not None and hit.tokens_reused == 40 and hit.source == "disk"
            assert hit.state == state
        assert manager.names == ["batch", "chat"]


def test_stats_report_every_tier(config: CacheConfig, codec) -> None:
    with CacheManager(config, cleanup=False) as manager:
        manager.put("a", b"x" * 1000)
        manager.get("a")
        manager.get("missing")
        cache = manager.cache()
        cache.insert(list(range(20)), synthetic_state(list(range(20))), FP, codec=codec)
        s = manager.stats()
    assert s["hit_rate"] == 0.5 and (s["hits"], s["misses"]) == (1, 1)
    assert s["memory_usage"] > 1000 and s["disk_usage"] > 1000 and s["redis_usage"] > 1000
    assert s["eviction_count"] == 0
    assert set(s["tiers"]) == {"memory", "disk", "redis"}
    for tier in s["tiers"].values():
        for field in (
            "entries",
            "bytes",
            "capacity_bytes",
            "usage",
            "hits",
            "misses",
            "hit_rate",
            "eviction_count",
        ):
            assert field in tier
    assert s["tiers"]["redis"]["unavailable"] == 0
    assert s["caches"]["default"]["sequences"] == 1
    assert s["cleanup"]["running"] is False


def test_eviction_count_per_tier(tmp_path: Path) -> None:
    config = CacheConfig(
        memory_size=3000, disk_size="1MB", disk_path=tmp_path / "kv", cleanup_interval=3600
    )
    with CacheManager(config, cleanup=False) as manager:
        for i in range(5):
            manager.put(f"k{i}", b"v" * (1000 - TAG_BYTES))  # 1,000 bytes stored
        s = manager.stats()
    assert s["tiers"]["memory"]["eviction_count"] == 2 and s["tiers"]["disk"]["eviction_count"] == 0
    assert s["eviction_count"] == 2


def test_cleanup_thread_enforces_max_age_in_every_tier(tmp_path: Path, redis_url: str) -> None:
    config = CacheConfig(
        memory_size="1MB",
        disk_size="1MB",
        disk_path=tmp_path / "kv",
        redis_url=redis_url,
        max_age=2.0,  # long enough that a loaded CI machine still sees all five before they expire
        cleanup_interval=0.1,
    )
    with CacheManager(config) as manager:
        for i in range(5):
            manager.put(f"k{i}", b"v" * 100)
        memory, disk, remote = manager.store.tiers
        assert len(memory) == len(disk) == len(remote) == 5
        # Nothing reads the entries: only the cleanup can remove them (and their Redis accounting).
        assert wait_for(lambda: len(memory) == len(disk) == len(remote) == 0, timeout=15.0)
        assert remote.size() == 0
        assert manager.stats()["cleanup"]["expired"] >= 15
        assert manager.running


def test_cleanup_thread_enforces_capacity_others_exceeded(tmp_path: Path, redis_url: str) -> None:
    """Processes with larger capacities filled disk and Redis; this manager's cleanup trims them."""
    roomy_disk = DiskStore(tmp_path / "kv", 1 << 20)
    roomy_redis = RedisStore(redis_url, 1 << 20)
    for i in range(20):
        roomy_disk.put(f"default:k{i}", b"v" * 1000, fingerprint=FP)
        roomy_redis.put(f"default:k{i}", b"v" * 1000, fingerprint=FP)
    config = CacheConfig(
        memory_size="1MB",
        disk_size=5000,
        disk_path=tmp_path / "kv",
        redis_url=redis_url,
        redis_size=5000,
        cleanup_interval=0.1,
    )
    with CacheManager(config) as manager:
        _memory, disk, remote = manager.store.tiers
        assert wait_for(lambda: disk.size() <= 5000 and remote.size() <= 5000)
        assert len(disk) == len(remote) == 4
        assert disk.get("default:k19") == b"v" * 1000  # the most recent survive
        assert manager.stats()["cleanup"]["evicted"] == 32


def test_close_stops_the_cleanup_thread(config: CacheConfig) -> None:
    config = CacheConfig(**{**config.model_dump(), "cleanup_interval": 0.05})
    manager = CacheManager(config)
    assert manager.running
    assert wait_for(lambda: manager.cleanup_runs >= 2)
    manager.close()
    assert not manager.running
    assert not [t for t in threading.enumerate() if t.name == "promptcache-cleanup"]
    runs = manager.cleanup_runs
    time.sleep(0.2)
    assert manager.cleanup_runs == runs


def test_cleanup_survives_redis_going_away(tmp_path: Path, own_redis: RedisServer) -> None:
    config = CacheConfig(
        memory_size="1MB",
        disk_size="1MB",
        disk_path=tmp_path / "kv",
        redis_url=own_redis.url,
        cleanup_interval=0.05,
    )
    with CacheManager(config) as manager:
        manager.put("k", b"v")
        own_redis.stop()
        runs = manager.cleanup_runs
        assert wait_for(lambda: manager.cleanup_runs >= runs + 3)
        assert manager.running and manager.get("k") == b"v"
        assert manager.stats()["redis_usage"] is None  # not known while Redis is away


# -- the engine, inspect and the CLI --------------------------------------------------------------

DOC = (
    "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days. "
    "Returns of damaged items are free within thirty days. Gift cards never expire. "
)


def test_inspect_shows_model_tokens_bytes_age_and_tier(config: CacheConfig) -> None:
    with (
        CacheManager(config, cleanup=False) as manager,
        LLM(cache=manager.cache(), n_ctx=256) as llm,
    ):
        tokens = llm.tokenize(DOC + "Question: how long do refunds take?")
        llm.logits(tokens)
        entries = manager.inspect()
    assert {e.tier for e in entries} == {"memory", "disk", "redis"}
    persisted = [e for e in entries if e.tier != "memory"]
    assert all(e.fingerprint == llm.fingerprint and e.cache == "default" for e in persisted)
    assert all(e.age_s is not None and 0 <= e.age_s < 60 for e in persisted)
    disk_tokens = sorted(e.tokens for e in entries if e.tier == "disk")
    assert sum(disk_tokens) == len(tokens) and max(disk_tokens) == DEFAULT_BLOCK_SIZE
    assert all(e.bytes > e.tokens * 20_000 for e in entries)


@pytest.fixture
def cli_env(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in ("PROMPTCACHE_CONFIG", "CACHE_MEMORY_SIZE", "CACHE_DISK_SIZE", "CACHE_POLICY"):
        monkeypatch.delenv(name, raising=False)
    return {
        "PROMPTCACHE_DISK_PATH": str(tmp_path / "kv"),
        "PROMPTCACHE_REDIS_URL": redis_url,
        # the artefact caches live in tmp_path too, never in the user's cache dir
        **{f"PROMPTCACHE_{kind.upper()}_PATH": str(tmp_path / kind) for kind in ARTEFACT_CACHES},
    }


def test_cli_stats_gc_inspect_clear(
    cli_env: dict[str, str], tmp_path: Path, redis_url: str
) -> None:
    config = CacheConfig(disk_path=tmp_path / "kv", redis_url=redis_url)
    with CacheManager(config, cleanup=False) as manager:
        manager.put("k1", b"v" * 2000)
        manager.put("k2", b"w" * 3000, cache="other")
    runner = CliRunner()

    result = runner.invoke(app, ["stats"], env=cli_env)
    assert result.exit_code == 0, result.output
    assert (
        "disk tier" in result.output
        and "redis tier" in result.output
        and "reachable" in result.output
    )
    result = runner.invoke(app, ["stats", "--json"], env=cli_env)
    report = json.loads(result.output)
    assert report["tiers"]["disk"]["entries"] == 2 and report["tiers"]["redis"]["entries"] == 2

    result = runner.invoke(app, ["inspect", "--tier", "disk"], env=cli_env)
    assert result.exit_code == 0 and "default:k1" in result.output and "other:k2" in result.output

    result = runner.invoke(app, ["gc"], env=cli_env)
    assert result.exit_code == 0 and "expired 0" in result.output

    result = runner.invoke(app, ["clear", "--cache", "other"], env=cli_env, input="y\n")
    assert result.exit_code == 0 and "Removed 1 key (cache 'other')" in result.output
    result = runner.invoke(app, ["clear"], env=cli_env, input="n\n")
    assert result.exit_code == 1
    result = runner.invoke(app, ["clear", "--yes"], env=cli_env)
    assert result.exit_code == 0 and "Removed 1 key and 0 artefacts (every entry)" in result.output
    assert len(RedisStore(redis_url)) == 0


def test_cli_reports_config_errors(cli_env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, ["stats"], env={**cli_env, "CACHE_POLICY": "lfu"})
    assert result.exit_code == 2 and "lru, fifo, ttl, size" in result.output
