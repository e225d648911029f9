"""What crashed writers and damage leave in a disk cache, set right under the index lock.

Owns removing an unusable entry unless a writer replaced it (discard) and reconciling the entry
files with the index (reconcile, DiskStore.gc); never serves an entry and never evicts.
"""

from __future__ import annotations

import logging
import os
import sqlite3

from promptcache.store.disk_files import EntryFiles, same_file, unlink
from promptcache.store.disk_index import DiskIndex

log = logging.getLogger(__name__)


def discard(
    index: DiskIndex,
    files: EntryFiles,
    key: str,
    seen: os.stat_result | None,
    why: str,
    *,
    size_mismatch: bool = False,
) -> bool:
    """Remove key's entry, whose file a reader found unusable (stat `seen`), unless a writer
    replaced it since; True if removed. Errors are logged, never raised.

    With `seen` None the file was missing: drop the row if it is still missing. With `size_mismatch`,
    remove only if the index still counts another size than the file holds.
    """
    try:
        with index.locked() as conn:
            now_st = files.stat(key)
            if now_st is None:  # under the lock, a row without a file is stale
                return index.delete(conn, [key]) > 0
            if seen is None or not same_file(seen, now_st):
                return False  # a writer placed a new file meanwhile
            if size_mismatch and index.size_of(conn, key) == now_st.st_size:
                return False
            index.delete(conn, [key])
            files.remove([key])
            return True
    except (OSError, sqlite3.Error) as exc:
        log.warning("cannot remove disk cache entry %s (%s): %s", key, why, exc)
        return False


def reconcile(index: DiskIndex, files: EntryFiles, capacity_bytes: int) -> dict[str, int]:
    """Adopt each file without a row (a writer killed between placing it and committing) when its
    envelope verifies and it fits in capacity_bytes, remove it otherwise; drop each row whose file
    is missing or has another size. Returns counts: adopted, orphans_removed, stale_rows.

    Raises OSError and sqlite3.Error (DiskStore.gc turns them into StoreUnavailableError)."""
    # Files without a row, read outside the lock (verifying may be slow), re-checked under it.
    candidates = files.unlisted(set(index.keys()))
    adopted = removed = 0
    with index.locked() as conn:
        rows = index.sizes(conn)
        total = sum(rows.values())
        for path, (seen, size, fp) in candidates.items():
            name = os.path.basename(path)
            try:
                if name in rows or not same_file(seen, os.stat(path)):
                    continue  # committed or replaced since we looked
            except FileNotFoundError:
                continue
            if size is not None and total + size <= capacity_bytes:
                index.record(conn, name, size, seen.st_mtime, fp)
                total += size
                adopted += 1
            else:
                log.info("removing orphan disk cache file %s", path)
                removed += unlink(path)
        stale = _drop_stale_rows(conn, index, files, rows)
    return {"adopted": adopted, "orphans_removed": removed, "stale_rows": stale}


def _drop_stale_rows(
    conn: sqlite3.Connection, index: DiskIndex, files: EntryFiles, rows: dict[str, int]
) -> int:
    """Remove rows (and files) whose file is missing or has another size; inside the lock."""
    stale = [key for key, size in rows.items() if _file_size(files, key) != size]
    for key in stale:
        log.info(
            "dropping disk cache entry %s: index says %d bytes, file has %s",
            key,
            rows[key],
            _file_size(files, key),
        )
    index.delete(conn, stale)
    files.remove(stale)
    return len(stale)


def _file_size(files: EntryFiles, key: str) -> int | None:
    st = files.stat(key)
    return st.st_size if st is not None else None


__all__ = ["discard", "reconcile"]
