"""CacheManager: named caches, raw entries, stats per tier, the background cleanup (max_age and
capacity, against a real Redis), inspect, and the stats/gc/inspect/clear commands."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import synthetic_state
from hypothesis import given, settings
from hypothesis import strategies as st
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


@pytest.fixture(autouse=True)
def artefacts_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The artefact caches live in tmp_path, never in the user's cache dir."""
    for kind in ARTEFACT_CACHES:
        monkeypatch.setenv(f"PROMPTCACHE_{kind.upper()}_PATH", str(tmp_path / kind))


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

    # How exact mode reuses on this machine, per probed model (the probe runs once per model).
    from promptcache import LLM
    from promptcache.engines.llama_cpp import probe

    llm = LLM(cache=None)
    strategy, name = llm.exact_strategy, Path(llm.model_path).name
    key = probe.probe_key(llm.model_path, flash_attn=False, n_threads=llm.engine.settings.n_threads)
    result = runner.invoke(app, ["stats", "--json"], env=cli_env)
    rows = [r for r in json.loads(result.output)["exact"] if r["probe"] == key]
    # a model has a record per kernel settings (flash_attn, threads), whose strategies may differ
    assert len(rows) == 1 and rows[0]["model"] == name and rows[0]["strategy"] == strategy
    assert "exact mode on this machine" in runner.invoke(app, ["stats"], env=cli_env).output

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


# -- LlamaHome's manager: any key, numpy and Arrow values, awaited start/stop/get_metrics, artefacts ----


def test_any_string_key_is_hashed_for_storage(config: CacheConfig) -> None:
    from promptcache.manager import storage_key

    keys = ["Not A Key!", "datasets/wiki:train", "ünïcode ключ", "x" * 500, "hash-abc", "plain_key"]
    with CacheManager(config, cleanup=False) as manager:
        for i, key in enumerate(keys):
            manager.put(key, f"value {i}".encode())
        for i, key in enumerate(keys):
            assert manager.get(key) == f"value {i}".encode() and manager.contains(key)
        stored = sorted(manager.store.tier("disk").keys())
        assert "default:plain_key" in stored  # plain keys stay readable
        hashed = [k for k in stored if k.startswith("default:hash-")]
        assert len(hashed) == 5 and storage_key("hash-abc") != "hash-abc"
        assert manager.remove("Not A Key!") and manager.get("Not A Key!") is None


@settings(max_examples=40, deadline=None)
@given(keys=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=8))
def test_distinct_keys_never_share_an_entry(keys: list[str]) -> None:
    """Against a dict as the oracle: the last value put under each distinct key comes back."""
    store = CacheConfig(memory_size="1MB", disk_size=0).build_store()
    manager = CacheManager(CacheConfig(memory_size="1MB", disk_size=0), store=store, cleanup=False)
    oracle: dict[str, bytes] = {}
    for i, key in enumerate(keys):
        manager.put(key, str(i).encode())
        oracle[key] = str(i).encode()
    assert {key: manager.get(key) for key in oracle} == oracle
    manager.close()


def test_numpy_and_arrow_values_round_trip_without_pickle(config: CacheConfig) -> None:
    import numpy as np
    import pyarrow as pa

    arrays = {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        "scalar": np.array(3.5),
        "strings": np.array(["a", "bc"]),
        "empty": np.zeros((0, 5), dtype=np.uint8),
    }
    table = pa.table({"tokens": [[1, 2, 3], [4]], "text": ["hi", "there"]})
    with CacheManager(config, cleanup=False) as manager:
        for name, array in arrays.items():
            manager.put(name, array)
        manager.put("table", table)
        for name, array in arrays.items():
            got = manager.get(name)
            assert isinstance(got, np.ndarray) and got.dtype == array.dtype
            np.testing.assert_array_equal(got, array)
        assert manager.get("table").equals(table)
        # A fresh manager reads them from disk and Redis, where they are plain bytes.
        with CacheManager(config, cleanup=False) as other:
            np.testing.assert_array_equal(other.get("f32"), arrays["f32"])
            assert other.get("table").equals(table)
        with pytest.raises(TypeError, match="need pickle"):
            manager.put("objects", np.array([{"a": 1}], dtype=object))


def test_a_pickled_array_in_the_store_is_a_miss_never_loaded(
    config: CacheConfig, caplog: pytest.LogCaptureFixture
) -> None:
    import io

    import numpy as np

    buf = io.BytesIO()
    buf.write(b"pcvn")
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with CacheManager(config, cleanup=False) as manager:
        manager.store.put("default:crafted", buf.getvalue())
        with caplog.at_level(logging.WARNING, logger="promptcache.manager"):
            assert manager.get("crafted") is None
    assert "unusable" in caplog.text


