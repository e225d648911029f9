"""LlamaDiskCache: the drop-in disk cache, a thin layer over a DiskStore shared by several processes.

Owns the entries' manifests (what lets a new process index the directory without reading states)
and noticing a directory a user's cleanup changed; never holds an index of files of its own
(DiskStore's sqlite index is the one), never pickles, never prints.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from promptcache.compat.caches import StoreCache
from promptcache.compat.entry import Entry, decode_manifest, entry_id_of
from promptcache.errors import CapacityError, CorruptEntryError, StoreUnavailableError
from promptcache.store.disk import DiskStore

log = logging.getLogger(__name__)

__all__ = ["LlamaDiskCache"]

_DISK_KEY = re.compile(r"([0-9a-f]{32})-([st])")


class LlamaDiskCache(StoreCache):
    """Persistent cache of llama.cpp states in `cache_dir`, shared safely by several processes.

    Entries live in a promptcache DiskStore (checksummed files under `entries/`, a sqlite index
    `index.sqlite`, LRU within capacity_bytes across processes). Reading an entry keeps it. A new
    LlamaDiskCache on the same directory, in a new process, serves earlier entries of the model
    calling it at once (compat/identity.py: it learns the model from the calling Llama). An entry is
    two DiskStore keys: `<id>-s` (the state) and `<id>-t` (its manifest: tokens, fingerprint and
    shape), so a new process indexes the directory from the small `-t` files alone.

    It heals from what a user's cleanup does to the directory, never raising into a completion: a
    deleted or replaced `index.sqlite` is noticed on the next call and the DiskStore reopened, which
    adopts the entry files whose checksums verify (DiskStore.gc; a damaged index DiskStore sets
    aside itself); a deleted, truncated or corrupt entry file is a logged miss. The
    directories it holds are touched when used, so a cleanup that removes top-level files older
    than some age (as llama-cpp-python's docs show) never meets a stale directory of a live cache.

    fingerprint: optional model identity that overrides the calling Llama's (see llama_fingerprint).
    max_age: seconds after which an entry expires (None: never).
    """

    _TOUCH_EVERY = 1.0  # seconds between refreshes of the directories' mtimes

    def __init__(
        self,
        cache_dir: str = ".cache/llama_cpp",
        capacity_bytes: int = (2 << 30),
        *,
        fingerprint: str | None = None,
        max_age: float | None = None,
    ) -> None:
        """Open or create the cache in `cache_dir`.

        Raises ValueError for a capacity that is not a positive int or a max_age that is not
        positive, TypeError for a non-str fingerprint, and StoreUnavailableError when the
        directory or its index cannot be created.
        """
        super().__init__(capacity_bytes, fingerprint)
        if max_age is not None and not max_age > 0:
            raise ValueError(f"max_age must be positive seconds or None, got {max_age!r}")
        self.cache_dir = cache_dir
        self.max_age = max_age
        self._index_path = Path(cache_dir) / "index.sqlite"
        self._index_id: tuple[int, int] | None = None
        self._touched = 0.0
        self._mark: tuple[int, int] | None = None  # (entries, bytes) of the store at the last sync
        self._store: DiskStore = self._open()
        self._touch()

    def __repr__(self) -> str:
        return f"LlamaDiskCache(cache_dir={self.cache_dir!r}, capacity_bytes={self.capacity_bytes})"

    @property
    def _disk(self) -> DiskStore:
        """The DiskStore holding the entries."""
        return self._store

    # -- the directory, and healing it ------------------------------------------------------------

    def _open(self) -> DiskStore:
        """A DiskStore on cache_dir; when its index is new (or was lost) but entry files are there,
        DiskStore.gc adopts those that verify. Raises StoreUnavailableError."""
        path = Path(self.cache_dir)
        disk = DiskStore(path, self.capacity_bytes, max_age=self.max_age)
        st = os.stat(self._index_path)
        self._index_id = (st.st_dev, st.st_ino)
        if len(disk) == 0 and self._has_entry_files(path / "entries"):
            counts = disk.gc()
            log.info("rebuilt disk cache index %s from entry files: %s", self._index_path, counts)
        else:
            disk.expire()
        return disk

    @staticmethod
    def _has_entry_files(entries: Path) -> bool:
        try:
            for shard in os.scandir(entries):
                if shard.is_dir(follow_symlinks=False) and any(os.scandir(shard.path)):
                    return True
        except OSError:
            return False
        return False

    def _before(self) -> None:
        """Reopen (and rebuild) when index.sqlite was deleted or replaced; keep directory mtimes fresh."""
        try:
            st = os.stat(self._index_path)
            intact = (st.st_dev, st.st_ino) == self._index_id
        except OSError:
            intact = False
        if not intact:
            log.warning(
                "disk cache index %s was deleted or replaced; rebuilding it", self._index_path
            )
            self._store.close()
            try:
                self._store = self._open()
            except StoreUnavailableError as exc:
                log.warning("cannot reopen disk cache %s: %s", self.cache_dir, exc)
                return
            self._forget_all()
            self._mark = None
        self._touch()

    def _touch(self) -> None:
        """Set the directories' mtimes to now (at most once a _TOUCH_EVERY): they are in use."""
        now = time.time()
        if now - self._touched >= self._TOUCH_EVERY:
            self._touched = now
            for sub in ("entries", "tmp"):
                try:
                    os.utime(os.path.join(self.cache_dir, sub))
                except OSError:
                    pass  # recreated by the next write if it is gone

    @property
    def cache_size(self) -> int:
        """Bytes of entry files in the directory (every model's); 0 when the index is unreadable."""
        with self._lock:
            self._before()
            try:
                return self._store.size()
            except StoreUnavailableError as exc:
                log.warning("disk cache %s unreadable: %s", self.cache_dir, exc)
                return 0

    # -- entries --------------------------------------------------------------------------------

    def _read_entry(self, entry_id: str) -> Entry | None:
        entry = super()._read_entry(entry_id)
        # A hit refreshes the manifest's recency too, so that LRU evicts the pair together.
        if entry is not None and self._store.get(f"{entry_id}-t", fingerprint=entry.scope) is None:
            self._put_manifest(entry)
        return entry

    def _put_manifest(self, entry: Entry) -> bool:
        try:
            self._store.put(f"{entry.entry_id}-t", entry.encode_manifest(), fingerprint=entry.scope)
        except (CapacityError, StoreUnavailableError) as exc:
            log.warning("cannot write a disk cache manifest in %s: %s", self.cache_dir, exc)
            return False
        return True

    def _write_entry(self, entry: Entry) -> bool:
        # State first: a manifest without its state is a miss that heals, the reverse is invisible.
        if not super()._write_entry(entry):
            return False
        if not self._put_manifest(entry):
            self._delete(entry.entry_id)
            return False
        return True

    def _delete(self, entry_id: str) -> None:
        super()._delete(entry_id)
        try:
            self._store.delete(f"{entry_id}-t")
        except StoreUnavailableError as exc:
            log.warning("cannot remove disk cache manifest %s-t: %s", entry_id, exc)

    def _refresh(self, force: bool = False) -> None:
        """Sync the index with the directory: drop entries gone, index new ones (every model's).

        Without `force`, syncs only when the store's entry count or byte total changed.
        """
        try:
            mark = (len(self._store), self._store.size())
            if not force and mark == self._mark:
                return
            keys = list(self._store.keys())
        except StoreUnavailableError as exc:
            log.warning(
                "disk cache %s unreadable, serving what is indexed: %s", self.cache_dir, exc
            )
            return
        states: set[str] = set()
        manifests: set[str] = set()
        for key in keys:
            m = _DISK_KEY.fullmatch(key)
            if m is not None:
                (states if m.group(2) == "s" else manifests).add(m.group(1))
        for entry_id in [i for i in self._ids if i not in states or i not in manifests]:
            self._forget(entry_id)
        for entry_id in manifests - self._ids.keys():
            if entry_id not in states:  # its state was evicted or removed: the manifest is litter
                self._delete(entry_id)
                continue
            payload = self._store.get(f"{entry_id}-t")
            if payload is None:
                continue
            try:
                fingerprint, shape, tokens_le = decode_manifest(payload)
                if entry_id_of(fingerprint, shape, tokens_le) != entry_id:
                    raise CorruptEntryError("manifest holds another key than its name")
            except CorruptEntryError as exc:
                log.warning(
                    "disk cache manifest %s in %s is unusable, removing it: %s",
                    entry_id,
                    self.cache_dir,
                    exc,
                )
                self._delete(entry_id)
                continue
            self._add(entry_id, fingerprint, shape, tokens_le)
        self._mark = mark

    def clear(self) -> None:
        """Remove every entry of this cache's fingerprint (every entry, without one) from the directory."""
        with self._lock:
            self._before()
            self._refresh(force=True)
            for entry_id, (scope, _t) in list(self._ids.items()):
                if self.fingerprint is None or self._scopes[scope][0] == self.fingerprint:
                    self._delete(entry_id)

    def close(self) -> None:
        """Close this process's index connections (they reopen on next use). Never raises."""
        self._store.close()
