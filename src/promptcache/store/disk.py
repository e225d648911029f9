"""Disk tier: persistent, process-safe byte store; one checksummed envelope file per entry, a sqlite index.

Owns the files and index under its directory; never unpickles, never parses states, never serves an unverified file.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from promptcache.errors import (
    CapacityError,
    CorruptEntryError,
    ModelMismatchError,
    StoreUnavailableError,
)
from promptcache.files import user_cache_dir
from promptcache.store import envelope
from promptcache.store import sqlite as sqlite_index
from promptcache.store.base import BaseStore
from promptcache.store.compression import Compressor, decompress, get_compressor
from promptcache.store.counters import base_stats
from promptcache.store.policies import get_policy

log = logging.getLogger(__name__)

# Keys become file names: a closed alphabet rules out path traversal ("/", "..") and case clashes.
_KEY = re.compile(r"[0-9a-z_:-]{1,200}")

TMP_GRACE = 300.0
"""Seconds a temp file may sit unmodified before open/gc takes it for a dead writer's and removes it."""

_SMALL_ENTRY = 64 << 10
"""Entries up to this size are read whole in one call; larger ones payload apart (no copy of it)."""

_MAP_ENTRY = 1 << 20
"""get_view maps entries from this size on instead of reading them (see get_view)."""

# A mapping needs no descriptor once made, but Python's mmap keeps a duplicate of it unless told
# not to (3.13+): a RAM tier holding hundreds of promoted views would hold as many descriptors.
_UNTRACKED: dict[str, bool] = {"trackfd": False} if sys.version_info >= (3, 13) else {}

_FRONT_GUESS = 1024
"""Bytes read for an entry's header, fingerprint and key; read again in full if they are longer."""

BUSY_TIMEOUT = 30.0
"""Seconds a process waits for another one's index transaction before giving up."""


def default_path() -> Path:
    """Where a DiskStore lives unless told: the user cache dir / "kv" (~/.cache/promptcache/kv on Linux)."""
    return user_cache_dir("kv")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    ctime REAL NOT NULL,
    atime REAL NOT NULL,
    fingerprint TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS entries_atime ON entries (atime);
CREATE INDEX IF NOT EXISTS entries_ctime ON entries (ctime);
CREATE INDEX IF NOT EXISTS entries_size ON entries (size);
"""

_SQLITE_FULL = 13


class _Connection(sqlite3.Connection):
    """A connection close() can reach from any thread, held weakly so that a finished thread's is freed."""

    owner_pid: int


def _unlink(path: str | os.PathLike[str]) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return _identity(a) == _identity(b)


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL


