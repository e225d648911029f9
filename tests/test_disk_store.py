"""DiskStore: round trips, capacity under every policy, restarts, processes sharing one directory,
killed writers, and corrupt or foreign files, which are logged misses, never wrong answers (invariants 5 to 7).
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import closing
from hashlib import blake2b
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import promptcache.store.disk as disk_module
from promptcache.errors import CapacityError, StoreUnavailableError
from promptcache.store import DiskStore, Store, envelope

SRC = Path(disk_module.__file__).resolve().parents[2]
HEAD = 64  # key, NUL-padded
SUM = 16


def checked_value(key: str, body: bytes) -> bytes:
    """A value naming its key and carrying its own checksum, so that every read can be verified."""
    return key.encode().ljust(HEAD, b"\0") + blake2b(body, digest_size=SUM).digest() + body


def verifies(key: str, value: bytes) -> bool:
    body = value[HEAD + SUM :]
    return (
        value[:HEAD].rstrip(b"\0") == key.encode()
        and blake2b(body, digest_size=SUM).digest() == value[HEAD : HEAD + SUM]
    )


def body_for(key: str, n: int = 5000) -> bytes:
    """Deterministic bodies, so another process can write exactly what this one expects."""
    seed = blake2b(key.encode()).digest()
    return (seed * (n // len(seed) + 1))[:n]


def entry_file(store: DiskStore, key: str) -> Path:
    return store.path / "entries" / key[:2] / key


def files_on_disk(store: DiskStore) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (store.path / "entries").glob("*/*")}


def index_sql(store: DiskStore, sql: str) -> list[tuple]:
    """Run sql on the index behind the store's back (to inspect it, or to fake a crash's leftovers)."""
    with closing(sqlite3.connect(store.path / "index.sqlite")) as conn, conn:
        return conn.execute(sql).fetchall()


def index_rows(store: DiskStore) -> dict[str, tuple[int, float, float]]:
    rows = index_sql(store, "SELECT key, size, ctime, atime FROM entries")
    return {key: (size, ctime, atime) for key, size, ctime, atime in rows}


def temp_files(store: DiskStore) -> list[Path]:
    return list((store.path / "tmp").iterdir())


class FakeClock:
    """Wall-clock stand-in: tests move time instead of sleeping."""

    def __init__(self, now: float = 1_000_000.0, tick: float = 0.0) -> None:
        self.now, self.tick = now, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


# A worker process; it repeats checked_value/body_for so that it imports promptcache only.
WORKER = r"""
import json, random, sys
from hashlib import blake2b
from promptcache.store import DiskStore

def checked_value(key, body):
    return key.encode().ljust(64, b"\0") + blake2b(body, digest_size=16).digest() + body

def verifies(key, value):
    body = value[80:]
    return value[:64].rstrip(b"\0") == key.encode() and blake2b(body, digest_size=16).digest() == value[64:80]

