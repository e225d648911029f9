"""The disk tier's entry files: one checksummed envelope file per key, written to tmp/ then renamed in.

Owns file names, writing, reading (read whole, payload apart, or mapped) and checking files where
they lie; never touches the index (store.disk_index) and never decides which file is served (DiskStore).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from promptcache.errors import CapacityError, CorruptEntryError, ModelMismatchError
from promptcache.store import envelope
from promptcache.store.compression import Compressor, decompress

log = logging.getLogger(__name__)

# Keys become file names: a closed alphabet rules out path traversal ("/", "..") and case clashes.
KEY = re.compile(r"[0-9a-z_:-]{1,200}")

TMP_GRACE = 300.0
"""Seconds a temp file may sit unmodified before open/gc takes it for a dead writer's and removes it."""

_SMALL_ENTRY = 64 << 10
"""Entries up to this size are read whole in one call; larger ones payload apart (no copy of it)."""

MAP_ENTRY = 1 << 20
"""A mapped read maps entries from this size on instead of reading them (DiskStore.get_view)."""

_FRONT_GUESS = 1024
"""Bytes read for an entry's header, fingerprint and key; read again in full if they are longer."""

# A mapping needs no descriptor once made, but Python's mmap keeps a duplicate of it unless told
# not to (3.13+): a RAM tier holding hundreds of promoted views would hold as many descriptors.
_UNTRACKED: dict[str, bool] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


class UnusableEntry(Exception):
    """An entry file that is there but cannot be served (corrupt, truncated, foreign); `seen` is
    the stat of the file that was read, so that only that file is removed."""

    def __init__(self, seen: os.stat_result, cause: CorruptEntryError | ModelMismatchError):
        super().__init__(str(cause))
        self.seen = seen


def unlink(path: str | os.PathLike[str]) -> bool:
    """Remove a file; False if it was not there."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are of one file version (device, inode, size, mtime)."""
    return _identity(a) == _identity(b)