def test_start_stop_and_get_metrics_are_awaitable(config: CacheConfig, tmp_path: Path) -> None:
    config = CacheConfig(
        **{**config.model_dump(), "system_cache_path": tmp_path / "temp", "cleanup_interval": 0.05}
    )

    async def llamahome() -> dict:
        manager = CacheManager(config, cleanup=False)
        await manager.start()
        assert manager.running
        manager.put("k", b"v" * 100)
        manager.get("k")
        manager.get("missing")
        manager.system_cache.put("scratch", b"data")
        manager.system_cache.get("scratch")
        metrics = await manager.get_metrics()
        counts = await manager.cleanup()
        assert "system_cache" in counts and "disk" in counts
        await manager.stop()
        assert not manager.running
        async with manager:
            pass
        return metrics

    metrics = asyncio.run(llamahome())
    assert metrics["memory_usage"] > 100 and metrics["eviction_count"] == 0
    assert set(metrics["by_type"]) == {"prompt", "system_cache"}
    prompt, system = metrics["by_type"]["prompt"], metrics["by_type"]["system_cache"]
    assert prompt["hit_rate"] == 0.5 and system["hit_rate"] == 1.0
    hits = prompt["hits"] + system["hits"]
    assert (prompt["hits"], prompt["misses"], system["misses"]) == (1, 1, 0) and hits >= 2
    assert metrics["hit_rate"] == hits / (hits + 1)  # every cache type's lookups together
    assert system["bytes"] == 4 and system["capacity_bytes"] == 256 << 20
    # The sync API is unchanged: start() and stop() work when not awaited.
    with CacheManager(config, cleanup=False) as manager:
        manager.start()
        assert manager.running
        manager.stop()
        assert not manager.running


def test_artefact_caches_in_stats_inspect_gc_and_clear(tmp_path: Path) -> None:
    config = CacheConfig(
        memory_size="1MB",
        disk_size="1MB",
        disk_path=tmp_path / "kv",
        model_cache_path=tmp_path / "models",
        training_cache_path=tmp_path / "datasets",
        system_cache_path=tmp_path / "temp",
        system_cache_size="64KB",
        cleanup_interval=3600,
    )
    with CacheManager(config, cleanup=False) as manager:
        assert manager.artefact_stores() == {}  # nothing created until used
        manager.system_cache.put("a", b"x" * 1000)
        manager.system_cache.put("b", b"y" * 2000)
        manager.put("k", b"v")
        s = manager.stats()["artefacts"]
        assert set(s) == {"system_cache"}
        assert s["system_cache"]["entries"] == 2 and s["system_cache"]["bytes"] == 3000
        assert s["system_cache"]["capacity_bytes"] == 64 << 10
        listed = manager.inspect(tier="system_cache")
        assert sorted((e.key, e.bytes) for e in listed) == [("a", 1000), ("b", 2000)]
        assert manager.run_cleanup()["system_cache"]["expired"] == 0
        with pytest.raises(ValueError, match="artefact cache"):
            manager.cache("system_cache")
        manager.clear("system_cache")
        assert manager.system_cache.get("a") is None and manager.get("k") == b"v"
        manager.system_cache.put("c", b"z")
        manager.clear()
        assert manager.system_cache.get("c") is None and manager.get("k") is None
    # Another process (a new manager) sees the artefact cache on disk.
    with CacheManager(config, cleanup=False) as other:
        assert set(other.artefact_stores()) == {"system_cache"}


def test_cli_shows_the_artefact_caches(cli_env: dict[str, str], tmp_path: Path) -> None:
    config = CacheConfig(
        disk_path=tmp_path / "kv",
        redis_url=cli_env["PROMPTCACHE_REDIS_URL"],
        system_cache_path=tmp_path / "system_cache",
    )
    with CacheManager(config, cleanup=False) as manager:
        manager.system_cache.put("scratch-file", b"x" * 3000)
        manager.put("k1", b"v")
    runner = CliRunner()
    result = runner.invoke(app, ["stats"], env=cli_env)
    assert result.exit_code == 0, result.output
    assert "system_cache" in result.output and "Not created yet: model_cache, training_cache" in (
        result.output
    )
    report = json.loads(runner.invoke(app, ["stats", "--json"], env=cli_env).output)
    assert report["artefacts"]["system_cache"]["entries"] == 1
    result = runner.invoke(app, ["inspect", "--tier", "system_cache"], env=cli_env)
    assert result.exit_code == 0 and "scratch-file" in result.output
    result = runner.invoke(app, ["gc"], env=cli_env)
    assert result.exit_code == 0 and "system_cache" in result.output
    result = runner.invoke(app, ["clear", "--cache", "system_cache", "--yes"], env=cli_env)
    assert result.exit_code == 0 and "Removed 1 artefact (cache 'system_cache')" in result.output
    result = runner.invoke(app, ["clear", "--yes"], env=cli_env)
    assert "Removed 1 key and 0 artefacts (every entry)" in result.output
