"""Disk tier: persistent, process-safe byte store; one checksummed envelope file per entry, a sqlite index.

Composes the index (store.disk_index) and the entry files (store.disk_files) and decides under the
index's lock which file is served, evicted or reclaimed; never unpickles, never parses states.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from promptcache.files import user_cache_dir
from promptcache.store.base import BaseStore
from promptcache.store.compression import Compressor, get_compressor
from promptcache.store.counters import base_stats
from promptcache.store.disk_files import TMP_GRACE, EntryFiles, UnusableEntry, unlink
from promptcache.store.disk_index import BUSY_TIMEOUT, DiskIndex
from promptcache.store.disk_recovery import discard, reconcile
from promptcache.store.policies import get_policy

log = logging.getLogger(__name__)


def default_path() -> Path:
    """Where a DiskStore lives unless told: the user cache dir / "kv" (~/.cache/promptcache/kv on Linux)."""
    return user_cache_dir("kv")


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
    - get_view() maps an uncompressed entry of 1 MiB or more instead of reading it: a fresh
      process's copy of a 30 MB state into new memory costs 20 ms of page faults, mapping the file
      (its pages are in the page cache) and hashing it in place 3 ms (issue 15). Safe because entry
      files are never written in place (every put renames a new file over the old one), so the
      mapped file is the one verified for as long as the view lives, even after another process
      replaces or removes it. (A file truncated in place by another program would fault the reader.)

    eviction_threshold (0 < t <= 1): when a put would take the total past capacity_bytes, entries are
    evicted until the total with the new one is at most t x capacity_bytes (1.0, the default, evicts
    only what the put needs), so that the next puts need no eviction.

    use_mmap: accepted for LlamaHome configs and reported in stats(); it changes nothing: get() reads
    with one pread straight into the value, get_view() maps (see Choices).

    Parts: the index (store.disk_index), the entry files (store.disk_files), what crashed writers
    leave (store.disk_recovery). Counters in stats() (hits, misses, puts, mapped_reads, ...) are this
    instance's; entries and bytes are the index's.
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
        directory or its index cannot be created or opened (a damaged index is set aside for a new one).
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
        self.compressor = get_compressor(compression)
        self._clock = clock
        self._files = EntryFiles(self.path, fsync=fsync)
        self._index = DiskIndex(
            self.path / "index.sqlite",
            where=f"the disk cache at {self.path}",
            full_hint=f"free space or lower capacity_bytes (now {capacity_bytes})",
        )
        self._stats_lock = threading.Lock()
        self.hits = self.misses = self.puts = self.evictions = self.expirations = self.corrupt = 0
        self.mapped_reads = 0
        with self._index.unavailable("open"):
            self._files.make_dirs()
        self._index.open()
        with self._index.unavailable("open"):
            self._files.remove_stale_temps()

    @property
    def fsync(self) -> bool:
        """Whether each written entry file is synced to the device before it is placed."""
        return self._files.fsync

    @property
    def persistent(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"DiskStore({str(self.path)!r}, capacity_bytes={self.capacity_bytes}, policy={self.policy.name!r})"

    # -- plumbing -------------------------------------------------------------------------------

    def _bump(self, counter: str, n: int = 1) -> None:
        with self._stats_lock:
            setattr(self, counter, getattr(self, counter) + n)

    def _expired(self, ctime: float, now: float) -> bool:
        return self.max_age is not None and now - ctime > self.max_age

    def _remove(self, conn: sqlite3.Connection, keys: list[str]) -> int:
        """Delete rows and files of `keys` inside the index lock; returns how many rows there were."""
        n = self._index.delete(conn, keys)
        self._files.remove(keys)
        return n

    def _make_room(self, conn: sqlite3.Connection, size: int, keep: str) -> int:
        """Evict by policy until `size` more bytes fit with `keep`'s old entry gone; inside the lock."""
        target = int(self.eviction_threshold * self.capacity_bytes)
        victims = self._index.victims(
            conn, size, keep, self.capacity_bytes, target, self.policy.disk_order
        )
        self._remove(conn, victims)
        return len(victims)

    # -- the Store protocol ---------------------------------------------------------------------

    def get(self, key: str, *, fingerprint: str | None = None) -> bytes | None:
        """The value, or None on a miss.

        A corrupt, truncated or foreign entry (another key's file, or another fingerprint when
        `fingerprint` is given) is a miss that is logged, counted in stats()["corrupt"] and removed.
        Read and index errors are misses too. Raises ValueError only for a malformed key.
        """
        return self._get(key, fingerprint, mapped=False)  # type: ignore[return-value] - bytes

    def get_view(self, key: str, *, fingerprint: str | None = None) -> bytes | memoryview | None:
        """get(), but an uncompressed value of 1 MiB or more is a read-only view of the mapped entry
        file, checked in place (see Choices; counted in mapped_reads). Same misses, same errors."""
        return self._get(key, fingerprint, mapped=True)

    def _get(self, key: str, fingerprint: str | None, *, mapped: bool) -> bytes | memoryview | None:
        self._files.check_key(key)
        value = self._read(key, fingerprint, self._clock(), mapped=mapped)
        self._bump("misses" if value is None else "hits")
        return value

    def _read(
        self, key: str, fingerprint: str | None, now: float, *, mapped: bool
    ) -> bytes | memoryview | None:
        try:
            row = self._index.row(key)
        except sqlite3.Error as exc:
            log.warning(
                "disk cache index %s unreadable, treating %s as a miss: %s",
                self._index.path,
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
            self._index.touch(key, now)
        return value

    def _read_file(
        self, key: str, size: int, fingerprint: str | None, mapped: bool
    ) -> bytes | memoryview | None:
        """The verified value in key's file, which the index says holds `size` bytes; None (and
        the entry removed, unless a writer replaced it meanwhile) when it is missing or unusable."""
        path = self._files.path(key)
        try:
            value, seen = self._files.read(key, fingerprint, mapped=mapped)
        except FileNotFoundError:
            log.info("disk cache file %s is gone; dropping its index row", path)
            discard(self._index, self._files, key, None, "file missing")
            return None
        except UnusableEntry as exc:
            log.warning("disk cache entry %s is unusable, removing it: %s", path, exc)
            self._bump("corrupt")
            discard(self._index, self._files, key, exc.seen, str(exc))
            return None
        except OSError as exc:
            log.warning("cannot read disk cache file %s, treating it as a miss: %s", path, exc)
            return None
        if seen.st_size != size and discard(
            self._index, self._files, key, seen, "size mismatch", size_mismatch=True
        ):
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

    def _expire_one(self, key: str, ctime: float) -> None:
        try:
            with self._index.locked() as conn:
                if self._index.written_at(conn, key, ctime):
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
        self._files.check_key(key)
        blob = self._files.pack(key, value, fingerprint, self.compressor, limit=self.capacity_bytes)
        # Not files.atomic_write: the temp file lives in tmp/ (where open() and gc() find a dead
        # writer's leftovers), may be fsynced, and is renamed into place only after _make_room,
        # inside the same BEGIN IMMEDIATE transaction that commits its row (see the class docstring).
        with self._index.unavailable("write to"):
            tmp = self._files.write_temp(blob, key)
            try:
                evicted = self._commit(key, tmp, len(blob), fingerprint)
            except BaseException:
                unlink(tmp)  # a failed put leaves no temp file behind (a placed one is gone)
                raise
        self._bump("puts")
        self._bump("evictions", evicted)

    def _commit(self, key: str, tmp: str, size: int, fingerprint: str) -> int:
        """Place the written temp file as key's and record its row, in one index transaction;
        returns how many entries were evicted for it. If the row or the commit fails once the file
        is placed, the file is removed again while the lock is still held (no other writer's file
        can be there yet)."""
        placed = False

        def unplace() -> None:
            if placed:
                unlink(self._files.path(key))

        with self._index.locked(on_abort=unplace) as conn:
            evicted = self._make_room(conn, size, keep=key)
            self._files.place(tmp, key)
            placed = True
            self._index.record(conn, key, size, self._clock(), fingerprint)
        return evicted

    def delete(self, key: str) -> bool:
        """Remove key; True if the index held it.

        Raises ValueError for a malformed key and StoreUnavailableError when the index cannot be written.
        """
        self._files.check_key(key)
        with self._index.unavailable("delete from"), self._index.locked() as conn:
            return self._remove(conn, [key]) > 0

    def contains(self, key: str) -> bool:
        """Whether the index holds an unexpired row for key and its file exists (no checksum check).

        Raises ValueError for a malformed key; an unreadable index answers False.
        """
        self._files.check_key(key)
        try:
            ctime = self._index.ctime(key)
        except sqlite3.Error:
            return False
        return (
            ctime is not None
            and not self._expired(ctime, self._clock())
            and self._files.exists(key)
        )

    def size(self) -> int:
        """Bytes of entry files the index holds now. Raises StoreUnavailableError if the index is unreadable."""
        with self._index.unavailable("read"):
            return self._index.totals()[1]

    def __len__(self) -> int:
        """Entries the index holds now. Raises StoreUnavailableError if the index is unreadable."""
        with self._index.unavailable("read"):
            return self._index.totals()[0]

    def keys(self) -> Iterator[str]:
        """The keys the index holds now, oldest written first. Raises StoreUnavailableError if the index is unreadable."""
        with self._index.unavailable("read"):
            return iter(self._index.keys())

    def clear(self) -> None:
        """Remove every entry (and every file under entries/), in all processes' view.

        Raises StoreUnavailableError when the index cannot be written.
        """
        with self._index.unavailable("clear"), self._index.locked() as conn:
            self._index.delete_all(conn)
            self._files.remove_all()

    def stats(self) -> dict[str, int | float | str]:
        """MemoryStore's counters plus path. Raises StoreUnavailableError if the index is unreadable."""
        with self._index.unavailable("read"):
            entries, nbytes = self._index.totals()
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
        with self._index.unavailable("read"):
            rows = self._index.listing()
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
        with self._index.unavailable("expire entries of"), self._index.locked() as conn:
            old = self._index.written_before(conn, cutoff)
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
        with self._index.unavailable("collect garbage in"):
            with self._index.locked() as conn:
                counts["evicted"] = self._make_room(conn, 0, keep="")
            self._bump("evictions", counts["evicted"])
            counts["temp_files"] = self._files.remove_stale_temps()
            counts.update(reconcile(self._index, self._files, self.capacity_bytes))
        return counts

    def close(self) -> None:
        """Close this process's index connections; later calls reopen them. Never raises."""
        self._index.close()

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["DiskStore", "default_path", "TMP_GRACE", "BUSY_TIMEOUT"]
