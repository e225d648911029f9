"""Reliability, CI subset, cache layer: the real disk, Redis and tiered stores under faults, judged
against synthetic states (the exact state of every prefix is known), one verdict per run.

The long runs of the same scenarios: scripts/reliability.py (figures in RELIABILITY.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import scenarios as S
from faults import can_mount

pytest_plugins = ["redis_fixture"]  # a real redis-server on a free loopback port
MOUNT = can_mount()
NO_MOUNT = "mounting a tmpfs needs root with CAP_SYS_ADMIN; this runner has neither"


def _verdicts_pass(tally) -> None:
    assert S.passed(tally), f"a wrong verdict: {dict(tally)}"


@pytest.mark.parametrize("tier", ["disk", "redis", "tiered"])
def test_every_damaged_tier_answers_exactly_or_misses(
    tier: str, tmp_path: Path, redis_url: str
) -> None:
    tally = S.corruption(tier, 8, tmp_path, redis_url=redis_url, seed=1)
    _verdicts_pass(tally)
    assert tally["cache"] > 0  # the undamaged entries are still served


def _header_gone(raw: bytearray) -> None:
    raw[:100] = b"\x00" * 100  # "file is not a database"


def _name_undecodable(raw: bytearray) -> None:
    # Found by the 5x fault run: a flipped byte in a table's name makes sqlite's error message
    # undecodable, and Python's sqlite3 raised UnicodeDecodeError (not DatabaseError).
    raw[raw.find(b"tableentriesentries") + 5] = 0x9F  # the name sqlite reports: not UTF-8 now
    raw[raw.find(b"CREATE TABLE entries") + 13] = 0x9F  # and the schema no longer parses


@pytest.mark.parametrize("damage", [_header_gone, _name_undecodable])
def test_a_damaged_disk_index_is_set_aside_and_rebuilt(tmp_path: Path, damage) -> None:
    """Was: StoreUnavailableError (or UnicodeDecodeError) from every DiskStore(...) open, in
    every process, until someone deleted the file."""
    from promptcache.store.disk import DiskStore

    store = DiskStore(tmp_path, capacity_bytes=1 << 20)
    cache = S._cache(store)
    seq = S.sequences(3, 1)[0]
    cache.insert(seq, S.synthetic_state(seq), S.FP)
    store.close()
    index = tmp_path / "index.sqlite"
    raw = bytearray(index.read_bytes())
    damage(raw)
    index.write_bytes(bytes(raw))
    reopened = DiskStore(tmp_path, capacity_bytes=1 << 20)
    assert list(tmp_path.glob("index.corrupt-*.sqlite"))
    assert S.judge_lookup(S._cache(reopened), seq) == "recompute"
    assert reopened.gc()["adopted"] > 0  # the verified files come back
    assert S.judge_lookup(S._cache(reopened), seq) == "cache"


def test_writers_killed_at_random_points_leave_nothing_wrong(tmp_path: Path) -> None:
    tally = S.killed_writers(2, tmp_path, writers=3, seed=2)
    _verdicts_pass(tally)
    assert tally["cache"] > 0


@pytest.mark.skipif(not MOUNT, reason=NO_MOUNT)
def test_disk_full_and_unwritable_fail_clearly_and_never_serve_a_wrong_state(
    tmp_path: Path,
) -> None:
    tally = S.disk_faults(1, tmp_path, seed=3)
    _verdicts_pass(tally)
    assert tally["error"] > 0  # the disk did fill: inserts failed with StoreUnavailableError
    assert tally["cache"] > 0


def test_redis_killed_slow_cut_and_flushed_during_load(own_redis) -> None:
    tally, figures = S.redis_chaos(200, own_redis, seed=4)
    _verdicts_pass(tally)
    assert tally["cache"] > 0
    assert figures["slowest_op_s"] < 5.0  # socket timeouts bound every call: nothing hangs


def test_a_damaged_redis_byte_counter_is_rebuilt_not_a_crash(redis_url: str) -> None:
    import redis

    from promptcache.store.redis import RedisStore

    store = RedisStore(redis_url, 1 << 20, namespace="counter")
    store.put("a", b"x" * 100)
    size = store.size()
    with redis.Redis.from_url(redis_url) as client:
        (counter,) = [k for k in client.keys("counter*") if k.endswith(b"bytes")]
        client.set(
            counter, b"52\xd69"
        )  # found by the corruption scenario: stats() raised ValueError
    assert store.stats()["bytes"] == -1 and store.size() == 0  # was: ValueError
    store.put("b", b"y" * 100)  # was: every write refused by the Lua script
    assert store.size() == 2 * size and store.get("a") == b"x" * 100
    store.close()


def test_a_writer_that_never_looks_up_stores_a_flushed_prefix_again(redis_url: str) -> None:
    """Redis FLUSHALL under a pre-warming writer: re-inserting a sequence writes every chunk the
    store lost, those it shares with its other sequences too (was: only the chunks it alone used,
    so no reader ever found the shared prefix again)."""
    import redis

    from promptcache.store.redis import RedisStore

    writer = S._cache(RedisStore(redis_url, 1 << 20, namespace="flush"))
    a = list(range(1, 41))
    b = a[:16] + [99] * 8  # shares two blocks with a
    for seq in (a, b):
        writer.insert(seq, S.synthetic_state(seq), S.FP)
    with redis.Redis.from_url(redis_url) as client:
        client.flushall()
    writer.insert(a, S.synthetic_state(a), S.FP)
    reader = S._cache(RedisStore(redis_url, 1 << 20, namespace="flush"))
    assert S.judge_lookup(reader, a) == "cache"
    hit = reader.lookup(a, S.FP)
    assert hit is not None and hit.tokens_reused == len(a)
