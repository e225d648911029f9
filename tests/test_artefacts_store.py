"""ArtefactStore: whole-directory artefacts, capacity under every policy (against a brute-force oracle), crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache.artefacts import ArtefactStore
from promptcache.errors import CapacityError

SRC = str(Path(__file__).resolve().parents[1] / "src")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def put(store: ArtefactStore, key: str, size: int, *, replace: bool = False) -> None:
    with store.writing(key, replace=replace) as tmp:
        (tmp / "blob").write_bytes(b"x" * size)


def test_round_trip_and_names(tmp_path: Path) -> None:
    store = ArtefactStore(tmp_path, 1 << 20)
    with store.writing("a1") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f.bin").write_bytes(b"abc")
        (tmp / "g.txt").write_text("hello")
    path = store.get("a1")
    assert path == tmp_path / "entries" / "a1"
    assert (path / "sub" / "f.bin").read_bytes() == b"abc"
    assert store.entries()[0].files == {"g.txt": 5, "sub/f.bin": 3}
    assert store.stats()["bytes"] == 8
    store.name("friendly", "a1")
    assert store.get("friendly") == path
    with pytest.raises(KeyError):
        store.name("other", "nothing")
    assert store.remove("friendly") and store.get("a1") is None and store.get("friendly") is None
    assert list((tmp_path / "tmp").iterdir()) == []


def test_same_key_keeps_the_first_unless_replace(tmp_path: Path) -> None:
    store = ArtefactStore(tmp_path, 1 << 20)
    put(store, "k", 10)
    put(store, "k", 20)
    assert store.stats()["bytes"] == 10
    put(store, "k", 20, replace=True)
    assert store.stats()["bytes"] == 20 and store.stats()["entries"] == 1


def test_failed_write_stores_nothing(tmp_path: Path) -> None:
    store = ArtefactStore(tmp_path, 1 << 20)
    with pytest.raises(RuntimeError), store.writing("k") as tmp:
        (tmp / "half").write_bytes(b"12")
        raise RuntimeError("preprocess failed")
    assert store.get("k") is None and list((tmp_path / "tmp").iterdir()) == []


def test_too_large_is_a_capacity_error(tmp_path: Path) -> None:
    store = ArtefactStore(tmp_path, 100)
    with pytest.raises(CapacityError):
        put(store, "big", 101)
    assert store.stats()["entries"] == 0 and list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("key", ["", "../x", "A", "a/b", "-lead", "x" * 201])
def test_malformed_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        ArtefactStore(tmp_path, 10).get(key)


def test_bad_settings(tmp_path: Path) -> None:
    for kwargs in (
        {"policy": "mru"},
        {"policy": "time"},
        {"eviction_threshold": 0},
        {"max_age": -1},
    ):
        with pytest.raises(ValueError):
            ArtefactStore(tmp_path, 10, **kwargs)
    assert ArtefactStore(tmp_path, 10, policy="ttl", max_age=5).policy == "time"


def test_max_age_expires_under_the_time_policy(tmp_path: Path) -> None:
    clock = Clock()
    store = ArtefactStore(tmp_path, 1 << 20, policy="time", max_age=60, clock=clock)
    put(store, "old", 5)
    clock.now += 30
    put(store, "new", 5)
    clock.now += 31
    assert store.get("old") is None and store.get("new") is not None
    put(store, "old2", 5)
    clock.now += 61
    assert store.gc()["expired"] == 2
    assert store.stats()["entries"] == 0 and store.stats()["expirations"] == 3


def test_damaged_artefact_is_a_miss_and_removed(tmp_path: Path) -> None:
    store = ArtefactStore(tmp_path, 1 << 20)
    put(store, "k", 50)
    with open(tmp_path / "entries" / "k" / "blob", "r+b") as f:
        f.truncate(20)
    assert store.get("k") is None
    assert store.stats()["corrupt"] == 1 and not (tmp_path / "entries" / "k").exists()


def test_directory_without_row_is_never_served(tmp_path: Path) -> None:
    """A writer killed between its rename and its commit leaves a directory the index does not list."""
    store = ArtefactStore(tmp_path, 1 << 20)
    orphan = tmp_path / "entries" / "orphan"
    orphan.mkdir()
    (orphan / "blob").write_bytes(b"whole but unlisted")
    assert store.get("orphan") is None
    assert store.gc()["orphans"] == 1 and not orphan.exists()


def test_killed_writer_leaves_nothing_served(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from promptcache.artefacts import ArtefactStore
        store = ArtefactStore({str(tmp_path / "cache")!r}, 1 << 30)
        with store.writing("victim") as tmp:
            with open(tmp / "blob", "wb") as f:
                f.write(b"x" * (1 << 20))
                f.flush()
                Path({str(marker)!r}).touch()
                time.sleep(60)
                f.write(b"never")
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": SRC})
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    store = ArtefactStore(
        tmp_path / "cache", 1 << 30
    )  # opening removes the dead writer's temp directory
    assert store.get("victim") is None
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    put(store, "victim", 3)
    assert store.get("victim") is not None


@dataclass
class Row:
    size: int
    ctime: float
    atime: float


_ORACLE_ORDER = {
    "lru": lambda kv: (kv[1].atime, kv[1].ctime),
    "fifo": lambda kv: (kv[1].ctime, kv[1].atime),
    "time": lambda kv: (kv[1].ctime, kv[1].atime),
    "size": lambda kv: (-kv[1].size, kv[1].atime),
}


@settings(max_examples=25, deadline=None)
@given(
    policy=st.sampled_from(sorted(_ORACLE_ORDER)),
    threshold=st.sampled_from([0.5, 0.8, 1.0]),
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "get"]), st.integers(0, 7), st.integers(1, 40)),
        max_size=30,
    ),
)
def test_capacity_and_eviction_order_match_an_oracle(
    tmp_path_factory: pytest.TempPathFactory,
    policy: str,
    threshold: float,
    ops: list[tuple[str, int, int]],
) -> None:
    capacity = 100
    clock = Clock()
    store = ArtefactStore(
        tmp_path_factory.mktemp("s"),
        capacity,
        policy=policy,
        max_age=1e9 if policy == "time" else None,
        eviction_threshold=threshold,
        fsync=False,
        clock=clock,
    )
    oracle: dict[str, Row] = {}
    for op, k, size in ops:
        clock.now += 1
        key = f"k{k}"
        if op == "put":
            put(store, key, size)
            if key not in oracle:
                total = sum(r.size for r in oracle.values())
                if total + size > capacity:
                    excess = total + size - int(threshold * capacity)
                    for victim, row in sorted(oracle.items(), key=_ORACLE_ORDER[policy]):
                        if excess <= 0:
                            break
                        del oracle[victim]
                        excess -= row.size
                oracle[key] = Row(size, clock.now, clock.now)
        else:
            assert (store.get(key) is not None) == (key in oracle)
            if key in oracle and policy in ("lru", "size"):
                oracle[key].atime = clock.now
        assert {e.key for e in store.entries()} == set(oracle)
        assert store.stats()["bytes"] == sum(r.size for r in oracle.values()) <= capacity