class EntryFiles:
    """`entries/<key[:2]>/<key>` under `root`, each holding envelope.pack(key, value, fingerprint),
    and `tmp/`, where writes sit until renamed into place. fsync: whether a written file is synced."""

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.entries_dir = root / "entries"
        self.tmp_dir = root / "tmp"
        self.fsync = fsync
        self._entries_str = str(self.entries_dir)

    def make_dirs(self) -> None:
        """Create entries/ and tmp/ if needed. Raises OSError."""
        self.entries_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)

    @staticmethod
    def check_key(key: str) -> None:
        """Raise ValueError unless `key` can name a file: 1 to 200 characters of [0-9a-z_:-]."""
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise ValueError(f"disk cache keys are 1 to 200 characters of [0-9a-z_:-], got {key!r}")

    def path(self, key: str) -> str:
        # Not pathlib: this runs once per block read, and pathlib costs 30 us a call.
        return os.path.join(self._entries_str, key[:2], key)

    def exists(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def stat(self, key: str) -> os.stat_result | None:
        """The stat of key's file, None if there is none."""
        try:
            return os.stat(self.path(key))
        except FileNotFoundError:
            return None

    # -- writing --------------------------------------------------------------------------------

    @staticmethod
    def pack(
        key: str, value: bytes | memoryview, fingerprint: str, compressor: Compressor, *, limit: int
    ) -> bytes:
        """The bytes of key's file: the value compressed (unless it does not shrink) in an envelope.

        Raises TypeError for a value that is not bytes-like and CapacityError when the value, or
        the entry it makes, is larger than `limit` (the store's capacity)."""
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"disk cache values are bytes, got {type(value).__name__}")
        if len(value) > limit:
            raise CapacityError(
                f"value of {len(value)} bytes exceeds the disk store's capacity of {limit}; "
                "raise capacity_bytes"
            )
        payload, flags = compressor.compress(value)
        blob = envelope.pack(key, payload, fingerprint, flags)
        if len(blob) > limit:
            raise CapacityError(
                f"entry of {len(blob)} bytes (value plus envelope) exceeds the disk store's "
                f"capacity of {limit}; raise capacity_bytes"
            )
        return blob

    def write_temp(self, blob: bytes, key: str) -> str:
        """Write blob to a fresh file in tmp/ (made ready to be placed as key's) and return its name;
        on any failure, leave no file behind. Raises OSError (ENOSPC when the disk is full)."""
        os.makedirs(os.path.dirname(self.path(key)), exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="put-", suffix=".tmp")
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
            unlink(name)
            raise
        return name

    def place(self, tmp: str, key: str) -> None:
        """Rename a written temp file over key's file (atomic: readers see the old or the new)."""
        os.replace(tmp, self.path(key))

    def remove(self, keys: list[str]) -> None:
        """Remove the files of `keys`; a file that cannot be removed is logged (gc finds it later)."""
        for key in keys:
            try:
                unlink(self.path(key))
            except OSError as exc:
                log.warning("cannot remove disk cache file %s: %s", self.path(key), exc)

    def remove_all(self) -> None:
        """Remove every entry file. Raises OSError."""
        for path in self._files():
            unlink(path)

    def remove_stale_temps(self) -> int:
        """Remove temp files older than TMP_GRACE (a dead writer's); returns how many."""
        cutoff = time.time() - TMP_GRACE  # file mtimes are wall-clock
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            try:
                if entry.stat().st_mtime < cutoff and unlink(entry.path):
                    removed += 1
            except OSError as exc:
                log.warning("cannot remove stale temp file %s: %s", entry.path, exc)
        return removed

    # -- reading --------------------------------------------------------------------------------

    def read(
        self, key: str, fingerprint: str | None, *, mapped: bool = False
    ) -> tuple[bytes | memoryview, os.stat_result]:
        """(the verified value in key's file, the stat of the file read). With `mapped`, an entry
        of MAP_ENTRY bytes or more is a read-only view of the mapped file, checked in place.

        Raises FileNotFoundError (no file), UnusableEntry (corrupt, truncated or foreign) and
        OSError (unreadable)."""
        fd = os.open(self.path(key), os.O_RDONLY)
        try:
            seen = os.fstat(fd)
            try:
                if mapped and seen.st_size >= MAP_ENTRY:
                    payload, flags = _map_entry(fd, seen.st_size, key, fingerprint)
                else:
                    payload, flags = _read_entry(fd, seen.st_size, key, fingerprint)
                # a view decompresses too
                return decompress(payload, flags), seen  # type: ignore[arg-type]
            except (CorruptEntryError, ModelMismatchError) as exc:
                raise UnusableEntry(seen, exc) from exc
        finally:
            os.close(fd)

    def _files(self) -> Iterator[str]:
        for shard in os.scandir(self.entries_dir):
            if shard.is_dir(follow_symlinks=False):
                for entry in os.scandir(shard.path):
                    yield entry.path

    def unlisted(self, listed: set[str]) -> dict[str, tuple[os.stat_result, int | None, str]]:
        """Files whose key is not in `listed`: path -> (stat, entry size or None when it does not
        verify, fingerprint). Reads each such file whole; one that cannot be read is skipped."""
        found: dict[str, tuple[os.stat_result, int | None, str]] = {}
        for path in self._files():
            name = os.path.basename(path)
            if name in listed:
                continue
            try:
                with open(path, "rb") as f:
                    seen = os.fstat(f.fileno())
                    blob = f.read()
            except OSError:
                continue
            try:
                shard = os.path.basename(os.path.dirname(path))
                if not KEY.fullmatch(name) or shard != name[:2]:
                    raise CorruptEntryError("not a cache file name")
                _value, _flags, fp = envelope.unpack(blob, key=name)
                found[path] = (seen, len(blob), fp)
            except (CorruptEntryError, ModelMismatchError):
                found[path] = (seen, None, "")
        return found


def _read_entry(fd: int, file_size: int, key: str, fingerprint: str | None) -> tuple[bytes, int]:
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


__all__ = ["EntryFiles", "UnusableEntry", "KEY", "MAP_ENTRY", "TMP_GRACE", "same_file", "unlink"]
