"""Artefacts as whole directories on disk: placed atomically, indexed by sqlite, held within a byte capacity.

Owns the directories and index under its path and their eviction; never interprets an artefact's files
(the dataset, model and system caches do) and never serves a directory its index does not list whole.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptcache.errors import CapacityError
from promptcache.store.sqlite import Database

log = logging.getLogger(__name__)

# Keys and names become directory names: a closed alphabet rules out path traversal and case clashes.
_KEY = re.compile(r"[0-9a-z][0-9a-z_.:-]{0,199}")

BUSY_TIMEOUT = 60.0
"""Seconds a process waits for another one's index transaction (an eviction of large trees can take a while)."""

TMP_GRACE = 86400.0
"""Seconds after which a temp directory whose writer's pid still exists is taken for a dead writer's anyway."""

# Eviction order per policy, first victim first: one SQL query picks victims for every process.
_EVICTION_ORDER = {
    "lru": "atime, ctime",
    "fifo": "ctime, atime",
    "time": "ctime, atime",  # the seed's name; entries also expire after max_age
    "size": "size DESC, atime",
}
_ALIASES = {"ttl": "time"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artefacts (
    key TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    ctime REAL NOT NULL,
    atime REAL NOT NULL,
    manifest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY, key TEXT NOT NULL);
"""


@dataclass(frozen=True)
class ArtefactInfo:
    """One index row: what `entries()` lists."""

    key: str
    size: int
    ctime: float
    atime: float
    files: dict[str, int]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(root: Path) -> dict[str, int]:
    """Every regular file under root (relative path -> size); symlinks are refused (they could point anywhere)."""
    files: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            if full.is_symlink():
                raise ValueError(f"artefacts may not hold symlinks: {full}")
        for name in filenames:
            full = Path(dirpath) / name
            files[full.relative_to(root).as_posix()] = full.stat().st_size
    return files


class ArtefactStore:
    """Artefact directories under `path`; `capacity_bytes` holds across every process sharing it.

    Layout: `entries/<key>/` holds complete artefacts, `tmp/<pid>-<uuid>/` artefacts being written,
    `trash/` directories being removed, `index.sqlite` (WAL) one row per complete artefact (size, times,
    a manifest of its files and their sizes) and the names (aliases) users gave to keys.

    A writer fills a temp directory, fsyncs it, and renames it into `entries/` inside the index write
    transaction that adds its row, so a process killed at any point leaves either nothing served or a
    whole artefact. A directory without a row is never served (gc() removes it); a listed artefact
    whose files no longer match its manifest is a logged miss and is removed. Removal renames into
    `trash/` first, so readers never see a half-deleted tree; processes that already opened (or
    memory-mapped) files keep reading them until they close them. An index sqlite calls damaged is
    set aside for a new, empty one (store.sqlite.Database): nothing is served from the old
    directories, which gc() then removes as orphans.

    policy: "lru" (default), "fifo", "time" (alias "ttl": oldest written first; needs max_age) or
    "size" (largest first). max_age (seconds) expires artefacts under any policy.
    eviction_threshold: when a new artefact would take the total past capacity_bytes, artefacts are
    evicted until the total (with the new one) is at most eviction_threshold x capacity_bytes, so that
    the next few puts need no eviction.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity_bytes: int,
        *,
        policy: str = "lru",
        max_age: float | None = None,
        eviction_threshold: float = 0.9,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (creating if needed) the store at `path` and remove dead writers' temp directories.

        Raises ValueError for a bad capacity, policy, max_age or eviction_threshold, and
        StoreUnavailableError when the directory or its index cannot be created or opened.
        """
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        policy = _ALIASES.get(policy, policy)
        if policy not in _EVICTION_ORDER:
            raise ValueError(
                f"unknown policy {policy!r}; use one of {sorted(_EVICTION_ORDER)} (or 'ttl')"
            )
        if max_age is not None and max_age <= 0:
            raise ValueError("max_age must be positive seconds or None")
        if policy == "time" and max_age is None:
            raise ValueError("policy 'time' needs max_age (seconds)")
        if not 0 < eviction_threshold <= 1:
            raise ValueError(f"eviction_threshold must be in (0, 1], got {eviction_threshold!r}")
        self.path = Path(path)
        self.capacity_bytes = capacity_bytes
        self.policy = policy
        self.max_age = max_age
        self.eviction_threshold = eviction_threshold
        self.fsync = fsync
        self._clock = clock
        self._entries = self.path / "entries"
        self._tmp = self.path / "tmp"
        self._trash = self.path / "trash"
        self._db = Database(
            self.path / "index.sqlite",
            _SCHEMA,
            busy_timeout=BUSY_TIMEOUT,
            where=f"the artefact cache at {self.path}",
            full_hint=f"free space or lower capacity_bytes (now {capacity_bytes})",
        )
        self._stats_lock = threading.Lock()
        self.hits = self.misses = self.puts = self.evictions = self.expirations = self.corrupt = 0
        with self._db.unavailable("open"):
            for d in (self._entries, self._tmp, self._trash):
                d.mkdir(parents=True, exist_ok=True)
        self._db.open()
        self._remove_dead_temps()

    def __repr__(self) -> str:
        return f"ArtefactStore({str(self.path)!r}, capacity_bytes={self.capacity_bytes}, policy={self.policy!r})"

    # -- plumbing -------------------------------------------------------------------------------

    def _bump(self, counter: str, n: int = 1) -> None:
        with self._stats_lock:
            setattr(self, counter, getattr(self, counter) + n)

    @staticmethod
    def check_key(key: str) -> None:
        """Raise ValueError unless `key` is 1 to 200 characters of [0-9a-z_.:-] starting with a letter or digit."""
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(
                f"artefact keys and names are 1 to 200 characters of [0-9a-z_.:-], got {key!r}"
            )

    def _dir(self, key: str) -> Path:
        return self._entries / key

    def _discard_dir(self, path: Path) -> None:
        """Rename `path` into trash/ (atomic, so readers see all or nothing), then delete it."""
        target = self._trash / f"{os.getpid()}-{uuid.uuid4().hex}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot move artefact %s to the trash: %s", path, exc)
            return
        shutil.rmtree(target, ignore_errors=True)

    def _remove_rows(self, conn: sqlite3.Connection, keys: list[str]) -> None:
        """Delete rows, their names, and their directories; call inside _locked."""
        for key in keys:
            conn.execute("DELETE FROM artefacts WHERE key = ?", (key,))
            conn.execute("DELETE FROM names WHERE key = ?", (key,))
            self._discard_dir(self._dir(key))

    def _expired(self, ctime: float, now: float) -> bool:
        return self.max_age is not None and now - ctime > self.max_age

    def _make_room(self, conn: sqlite3.Connection, size: int) -> int:
        """Evict by policy so that `size` more bytes fit (down to the threshold); inside _locked."""
        (total,) = conn.execute("SELECT COALESCE(SUM(size), 0) FROM artefacts").fetchone()
        if total + size <= self.capacity_bytes:
            return 0
        excess = total + size - int(self.eviction_threshold * self.capacity_bytes)
        victims = []
        for key, vsize in conn.execute(
            f"SELECT key, size FROM artefacts ORDER BY {_EVICTION_ORDER[self.policy]}"
        ).fetchall():
            if excess <= 0:
                break
            victims.append(key)
            excess -= vsize
        self._remove_rows(conn, victims)
        return len(victims)

    def _remove_dead_temps(self) -> int:
        """Remove temp directories whose writer is gone (its pid is not alive, or it is older than TMP_GRACE)."""
        removed = 0
        cutoff = time.time() - TMP_GRACE
        for parent in (self._tmp, self._trash):
            for entry in os.scandir(parent):
                pid_text = entry.name.split("-", 1)[0]
                try:
                    dead = not pid_text.isdigit() or not _pid_alive(int(pid_text))
                    if not dead and entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                    removed += 1
                except OSError as exc:
                    log.warning("cannot remove stale temp %s: %s", entry.path, exc)
        return removed

    # -- writing --------------------------------------------------------------------------------

    @contextmanager
    def writing(self, key: str, *, replace: bool = False) -> Iterator[Path]:
        """A fresh temp directory to fill; on a normal exit it becomes artefact `key`, on an exception it is removed.

        With replace False (derived keys: same key, same content) an artefact already stored under `key`
        is kept and the new directory dropped. Raises ValueError for a malformed key, CapacityError when
        the artefact is larger than capacity_bytes (nothing is stored), StoreUnavailableError on I/O errors.
        """
        self.check_key(key)
        with self._db.unavailable("write to"):
            tmp = self._tmp / f"{os.getpid()}-{uuid.uuid4().hex}"
            tmp.mkdir()
        try:
            yield tmp
            self._place(key, tmp, replace=replace)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _place(self, key: str, tmp: Path, *, replace: bool) -> None:
        files = _manifest(tmp)
        size = sum(files.values())
        if size > self.capacity_bytes:
            raise CapacityError(
                f"artefact {key} takes {size} bytes, more than the cache's capacity_bytes "
                f"({self.capacity_bytes}); raise capacity_bytes"
            )
        with self._db.unavailable("store into"):
            if self.fsync:
                for rel in files:
                    _fsync_path(tmp / rel)
                for dirpath, _dirs, _files in os.walk(tmp):
                    _fsync_path(Path(dirpath), directory=True)
            now = self._clock()
            with self._db.locked() as conn:
                exists = conn.execute("SELECT 1 FROM artefacts WHERE key = ?", (key,)).fetchone()
                if exists and not replace:
                    return
                if exists:
                    self._remove_rows(conn, [key])
                evicted = self._make_room(conn, size)
                self._discard_dir(self._dir(key))  # a crashed writer's orphan under this key
                os.rename(tmp, self._dir(key))
                conn.execute(
                    "INSERT INTO artefacts (key, size, ctime, atime, manifest) VALUES (?, ?, ?, ?, ?)",
                    (key, size, now, now, json.dumps(files, sort_keys=True)),
                )
            if self.fsync:
                _fsync_path(self._entries, directory=True)
        self._bump("puts")
        if evicted:
            self._bump("evictions", evicted)

    def name(self, name: str, key: str) -> None:
        """Let `name` resolve to artefact `key` from now on. Raises ValueError for malformed ones, KeyError if `key` is not stored."""
        self.check_key(name)
        self.check_key(key)
        with self._db.unavailable("name an artefact in"), self._db.locked() as conn:
            if not conn.execute("SELECT 1 FROM artefacts WHERE key = ?", (key,)).fetchone():
                raise KeyError(f"no artefact {key} to name {name!r}")
            conn.execute("INSERT OR REPLACE INTO names (name, key) VALUES (?, ?)", (name, key))

    def resolve(self, name_or_key: str) -> str:
        """The key a name stands for, or the argument itself when it is no name."""
        row = (
            self._db.conn()
            .execute("SELECT key FROM names WHERE name = ?", (name_or_key,))
            .fetchone()
        )
        return row[0] if row else name_or_key

    # -- reading --------------------------------------------------------------------------------

    def get(self, key: str) -> Path | None:
        """The directory of artefact `key` (or of the key a name given to it stands for), or None on a miss.

        An expired artefact, or one whose files do not match its manifest, is a miss and is removed.
        Index errors are misses too. Raises ValueError only for a malformed key.
        """
        self.check_key(key)
        path = self._read(key)
        self._bump("misses" if path is None else "hits")
        return path

    def _read(self, key: str) -> Path | None:
        try:
            key = self.resolve(key)
            row = (
                self._db.conn()
                .execute("SELECT ctime, manifest FROM artefacts WHERE key = ?", (key,))
                .fetchone()
            )
        except sqlite3.Error as exc:
            log.warning(
                "artefact index under %s unreadable, treating %s as a miss: %s", self.path, key, exc
            )
            return None
        if row is None:
            return None
        ctime, manifest = row
        now = self._clock()
        if self._expired(ctime, now):
            self._drop(key, "expired")
            self._bump("expirations")
            return None
        path = self._dir(key)
        for rel, size in json.loads(manifest).items():
            try:
                ok = (path / rel).stat().st_size == size
            except OSError:
                ok = False
            if not ok:
                log.warning("artefact %s is damaged (%s missing or resized); removing it", key, rel)
                self._drop(key, "damaged")
                self._bump("corrupt")
                return None
        if self.policy in ("lru", "size"):
            try:
                with self._db.locked() as conn:
                    conn.execute("UPDATE artefacts SET atime = ? WHERE key = ?", (now, key))
            except sqlite3.Error as exc:
                log.debug("cannot refresh atime of %s: %s", key, exc)
        return path

    def _drop(self, key: str, why: str) -> None:
        try:
            with self._db.locked() as conn:
                self._remove_rows(conn, [key])
        except (OSError, sqlite3.Error) as exc:
            log.warning("cannot remove artefact %s (%s): %s", key, why, exc)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def entries(self) -> list[ArtefactInfo]:
        """Every complete artefact, oldest written first. Raises StoreUnavailableError."""
        with self._db.unavailable("list"):
            rows = (
                self._db.conn()
                .execute("SELECT key, size, ctime, atime, manifest FROM artefacts ORDER BY ctime")
                .fetchall()
            )
        return [ArtefactInfo(k, s, c, a, json.loads(m)) for k, s, c, a, m in rows]

    def stats(self) -> dict[str, Any]:
        """Counters of this instance (hits, misses, puts, evictions, expirations, corrupt) and the index's entries and bytes."""
        with self._db.unavailable("read stats of"):
            n, total = (
                self._db.conn()
                .execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM artefacts")
                .fetchone()
            )
        with self._stats_lock:
            counters = {
                c: getattr(self, c)
                for c in ("hits", "misses", "puts", "evictions", "expirations", "corrupt")
            }
        return {
            "entries": n,
            "bytes": total,
            "capacity_bytes": self.capacity_bytes,
            "policy": self.policy,
            **counters,
        }

    # -- removal --------------------------------------------------------------------------------

    def remove(self, key: str) -> bool:
        """Remove artefact `key` (or the one a name stands for); True if it was stored. Raises ValueError, StoreUnavailableError."""
        self.check_key(key)
        with self._db.unavailable("remove from"), self._db.locked() as conn:
            named = conn.execute("SELECT key FROM names WHERE name = ?", (key,)).fetchone()
            key = named[0] if named else key
            if not conn.execute("SELECT 1 FROM artefacts WHERE key = ?", (key,)).fetchone():
                return False
            self._remove_rows(conn, [key])
        return True

    def clear(self) -> int:
        """Remove every artefact and name; returns how many artefacts. Raises StoreUnavailableError."""
        with self._db.unavailable("clear"), self._db.locked() as conn:
            keys = [k for (k,) in conn.execute("SELECT key FROM artefacts").fetchall()]
            self._remove_rows(conn, keys)
            conn.execute("DELETE FROM names")
        return len(keys)

    def gc(self) -> dict[str, int]:
        """Expire by max_age, evict down to capacity, remove orphan directories and dead writers' temps.

        Returns counts {"expired", "evicted", "orphans", "temps"}. Raises StoreUnavailableError.
        """
        now = self._clock()
        with self._db.unavailable("clean"), self._db.locked() as conn:
            expired = []
            if self.max_age is not None:
                expired = [
                    k
                    for (k,) in conn.execute(
                        "SELECT key FROM artefacts WHERE ctime < ?", (now - self.max_age,)
                    ).fetchall()
                ]
                self._remove_rows(conn, expired)
            evicted = self._make_room(conn, 0)
            listed = {k for (k,) in conn.execute("SELECT key FROM artefacts").fetchall()}
            orphans = [e.path for e in os.scandir(self._entries) if e.name not in listed]
            for (
                orphan
            ) in orphans:  # under the lock: a directory without a row is a crashed writer's
                self._discard_dir(Path(orphan))
        temps = self._remove_dead_temps()
        self._bump("expirations", len(expired))
        self._bump("evictions", evicted)
        return {
            "expired": len(expired),
            "evicted": evicted,
            "orphans": len(orphans),
            "temps": temps,
        }

    def close(self) -> None:
        """Close this process's index connections; later calls reopen them. Never raises."""
        self._db.close()