def body_for(key, n=5000):
    seed = blake2b(key.encode()).digest()
    return (seed * (n // len(seed) + 1))[:n]

mode, path, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
args = sys.argv[4:]
if mode == "put":
    store = DiskStore(path, cap)
    for key in args:
        store.put(key, checked_value(key, body_for(key)), fingerprint="fp")
elif mode == "get":
    store = DiskStore(path, cap)
    found = {}
    for key in args:
        value = store.get(key, fingerprint="fp")
        found[key] = None if value is None else blake2b(value).hexdigest()
    print(json.dumps(found))
elif mode == "hammer":
    seed, ops = int(args[0]), int(args[1])
    rng = random.Random(seed)
    store = DiskStore(path, cap)
    keys = [f"h{i:02d}" for i in range(24)]
    hits = puts = 0
    for _ in range(ops):
        key = rng.choice(keys)
        if rng.random() < 0.5:
            store.put(key, checked_value(key, rng.randbytes(rng.randint(1, 40_000))))
            puts += 1
            if store.size() > cap:
                print("over capacity", store.size(), file=sys.stderr)
                sys.exit(4)
        else:
            value = store.get(key)
            if value is not None:
                if not verifies(key, value):
                    print("corrupt value served for", key, file=sys.stderr)
                    sys.exit(3)
                hits += 1
    print(json.dumps({"hits": hits, "puts": puts, "corrupt": store.stats()["corrupt"]}))
elif mode == "loop":
    # Values made up front, so that the loop spends its time inside put (most of it writing).
    rng = random.Random(int(args[0]))
    store = DiskStore(path, cap, fsync=True)
    keys = [f"s{i:02d}" for i in range(10)]
    values = {k: checked_value(k, rng.randbytes(4096) * rng.randint(256, 1280)) for k in keys}
    print("ready", flush=True)
    while True:
        key = rng.choice(keys)
        store.put(key, values[key])
"""


def worker_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(SRC) + (os.pathsep + path if path else "")}


def run_worker(*args: object, timeout: float = 60) -> str:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, *map(str, args)],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def start_worker(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, *map(str, args)],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- the basics -------------------------------------------------------------------------------


def test_round_trip_delete_contains_len_keys_clear(tmp_path):
    store = DiskStore(tmp_path, 1 << 20)
    assert isinstance(store, Store)
    assert store.get("a1") is None and not store.contains("a1") and len(store) == 0
    store.put("a1", b"one", fingerprint="fp")
    store.put("b2", bytearray(b"two"))
    store.put("c3", b"")
    assert store.get("a1") == b"one" and store.get("a1", fingerprint="fp") == b"one"
    assert store.get("b2") == b"two" and store.get("c3") == b""
    assert store.contains("a1") and len(store) == 3 and set(store.keys()) == {"a1", "b2", "c3"}
    assert store.size() == sum(files_on_disk(store).values())
    store.put("a1", b"uno")
    assert store.get("a1") == b"uno" and len(store) == 3
    assert store.delete("a1") is True and store.delete("a1") is False
    assert (
        store.get("a1") is None
        and not store.contains("a1")
        and not entry_file(store, "a1").exists()
    )
    store.clear()
    assert len(store) == 0 and store.size() == 0 and files_on_disk(store) == {}
    stats = store.stats()
    assert stats["hits"] == 5 and stats["misses"] == 2 and stats["puts"] == 4
    assert stats["path"] == str(tmp_path) and stats["corrupt"] == 0 and stats["tier"] == "disk"


def test_layout_is_entry_files_and_a_wal_sqlite_index(tmp_path):
    store = DiskStore(tmp_path, 1 << 20)
    store.put("ab12", b"value", fingerprint="fp")
    blob = entry_file(store, "ab12").read_bytes()
    assert envelope.unpack(blob, key="ab12", fingerprint="fp")[0] == b"value"
    assert index_sql(store, "PRAGMA journal_mode") == [("wal",)]
    assert index_sql(store, "SELECT key, size, fingerprint FROM entries") == [
        ("ab12", len(blob), "fp")
    ]


def test_default_path_is_the_user_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    store = DiskStore(capacity_bytes=1 << 20)
    assert store.path == tmp_path / "promptcache" / "kv"
    store.put("k", b"v")
    assert (tmp_path / "promptcache" / "kv" / "entries" / "k" / "k").exists()


@pytest.mark.parametrize("key", ["a/b", "..", "../etc", "", "A1", "a b", "é", "a\x00", "x" * 201])
def test_keys_outside_the_alphabet_are_rejected(tmp_path, key):
    store = DiskStore(tmp_path, 1 << 20)
    with pytest.raises(ValueError):
        store.put(key, b"v")
    with pytest.raises(ValueError):
        store.get(key)
    assert list(tmp_path.rglob("*etc*")) == [] and len(store) == 0


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        DiskStore(tmp_path, 0)
    with pytest.raises(ValueError):
        DiskStore(tmp_path, policy="random")
    with pytest.raises(ValueError):
        DiskStore(tmp_path, policy="ttl")
    with pytest.raises(TypeError):
        DiskStore(tmp_path, 1 << 20).put("k", "text")  # type: ignore[arg-type]


def test_value_larger_than_capacity_raises(tmp_path):
    store = DiskStore(tmp_path, 100)
    store.put("small", b"x" * 10)
    with pytest.raises(CapacityError):
        store.put("big", b"x" * 101)
    with pytest.raises(CapacityError):  # fits as a value, not with its envelope
        store.put("big", b"x" * 100)
    assert list(store.keys()) == ["small"] and temp_files(store) == []


# -- capacity and policies ----------------------------------------------------------------------

KEYS = [f"k{i}" for i in range(6)]
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(KEYS), st.integers(0, 1000)),
        st.tuples(st.just("get"), st.sampled_from(KEYS), st.just(0)),
        st.tuples(st.just("delete"), st.sampled_from(KEYS), st.just(0)),
    ),
    max_size=30,
)


@pytest.mark.parametrize("policy", ["lru", "fifo", "size"])
@settings(max_examples=25, deadline=None)
@given(ops=OPS)
def test_capacity_holds_and_eviction_matches_a_model(policy, ops):
    """After every operation: index total <= capacity, and the entries are those a reference model keeps."""
    capacity = 1000
    refresh = policy != "fifo"
    model: OrderedDict[str, bytes] = OrderedDict()  # least recently used (or written) first

    def entry_size(key: str, value: bytes) -> int:
        return len(envelope.pack(key, value))

    with tempfile.TemporaryDirectory() as path:
        store = DiskStore(path, capacity, policy=policy, clock=FakeClock(tick=1.0))
        store.atime_resolution = 0.0  # exact recency, so that the model is exact
        for step, (op, key, n) in enumerate(ops):
            if op == "put":
                value = bytes([step % 256]) * n
                size = entry_size(key, value)
                if size > capacity:
                    with pytest.raises(CapacityError):
                        store.put(key, value)
                    continue
                store.put(key, value)
                model.pop(key, None)
                while sum(entry_size(k, v) for k, v in model.items()) + size > capacity:
                    if policy == "size":
                        victim = max(model, key=lambda k: entry_size(k, model[k]))
                    else:
                        victim = next(iter(model))
                    del model[victim]
                model[key] = value
            elif op == "get":
                assert store.get(key) == model.get(key)
                if key in model and refresh:
                    model.move_to_end(key)
            else:
                assert store.delete(key) == (key in model)
                model.pop(key, None)
            total = sum(entry_size(k, v) for k, v in model.items())
            assert store.size() == total <= capacity
            assert set(store.keys()) == set(model)
            assert files_on_disk(store) == {k: entry_size(k, v) for k, v in model.items()}
        store.close()


def test_lru_evicts_the_least_recently_read(tmp_path):
    clock = FakeClock()
    store = DiskStore(tmp_path, 3 * len(envelope.pack("a", b"x" * 100)), clock=clock)
    for key in ("a", "b", "c"):
        clock.now += 2
        store.put(key, b"x" * 100)
    clock.now += 2
    assert store.get("a") is not None  # a is now more recent than b and c
    clock.now += 2
    store.put("d", b"x" * 100)
    assert set(store.keys()) == {"a", "c", "d"} and store.stats()["evictions"] == 1


def test_reads_within_atime_resolution_do_not_write_the_index(tmp_path):
    clock = FakeClock()
    store = DiskStore(tmp_path, 1 << 20, clock=clock)
    store.put("a", b"v")
    written = index_rows(store)["a"][2]
    clock.now += 0.5
    assert store.get("a") == b"v"
    assert index_rows(store)["a"][2] == written
    clock.now += 1.0
    assert store.get("a") == b"v"
    assert index_rows(store)["a"][2] == clock.now


def test_fifo_evicts_the_oldest_written_even_when_read(tmp_path):
    clock = FakeClock(tick=2.0)
    capacity = 3 * len(envelope.pack("a", b"x" * 100))
    store = DiskStore(tmp_path, capacity, policy="fifo", clock=clock)
    for key in ("a", "b", "c"):
        store.put(key, b"x" * 100)
    assert store.get("a") is not None
    store.put("d", b"x" * 100)
    assert set(store.keys()) == {"b", "c", "d"}


def test_size_policy_evicts_the_largest_first(tmp_path):
    store = DiskStore(tmp_path, 1000, policy="size", clock=FakeClock(tick=2.0))
    store.put("big", b"x" * 500)
    store.put("small", b"x" * 50)
    store.put("mid", b"x" * 200)
    store.put("new", b"x" * 300)
    assert set(store.keys()) == {"small", "mid", "new"}


def test_max_age_expires_entries(tmp_path):
    clock = FakeClock()
    store = DiskStore(tmp_path, 1 << 20, policy="ttl", max_age=10, clock=clock)
    store.put("old", b"1")
    clock.now += 6
    store.put("new", b"2")
    clock.now += 6
    assert store.expire() == 1
    assert list(store.keys()) == ["new"] and not entry_file(store, "old").exists()
    clock.now += 6
    assert not store.contains("new")
    assert store.get("new") is None and len(store) == 0  # expired on read, and removed
    assert store.stats()["expirations"] == 2


# -- persistence and processes ---------------------------------------------------------------


def test_entries_written_by_another_process_are_read_after_it_exits(tmp_path):
    keys = ["p0", "p1", "p2"]
    run_worker("put", tmp_path, 1 << 20, *keys)
    store = DiskStore(tmp_path, 1 << 20)
    for key in keys:
        assert store.get(key, fingerprint="fp") == checked_value(key, body_for(key))
    assert store.get("p0", fingerprint="other model") is None  # and is removed


def test_entries_written_here_are_read_by_a_new_process(tmp_path):
    with DiskStore(tmp_path, 1 << 20) as store:
        for key in ("q0", "q1"):
            store.put(key, checked_value(key, body_for(key)), fingerprint="fp")
    found = json.loads(run_worker("get", tmp_path, 1 << 20, "q0", "q1", "q9"))
    assert found == {
        "q0": blake2b(checked_value("q0", body_for("q0"))).hexdigest(),
        "q1": blake2b(checked_value("q1", body_for("q1"))).hexdigest(),
        "q9": None,
    }


def test_two_processes_hammering_one_directory_never_read_corrupt_values(tmp_path):
    capacity = 300_000
    DiskStore(tmp_path, capacity).close()
    workers = [start_worker("hammer", tmp_path, capacity, seed, 400) for seed in (1, 2)]
    store = DiskStore(tmp_path, capacity)
    samples = 0
    while any(w.poll() is None for w in workers):
        assert store.size() <= capacity
        for key in store.keys():
            value = store.get(key)
            assert value is None or verifies(key, value)
        samples += 1
    results = []
    for worker in workers:
        out, err = worker.communicate()
        assert worker.returncode == 0, err
        results.append(json.loads(out))
    assert samples > 0
    assert all(r["corrupt"] == 0 and r["hits"] > 0 for r in results), results
    assert store.stats()["corrupt"] == 0
    assert store.size() <= capacity
    assert store.size() == sum(files_on_disk(store).values())


def test_threads_sharing_one_store(tmp_path):
    capacity = 200_000
    store = DiskStore(tmp_path, capacity)
    failures: list[str] = []

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            key = f"t{rng.randrange(12)}"
            if rng.random() < 0.5:
                store.put(key, checked_value(key, rng.randbytes(rng.randint(1, 30_000))))
            else:
                value = store.get(key)
                if value is not None and not verifies(key, value):
                    failures.append(key)
            if store.size() > capacity:
                failures.append("over capacity")

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and store.stats()["corrupt"] == 0


def test_finished_threads_do_not_leak_index_connections(tmp_path):
    store = DiskStore(tmp_path, 1 << 20)
    store.put("k", b"v")
    open_fds = len(os.listdir("/proc/self/fd"))
    for _ in range(12):
        t = threading.Thread(target=store.get, args=("k",))
        t.start()
        t.join()
        # sqlite3 connections sit in a reference cycle with their statement cache; and sqlite
        # parks a closed connection's fd for reuse while another connection holds locks.
        gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= open_fds + 6  # 3 per open connection
    store.close()
    assert store.get("k") == b"v"  # close() then use reopens


def test_writers_killed_mid_put_leave_nothing_served_corrupt(tmp_path):
    """SIGKILL real writers at random moments until several kills landed inside a put's write."""
    capacity = 24 << 20
    store = DiskStore(tmp_path, capacity)
    rng = random.Random(7)
    mid_write = rounds = served = 0
    while mid_write < 3:
        assert rounds < 30, "no kill landed while a temp file was being written"
        temps_before = len(temp_files(store))
        writer = start_worker("loop", tmp_path, capacity, rounds)
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.02, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.communicate()
        assert writer.returncode == -signal.SIGKILL
        mid_write += len(temp_files(store)) > temps_before
        rounds += 1
        # Check now, before the next writer overwrites what this one left.
        for key in sorted(set(files_on_disk(store)) | set(store.keys())):
            value = store.get(key)
            assert value is None or verifies(key, value), key
            served += value is not None
        assert store.size() <= capacity and store.stats()["corrupt"] == 0
    assert served > 0
    # Temp files of killed writers are never under entries/; gc removes them once stale.
    for path in temp_files(store):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    store.gc()
    assert temp_files(store) == []
    assert files_on_disk(store) == {key: size for key, (size, _, _) in index_rows(store).items()}


# -- damaged files and crash leftovers --------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _flip_a_bit(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x04
    path.write_bytes(bytes(blob))


def _bad_magic(path: Path) -> None:
    path.write_bytes(b"JUNK" + path.read_bytes()[4:])


def _foreign(path: Path) -> None:
    path.write_bytes((path.parent.parent / "ot" / "other").read_bytes())


@pytest.mark.parametrize(
    "damage, fingerprint",
    [
        (_truncate, None),
        (_flip_a_bit, None),
        (_bad_magic, None),
        (_foreign, None),
        (None, "model-b"),
    ],
    ids=["truncated", "bit-flipped", "bad-magic", "foreign-key", "other-fingerprint"],
)
# 1,000 bytes: read whole; 200,000: payload read apart from the header, hashed where it lies.
@pytest.mark.parametrize("value_size", [1000, 200_000], ids=["small", "large"])
def test_damaged_or_foreign_entries_are_logged_removed_misses(
    tmp_path, caplog, damage, fingerprint, value_size
):  # noqa: E501
    store = DiskStore(tmp_path, 1 << 20)
    store.put("victim", b"v" * value_size, fingerprint="model-a")
    store.put("other", b"o" * value_size, fingerprint="model-a")
    if damage is not None:
        damage(entry_file(store, "victim"))
    with caplog.at_level(logging.WARNING, logger="promptcache.store.disk"):
        assert store.get("victim", fingerprint=fingerprint) is None
    assert any(r.levelno == logging.WARNING and "victim" in r.getMessage() for r in caplog.records)
    assert not entry_file(store, "victim").exists() and "victim" not in set(store.keys())
    assert store.stats()["corrupt"] == 1
    assert store.get("other") == b"o" * value_size
    store.put("victim", b"again", fingerprint="model-a")
    assert store.get("victim", fingerprint="model-a") == b"again"


def test_unreadable_file_is_a_miss_not_an_error(tmp_path):
    store = DiskStore(tmp_path, 1 << 20)
    store.put("k", b"v")
    path = entry_file(store, "k")
    path.unlink()
    path.mkdir()  # open() now fails with IsADirectoryError
    assert store.get("k") is None
    path.rmdir()
    store.put("k", b"w")
    assert store.get("k") == b"w"


def test_missing_file_drops_its_stale_row(tmp_path):
    store = DiskStore(tmp_path, 1 << 20)
    store.put("k", b"v")
    entry_file(store, "k").unlink()
    assert not store.contains("k")
    assert store.get("k") is None and len(store) == 0 and store.size() == 0


def test_gc_adopts_verified_orphans_and_removes_the_rest(tmp_path):
    store = DiskStore(tmp_path, 1 << 20)
    for key in ("a1", "b1", "c1"):
        store.put(key, key.encode() * 10)
    # Writers died between placing a file and committing its row: a1's new row, c1's updated one.
    index_sql(store, "DELETE FROM entries WHERE key = 'a1'")
    index_sql(store, "UPDATE entries SET size = size + 1 WHERE key = 'c1'")
    entry_file(store, "b1").unlink()  # someone deleted a file
    (tmp_path / "entries" / "zz").mkdir()
    (tmp_path / "entries" / "zz" / "zzz").write_bytes(b"garbage")
    assert store.get("a1") is None  # no row: not served before gc adopts it
    assert store.gc() == {
        "expired": 0,
        "evicted": 0,
        "temp_files": 0,
        "adopted": 1,
        "orphans_removed": 1,
        "stale_rows": 2,
    }
    assert store.get("a1") == b"a1" * 10 and set(store.keys()) == {"a1"}
    assert files_on_disk(store) == {"a1": store.size()}


def test_size_mismatch_between_file_and_row_is_a_logged_miss(tmp_path, caplog):
    store = DiskStore(tmp_path, 1 << 20)
    store.put("k", b"v" * 100)
    index_sql(store, "UPDATE entries SET size = 1 WHERE key = 'k'")
    with caplog.at_level(logging.WARNING, logger="promptcache.store.disk"):
        assert store.get("k") is None
    assert caplog.records and not entry_file(store, "k").exists() and len(store) == 0
    # a writer killed between placing its file and committing its row: a miss, not damage (the
    # killed-writers test below asserts no corrupt entry; it once caught a kill in that window)
    assert store.stats()["corrupt"] == 0


def test_stale_temp_files_are_removed_on_open(tmp_path):
    DiskStore(tmp_path, 1 << 20).close()
    stale, fresh = tmp_path / "tmp" / "put-stale.tmp", tmp_path / "tmp" / "put-fresh.tmp"
    stale.write_bytes(b"half a write")
    fresh.write_bytes(b"a write in flight")
    old = time.time() - 2 * disk_module.TMP_GRACE
    os.utime(stale, (old, old))
    DiskStore(tmp_path, 1 << 20)
    assert not stale.exists() and fresh.exists()


def test_full_disk_raises_store_unavailable_and_leaves_no_temp_file(tmp_path, monkeypatch):
    store = DiskStore(tmp_path, 1 << 30)
    store.put("kept", b"k" * 1000)
    real_write = os.write
    tmp_dir = str(tmp_path / "tmp")

    def write_until_full(fd: int, data: bytes) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(tmp_dir):
            return real_write(fd, data)
        if len(data) > 4096:
            return real_write(fd, memoryview(data)[:4096])  # the disk fills up part-way
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write_until_full)
    with pytest.raises(StoreUnavailableError, match="full"):
        store.put("big", b"b" * 100_000)
    assert temp_files(store) == [] and not entry_file(store, "big").exists()
    monkeypatch.setattr(os, "write", real_write)
    assert store.get("kept") == b"k" * 1000 and store.get("big") is None
    store.put("big", b"b" * 100_000)
    assert store.get("big") == b"b" * 100_000