class DiskStore(BaseStore):
    """Entries as files under `path`, indexed by sqlite; `capacity_bytes` holds across every process.

    path: the cache directory (default: default_path(), the user cache dir / "kv").
    Layout: `entries/<key[:2]>/<key>` hold `envelope.pack(key, value, fingerprint)`, `index.sqlite`
    (WAL) holds one row per entry (key, size, ctime, atime, fingerprint), `tmp/` holds writes in flight.
    Sizes count the entry files' bytes (value plus an envelope of about 40 bytes plus key and fingerprint).

    policy: "lru" (default), "fifo", "ttl" or "size" (largest first); max_age (seconds) expires entries
    under any policy and is required by "ttl". Processes sharing a directory should agree on capacity
    and policy: each put enforces the capacity and order of the instance that makes it.

    compression: "none" (default), "zstd", "lz4" or a store.compression.Compressor, applied to values
    on put (a value that does not shrink is stored raw); entries are read by the flags they carry,
    so processes with different compression settings share one directory.

    Choices (measured on this project's machines):
    - fsync is off by default: a 4 KB put costs 0.04 ms without it and 0.35 ms with it. Correctness does
      not depend on it: a file torn by a power cut fails its checksum and is a logged miss. Pass
      `fsync=True` to make entries survive power loss, not only process crashes.
    - A read rewrites atime only when the stored one is `atime_resolution` (1 s) old or more, so hot
      reads do not queue behind writers for the index's write lock; LRU order is exact to that resolution.
    - Files are placed (os.replace) and removed only inside an index write transaction
      (BEGIN IMMEDIATE), so under that lock a file without a row is a crashed writer's leftover.
    - Local filesystems only: sqlite's WAL mode needs shared memory, which network filesystems lack.

    eviction_threshold (0 < t <= 1): when a put would take the total past capacity_bytes, entries are
    evicted until the total with the new one is at most t x capacity_bytes (1.0, the default, evicts
    only what the put needs), so that the next puts need no eviction.

    use_mmap: accepted for LlamaHome configs and reported in stats(). It changes nothing in how get()
    reads: one pread straight into the value returned, checked where it lies. get_view() is the
    mapped read (large entries, no copy): PromptCache uses it for the whole states and merged
    prefixes a fresh process loads, where a copy into new memory costs more than the rest of the
    hit (measured: 20 ms of page faults for 30 MB against 3 ms to map and check it in place).

    Counters in stats() (hits, misses, puts, mapped_reads, ...) are this instance's; entries and
    bytes are the index's.
    """

    name = "disk"
    latency_rank = 1
    atime_resolution = 1.0

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        capacity_bytes: int = 10 << 30,
        *,
        policy: str = "lru",
        max_age: float | None = None,
        fsync: bool = False,
        clock: Callable[[], float] = time.time,
        compression: str | Compressor | None = None,
        eviction_threshold: float = 1.0,
        use_mmap: bool = False,
    ) -> None:
        """Open (creating if needed) the cache at `path` and remove stale temp files.

        Raises ValueError for a bad capacity, policy, max_age or compression, and StoreUnavailableError when the
        directory or its index cannot be created or opened.
        """
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be a positive int")
        if not 0 < eviction_threshold <= 1:
            raise ValueError(f"eviction_threshold must be in (0, 1], got {eviction_threshold!r}")
        self.policy = get_policy(policy, max_age)
        self.path = Path(path) if path is not None else default_path()
        self.eviction_threshold = eviction_threshold
        self.use_mmap = use_mmap
        self.capacity_bytes = capacity_bytes
        self.max_age = max_age
        self.fsync = fsync
        self.compressor = get_compressor(compression)
        self._clock = clock
        self._entries_dir = self.path / "entries"
        self._entries_str = str(self._entries_dir)
        self._tmp_dir = self.path / "tmp"
        self._index_path = self.path / "index.sqlite"
        self._local = threading.local()
        self._generation = 0
        self._conns: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._conns_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.hits = self.misses = self.puts = self.evictions = self.expirations = self.corrupt = 0
        self.mapped_reads = 0
        try:
            self._open()
        except StoreUnavailableError as exc:
            cause = exc.__cause__
            if not isinstance(cause, sqlite3.DatabaseError) or isinstance(
                cause, sqlite3.OperationalError
            ):
                raise
            self._set_index_aside(cause)  # damaged (not busy or unreadable): start a new one
            self._open()

    def _open(self) -> None:
        with self._unavailable("open"):
            self._entries_dir.mkdir(parents=True, exist_ok=True)
            self._tmp_dir.mkdir(exist_ok=True)
            conn = self._conn()
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning(
                    "disk cache index %s runs in %s mode, not WAL: readers will wait for writers",
                    self._index_path,
                    mode,
                )
            conn.executescript(_SCHEMA)
            self._remove_stale_temps()

    def _set_index_aside(self, exc: sqlite3.DatabaseError) -> None:
        # A damaged index (flipped bytes, a torn copy) would refuse every process forever. Its rows
        # only say which files are complete; without them no file is served (files without a row
        # are a crashed writer's), so a new empty index is safe and gc() reclaims the old files.
        self.close()
        aside = self._index_path.with_name(f"index.corrupt-{time.time_ns()}.sqlite")
        log.warning(
            "disk cache index %s is damaged (%s); moved it to %s", self._index_path, exc, aside
        )
        with self._unavailable("set aside the damaged index of"):
            os.replace(self._index_path, aside)
            for suffix in ("-wal", "-shm"):
                _unlink(str(self._index_path) + suffix)

    @property
    def persistent(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"DiskStore({str(self.path)!r}, capacity_bytes={self.capacity_bytes}, policy={self.policy.name!r})"

    # -- plumbing -------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection: sqlite connections are not shared across threads or forks."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or conn.owner_pid != os.getpid() or local.generation != self._generation:
            conn = sqlite_index.connect(
                self._index_path,
                BUSY_TIMEOUT,
                check_same_thread=False,  # one thread uses it; close() may run in another
                factory=_Connection,
            )
            conn.owner_pid = os.getpid()
            local.conn, local.generation = conn, self._generation
            with self._conns_lock:
                self._conns.add(conn)
        return conn

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """One index write transaction: the cross-process lock under which files are placed or removed."""
        with sqlite_index.write_transaction(self._conn()) as conn:
            yield conn

    def _unavailable(self, action: str) -> AbstractContextManager[None]:
        def detail(exc: BaseException) -> str | None:
            if not _disk_full(exc):
                return None
            return (
                f"the disk is full ({exc}); "
                f"free space or lower capacity_bytes (now {self.capacity_bytes})"
            )

        return sqlite_index.unavailable(action, f"the disk cache at {self.path}", detail)

    def _bump(self, counter: str, n: int = 1) -> None:
        with self._stats_lock:
            setattr(self, counter, getattr(self, counter) + n)

    def _file(self, key: str) -> Path:
        return self._entries_dir / key[:2] / key

    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"disk cache keys are 1 to 200 characters of [0-9a-z_:-], got {key!r}")

    def _expired(self, ctime: float, now: float) -> bool:
        return self.max_age is not None and now - ctime > self.max_age

    def _remove(self, conn: sqlite3.Connection, keys: list[str]) -> None:
        """Delete rows and files of `keys`; call inside _locked."""
        conn.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in keys])
        for key in keys:
            try:
                _unlink(self._file(key))
            except OSError as exc:  # the row is gone; gc removes the file as an orphan later
                log.warning("cannot remove disk cache file %s: %s", self._file(key), exc)

    def _make_room(self, conn: sqlite3.Connection, size: int, keep: str) -> int:
        """Evict by policy until `size` more bytes fit with `keep`'s old entry gone; inside _locked."""
        total, old = conn.execute(
            "SELECT COALESCE(SUM(size), 0), COALESCE(SUM(CASE WHEN key = ? THEN size END), 0) FROM entries",
            (keep,),
        ).fetchone()
        excess = total - old + size - self.capacity_bytes
        if excess > 0:  # over capacity: evict down to the threshold, not only to capacity
            excess = total - old + size - int(self.eviction_threshold * self.capacity_bytes)
        victims: list[str] = []
        if excess > 0:
            cur = conn.execute(
                f"SELECT key, size FROM entries WHERE key != ? ORDER BY {self.policy.disk_order}",
                (keep,),
            )
            while excess > 0:
                batch = cur.fetchmany(64)
                if not batch:
                    break
                for key, vsize in batch:
                    victims.append(key)
                    excess -= vsize
                    if excess <= 0:
                        break
            cur.close()
            self._remove(conn, victims)
        return len(victims)

    def _discard(
        self, key: str, seen: os.stat_result | None, why: str, *, size_mismatch: bool = False
    ) -> bool:
        """Remove the entry whose file we read (stat `seen`) unless a writer replaced it since; True if removed.

        With `seen` None the file was missing: drop the row if it is still missing. With `size_mismatch`,
        remove only if the index still counts another size than the file holds.
        """
        path = self._file(key)
        try:
            with self._locked() as conn:
                try:
                    now_st: os.stat_result | None = os.stat(path)
                except FileNotFoundError:
                    now_st = None
                if now_st is None:  # under the lock, a row without a file is stale
                    return conn.execute("DELETE FROM entries WHERE key = ?", (key,)).rowcount > 0
                if seen is None or not _same_file(seen, now_st):
                    return False  # a writer placed a new file meanwhile
                if size_mismatch:
                    row = conn.execute("SELECT size FROM entries WHERE key = ?", (key,)).fetchone()
                    if row is not None and row[0] == now_st.st_size:
                        return False
                self._remove(conn, [key])
                return True
        except (OSError, sqlite3.Error) as exc:
            log.warning("cannot remove disk cache entry %s (%s): %s", key, why, exc)
            return False

    def _write_temp(self, blob: bytes) -> str:
        """Write blob to a fresh file in tmp/ and return its name; on any failure, leave no file behind."""
        fd, name = tempfile.mkstemp(dir=self._tmp_dir, prefix="put-", suffix=".tmp")
        try:
            try:
                view = memoryview(blob)
                while view:
                    n = os.write(fd, view)
                    if n <= 0:
                        raise OSError(errno.EIO, "write wrote nothing")
                    view = view[n:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _unlink(name)
            raise
        return name

    def _remove_stale_temps(self) -> int:
        cutoff = time.time() - TMP_GRACE  # file mtimes are wall-clock, whatever self._clock is
        removed = 0
        for entry in os.scandir(self._tmp_dir):
            try:
                if entry.stat().st_mtime < cutoff and _unlink(entry.path):
                    removed += 1
            except OSError as exc:
                log.warning("cannot remove stale temp file %s: %s", entry.path, exc)
        return removed

    # -- the Store protocol ---------------------------------------------------------------------

    def get(self, key: str, *, fingerprint: str | None = None) -> bytes | None:
        """The value, or None on a miss.

        A corrupt, truncated or foreign entry (another key's file, or another fingerprint when
        `fingerprint` is given) is a miss that is logged, counted in stats()["corrupt"] and removed.
        Read and index errors are misses too. Raises ValueError only for a malformed key.
        """
        self._check_key(key)
        now = self._clock()
        value = self._read(key, fingerprint, now)
        self._bump("misses" if value is None else "hits")
        return value

    def get_view(self, key: str, *, fingerprint: str | None = None) -> bytes | memoryview | None:
        """get(), but an uncompressed value of 1 MiB or more comes back as a read-only view of the
        mapped entry file instead of a copy; same checks, same misses, same errors.

        Why: a fresh process's copy of a 30 MB merged state into new memory costs 20 ms of page
        faults here, while mapping the file (its pages are in the page cache) and hashing it in
        place costs 3 ms (issue 15). Safe because entry files are never written in place: every put
        writes a new file and renames it over the old one, so the mapped file is the one verified
        for as long as the view lives, even after another process replaces or removes it. (A file
        truncated in place by something else than promptcache would fault the reader: don't.)
        """
        self._check_key(key)
        value = self._read(key, fingerprint, self._clock(), mapped=True)
        self._bump("misses" if value is None else "hits")
        return value

    def _read(
        self, key: str, fingerprint: str | None, now: float, *, mapped: bool = False
    ) -> bytes | memoryview | None:
        try:
            conn = self._conn()
            row = conn.execute(
                "SELECT size, ctime, atime FROM entries WHERE key = ?", (key,)
            ).fetchone()
        except sqlite3.Error as exc:
            log.warning(
                "disk cache index %s unreadable, treating %s as a miss: %s",
                self._index_path,
                key,
                exc,
            )
            return None
        if row is None:
            return None  # a file without a row is a crashed writer's: never served, gc() adopts it
        size, ctime, atime = row
        if self._expired(ctime, now):
            self._expire_one(key, ctime)
            return None
        value = self._read_file(key, size, fingerprint, mapped)
        if (
            value is not None
            and self.policy.refresh_on_read
            and now - atime >= self.atime_resolution
        ):
            try:
                conn.execute(
                    "UPDATE entries SET atime = ? WHERE key = ? AND atime < ?", (now, key, now)
                )
            except sqlite3.Error as exc:  # only a recency hint: a busy index must not fail a hit
                log.debug("could not refresh atime of %s: %s", key, exc)
        return value

    def _read_file(
        self, key: str, size: int, fingerprint: str | None, mapped: bool = False
    ) -> bytes | memoryview | None:
        """The verified value in key's file, which the index says holds `size` bytes; None (and
        the entry removed, unless a writer replaced it meanwhile) when it is missing or unusable."""
        # Not self._file (pathlib): this runs once per block read, and pathlib costs 30 us a call.
        path = os.path.join(self._entries_str, key[:2], key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            log.info("disk cache file %s is gone; dropping its index row", path)
            self._discard(key, None, "file missing")
            return None
        except OSError as exc:
            log.warning("cannot read disk cache file %s, treating it as a miss: %s", path, exc)
            return None
        try:
            seen = os.fstat(fd)
            if mapped and seen.st_size >= _MAP_ENTRY:
                payload, flags = self._map_entry(fd, seen.st_size, key, fingerprint)
            else:
                payload, flags = self._read_entry(fd, seen.st_size, key, fingerprint)
            value = decompress(payload, flags)  # type: ignore[arg-type] - a view decompresses too
        except (CorruptEntryError, ModelMismatchError) as exc:
            log.warning("disk cache entry %s is unusable, removing it: %s", path, exc)
            self._bump("corrupt")
            self._discard(key, seen, str(exc))
            return None
        except OSError as exc:
            log.warning("cannot read disk cache file %s, treating it as a miss: %s", path, exc)
            return None
        finally:
            os.close(fd)
        if seen.st_size != size and self._discard(key, seen, "size mismatch", size_mismatch=True):
            # A writer died between placing the file and committing its row: the file verifies but
            # the index counts other bytes. Dropped so that the index total stays true. (Otherwise
            # a writer replaced the entry while we read it, and the new value is served.) A crash
            # leftover, not damage: not counted in stats()["corrupt"].
            log.warning(
                "disk cache file %s held %d bytes, its index row said %d (a writer died placing "
                "it); removed it",
                path,
                seen.st_size,
                size,
            )
            return None
        if isinstance(value, memoryview):  # mapped (a compressed one decompressed into bytes)
            self._bump("mapped_reads")
        return value

    @staticmethod
    def _read_entry(
        fd: int, file_size: int, key: str, fingerprint: str | None
    ) -> tuple[bytes, int]:
        """(payload, flags) of the entry in an open file, checked as envelope.unpack checks it.

        A large payload is read on its own, straight into the bytes returned, and hashed where it
        lies: no copy of it is made to check or to cut it out of the entry (issue 15: a fresh
        process's hit read 164 entries with a copy each). Raises CorruptEntryError, ModelMismatchError.
        """
        if file_size <= _SMALL_ENTRY:
            blob = os.pread(fd, file_size, 0)
            payload, flags, _fp = envelope.unpack(blob, key=key, fingerprint=fingerprint)
            return payload, flags
        front = os.pread(fd, _FRONT_GUESS, 0)
        head = envelope.head(front)
        if head.total != file_size:
            raise CorruptEntryError(f"entry is {file_size} bytes, its header says {head.total}")
        if len(front) < head.payload_at:
            front = os.pread(fd, head.payload_at, 0)
        front = front[: head.payload_at]
        payload = os.pread(fd, head.n_payload, head.payload_at)
        digest = os.pread(fd, envelope.SUM_BYTES, head.payload_at + head.n_payload)
        envelope.verify(front, payload, digest, key, fingerprint)
        return payload, head.flags

    @staticmethod
    def _map_entry(
        fd: int, file_size: int, key: str, fingerprint: str | None
    ) -> tuple[memoryview, int]:
        """(payload, flags) of the entry in an open file as a read-only view of its mapping, checked
        where it lies as _read_entry checks it. Raises CorruptEntryError, ModelMismatchError."""
        try:
            mapping = mmap.mmap(fd, file_size, prot=mmap.PROT_READ, **_UNTRACKED)
        except (OSError, ValueError) as exc:
            raise CorruptEntryError(f"entry cannot be mapped: {exc}") from exc
        view = memoryview(mapping)
        head = envelope.head(view[: envelope.HEAD_BYTES])
        if head.total != file_size:
            raise CorruptEntryError(f"entry is {file_size} bytes, its header says {head.total}")
        end = head.payload_at + head.n_payload
        payload = view[head.payload_at : end]
        envelope.verify(view[: head.payload_at], payload, view[end:], key, fingerprint)
        return payload, head.flags

    def _expire_one(self, key: str, ctime: float) -> None:
        try:
            with self._locked() as conn:
                if conn.execute(
                    "SELECT 1 FROM entries WHERE key = ? AND ctime = ?", (key, ctime)
                ).fetchone():
                    self._remove(conn, [key])
                    self._bump("expirations")
        except (OSError, sqlite3.Error) as exc:
            log.warning("cannot remove expired disk cache entry %s: %s", key, exc)

    def put(self, key: str, value: bytes | memoryview, *, fingerprint: str = "") -> None:
        """Store value under key, evicting by policy so that the index total stays within capacity_bytes.

        Raises ValueError for a key outside [0-9a-z_:-]{1,200}, TypeError for a value that is not
        bytes-like, CapacityError when the entry is larger than the whole capacity, and
        StoreUnavailableError when the disk is full or the directory or index cannot be written
        (no temp file is left behind and the store stays usable).
        """
        self._check_key(key)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"disk cache values are bytes, got {type(value).__name__}")
        if len(value) > self.capacity_bytes:
            raise CapacityError(
                f"value of {len(value)} bytes exceeds the disk store's capacity of {self.capacity_bytes}; "
                "raise capacity_bytes"
            )
        payload, flags = self.compressor.compress(value)
        blob = envelope.pack(key, payload, fingerprint, flags)
        if len(blob) > self.capacity_bytes:
            raise CapacityError(
                f"entry of {len(blob)} bytes (value plus envelope) exceeds the disk store's capacity of "
                f"{self.capacity_bytes}; raise capacity_bytes"
            )
        target = self._file(key)
        tmp: str | None = None
        # Not files.atomic_write: the temp file lives in tmp/ (where open() and gc() find a dead
        # writer's leftovers), may be fsynced, and is renamed into place only after _make_room,
        # inside the same BEGIN IMMEDIATE transaction that commits its row (see the class docstring).
        with self._unavailable("write to"):
            try:
                target.parent.mkdir(exist_ok=True)
                tmp = self._write_temp(blob)
                conn = self._conn()
                conn.execute("BEGIN IMMEDIATE")
                placed = False
                try:
                    evicted = self._make_room(conn, len(blob), keep=key)
                    os.replace(tmp, target)
                    tmp, placed = None, True
                    now = self._clock()
                    conn.execute(
                        "INSERT INTO entries (key, size, ctime, atime, fingerprint) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET size = excluded.size, ctime = excluded.ctime, "
                        "atime = excluded.atime, fingerprint = excluded.fingerprint",
                        (key, len(blob), now, now, fingerprint),
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    if placed:  # still under the lock: no other writer's file can be here
                        _unlink(target)
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            finally:
                if tmp is not None:
                    _unlink(tmp)
        self._bump("puts")
        self._bump("evictions", evicted)

    def delete(self, key: str) -> bool:
        """Remove key; True if the index held it.

        Raises ValueError for a malformed key and StoreUnavailableError when the index cannot be written.
        """
        self._check_key(key)
        with self._unavailable("delete from"), self._locked() as conn:
            existed = (
                conn.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone() is not None
            )
            self._remove(conn, [key])
        return existed

    def contains(self, key: str) -> bool:
        """Whether the index holds an unexpired row for key and its file exists (no checksum check).

        Raises ValueError for a malformed key; an unreadable index answers False.
        """
        self._check_key(key)
        try:
            row = self._conn().execute("SELECT ctime FROM entries WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error:
            return False
        return (
            row is not None
            and not self._expired(row[0], self._clock())
            and os.path.exists(os.path.join(self._entries_str, key[:2], key))
        )

    def size(self) -> int:
        """Bytes of entry files the index holds now. Raises StoreUnavailableError if the index is unreadable."""
        with self._unavailable("read"):
            return self._conn().execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]

    def __len__(self) -> int:
        """Entries the index holds now. Raises StoreUnavailableError if the index is unreadable."""
        with self._unavailable("read"):
            return self._conn().execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def keys(self) -> Iterator[str]:
        """The keys the index holds now, oldest written first. Raises StoreUnavailableError if the index is unreadable."""
        with self._unavailable("read"):
            rows = self._conn().execute("SELECT key FROM entries ORDER BY ctime").fetchall()
        return iter([key for (key,) in rows])

    def clear(self) -> None:
        """Remove every entry (and every file under entries/), in all processes' view.

        Raises StoreUnavailableError when the index cannot be written.
        """
        with self._unavailable("clear"), self._locked() as conn:
            conn.execute("DELETE FROM entries")
            for shard in os.scandir(self._entries_dir):
                if shard.is_dir(follow_symlinks=False):
                    for entry in os.scandir(shard.path):
                        _unlink(entry.path)

    def stats(self) -> dict[str, int | float | str]:
        """MemoryStore's counters plus path and corrupt. Raises StoreUnavailableError if the index is unreadable."""
        with self._unavailable("read"):
            entries, nbytes = (
                self._conn()
                .execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries")
                .fetchone()
            )
        return {
            **base_stats(self, entries, nbytes),
            "path": str(self.path),
            "compression": self.compressor.name,
            "use_mmap": int(self.use_mmap),
        }

    def entries(self) -> list[dict[str, str | int | float]]:
        """Every entry's key, size (file bytes), fingerprint, ctime and atime (wall clock), most recently used first.

        Reads the index only (no file is opened). Raises StoreUnavailableError if the index is unreadable.
        """
        with self._unavailable("read"):
            query = "SELECT key, size, fingerprint, ctime, atime FROM entries ORDER BY atime DESC"
            rows = self._conn().execute(query).fetchall()
        return [
            {"key": k, "size": size, "fingerprint": fp, "ctime": ctime, "atime": atime}
            for k, size, fp, ctime, atime in rows
        ]

    # -- maintenance ----------------------------------------------------------------------------

    def expire(self) -> int:
        """Remove entries written more than max_age seconds ago; returns how many.

        Raises StoreUnavailableError when the index cannot be written.
        """
        if self.max_age is None:
            return 0
        cutoff = self._clock() - self.max_age
        with self._unavailable("expire entries of"), self._locked() as conn:
            old = [
                key for (key,) in conn.execute("SELECT key FROM entries WHERE ctime < ?", (cutoff,))
            ]
            self._remove(conn, old)
        self._bump("expirations", len(old))
        return len(old)

    def gc(self) -> dict[str, int]:
        """Expire, evict down to capacity_bytes, remove stale temp files and reconcile files with the index.

        A file without a row (a writer killed between placing it and committing) is adopted when its
        envelope verifies and it fits, removed otherwise; a row whose file is missing or has another
        size is dropped. Returns counts: expired, evicted, temp_files, adopted, orphans_removed,
        stale_rows. Raises StoreUnavailableError when the directory or index cannot be read or written.
        """
        counts = {"expired": self.expire()}
        with self._unavailable("collect garbage in"):
            with self._locked() as conn:
                counts["evicted"] = self._make_room(conn, 0, keep="")
            self._bump("evictions", counts["evicted"])
            counts["temp_files"] = self._remove_stale_temps()
            counts.update(self._reconcile())
        return counts

    def _reconcile(self) -> dict[str, int]:
        candidates = self._orphan_candidates()
        adopted = removed = stale = 0
        with self._locked() as conn:
            rows = dict(conn.execute("SELECT key, size FROM entries").fetchall())
            total = sum(rows.values())
            for path, (seen, size, fp) in candidates.items():
                name = os.path.basename(path)
                try:
                    if name in rows or not _same_file(seen, os.stat(path)):
                        continue  # committed or replaced since we looked
                except FileNotFoundError:
                    continue
                if size is not None and total + size <= self.capacity_bytes:
                    conn.execute(
                        "INSERT INTO entries (key, size, ctime, atime, fingerprint) VALUES (?, ?, ?, ?, ?)",
                        (name, size, seen.st_mtime, seen.st_mtime, fp),
                    )
                    total += size
                    adopted += 1
                else:
                    log.info("removing orphan disk cache file %s", path)
                    removed += _unlink(path)
            stale = self._drop_stale_rows(conn, rows)
        return {"adopted": adopted, "orphans_removed": removed, "stale_rows": stale}

    def _orphan_candidates(self) -> dict[str, tuple[os.stat_result, int | None, str]]:
        """Files without a row: path -> (stat, entry size or None when it does not verify, fingerprint).

        Read outside the lock (verifying may be slow); _reconcile re-checks each under it."""
        indexed = {key for (key,) in self._conn().execute("SELECT key FROM entries")}
        candidates: dict[str, tuple[os.stat_result, int | None, str]] = {}
        for shard in os.scandir(self._entries_dir):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(shard.path):
                if entry.name in indexed:
                    continue
                try:
                    with open(entry.path, "rb") as f:
                        seen = os.fstat(f.fileno())
                        blob = f.read()
                except OSError:
                    continue
                try:
                    if not _KEY.fullmatch(entry.name) or shard.name != entry.name[:2]:
                        raise CorruptEntryError("not a cache file name")
                    _value, _flags, fp = envelope.unpack(blob, key=entry.name)
                    candidates[entry.path] = (seen, len(blob), fp)
                except (CorruptEntryError, ModelMismatchError):
                    candidates[entry.path] = (seen, None, "")
        return candidates

    def _drop_stale_rows(self, conn: sqlite3.Connection, rows: dict[str, int]) -> int:
        """Remove rows whose file is missing or has another size; inside _locked. Returns how many."""
        stale = 0
        for key, size in rows.items():
            try:
                actual = os.stat(self._file(key)).st_size
            except FileNotFoundError:
                actual = None
            if actual != size:
                log.info(
                    "dropping disk cache entry %s: index says %d bytes, file has %s",
                    key,
                    size,
                    actual,
                )
                self._remove(conn, [key])
                stale += 1
        return stale

    def close(self) -> None:
        """Close this process's index connections; later calls reopen them. Never raises."""
        with self._conns_lock:
            # A connection inherited through fork belongs to the parent: leave it alone.
            mine = [conn for conn in self._conns if conn.owner_pid == os.getpid()]
            self._conns = weakref.WeakSet()
            self._generation += 1
        for conn in mine:
            try:
                conn.close()
            except sqlite3.Error as exc:
                log.debug("closing a disk cache index connection: %s", exc)

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
