"""The disk tier's index: one sqlite row per complete entry file (key, size, ctime, atime, fingerprint).

Owns the entries table and the queries eviction, expiry and listing ask of it; never opens an entry
file (store.disk_files) and never decides what a row's absence means (DiskStore).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from promptcache.store.sqlite import Database

log = logging.getLogger(__name__)

BUSY_TIMEOUT = 30.0
"""Seconds a process waits for another one's index transaction before giving up."""

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


class DiskIndex(Database):
    """`index.sqlite` of a disk cache: which entry files are complete, their sizes and times.

    Methods that take `conn` run inside locked() (the write transaction every process takes before
    it places or removes a file); the others read with this thread's connection and raise
    sqlite3.Error, which callers turn into misses or StoreUnavailableError (unavailable()).
    """

    def __init__(self, path: Path, *, where: str, full_hint: str) -> None:
        super().__init__(path, _SCHEMA, busy_timeout=BUSY_TIMEOUT, where=where, full_hint=full_hint)

    # -- reads ----------------------------------------------------------------------------------

    def row(self, key: str) -> tuple[int, float, float] | None:
        """(size, ctime, atime) of key's row, or None."""
        return (
            self.conn()
            .execute("SELECT size, ctime, atime FROM entries WHERE key = ?", (key,))
            .fetchone()
        )

    def ctime(self, key: str) -> float | None:
        row = self.conn().execute("SELECT ctime FROM entries WHERE key = ?", (key,)).fetchone()
        return row[0] if row is not None else None

    def totals(self) -> tuple[int, int]:
        """(rows, bytes they count)."""
        return (
            self.conn().execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
        )

    def keys(self) -> list[str]:
        """Every key, oldest written first."""
        rows = self.conn().execute("SELECT key FROM entries ORDER BY ctime").fetchall()
        return [key for (key,) in rows]

    def listing(self) -> list[tuple[str, int, str, float, float]]:
        """(key, size, fingerprint, ctime, atime) of every row, most recently used first."""
        query = "SELECT key, size, fingerprint, ctime, atime FROM entries ORDER BY atime DESC"
        return self.conn().execute(query).fetchall()

    def touch(self, key: str, now: float) -> None:
        """Set key's atime to `now` (if older). Only a recency hint: a busy index is logged, not raised."""
        try:
            self.conn().execute(
                "UPDATE entries SET atime = ? WHERE key = ? AND atime < ?", (now, key, now)
            )
        except sqlite3.Error as exc:
            log.debug("could not refresh atime of %s: %s", key, exc)

    # -- inside locked() ------------------------------------------------------------------------

    @staticmethod
    def holds(conn: sqlite3.Connection, key: str) -> bool:
        return conn.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone() is not None

    @staticmethod
    def size_of(conn: sqlite3.Connection, key: str) -> int | None:
        row = conn.execute("SELECT size FROM entries WHERE key = ?", (key,)).fetchone()
        return row[0] if row is not None else None

    @staticmethod
    def written_at(conn: sqlite3.Connection, key: str, ctime: float) -> bool:
        """Whether key's row is still the one written at `ctime` (no writer replaced it)."""
        query = "SELECT 1 FROM entries WHERE key = ? AND ctime = ?"
        return conn.execute(query, (key, ctime)).fetchone() is not None

    @staticmethod
    def sizes(conn: sqlite3.Connection) -> dict[str, int]:
        return dict(conn.execute("SELECT key, size FROM entries").fetchall())

    @staticmethod
    def written_before(conn: sqlite3.Connection, cutoff: float) -> list[str]:
        query = "SELECT key FROM entries WHERE ctime < ?"
        return [key for (key,) in conn.execute(query, (cutoff,))]

    @staticmethod
    def record(
        conn: sqlite3.Connection,
        key: str,
        size: int,
        ctime: float,
        fingerprint: str,
        atime: float | None = None,
    ) -> None:
        """Insert key's row, or replace it (a new version of the entry)."""
        conn.execute(
            "INSERT INTO entries (key, size, ctime, atime, fingerprint) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET size = excluded.size, ctime = excluded.ctime, "
            "atime = excluded.atime, fingerprint = excluded.fingerprint",
            (key, size, ctime, ctime if atime is None else atime, fingerprint),
        )

    @staticmethod
    def delete(conn: sqlite3.Connection, keys: list[str]) -> int:
        """Delete the rows of `keys`; returns how many there were."""
        cur = conn.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in keys])
        return cur.rowcount

    @staticmethod
    def delete_all(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM entries")

    @staticmethod
    def victims(
        conn: sqlite3.Connection, size: int, keep: str, capacity: int, target: int, order: str
    ) -> list[str]:
        """Keys to evict, first victim first by `order` (an ORDER BY), so that `size` more bytes
        fit with `keep`'s row gone: none while the total stays within `capacity`, else enough to
        bring it down to `target` (the eviction threshold's share of capacity)."""
        total, old = conn.execute(
            "SELECT COALESCE(SUM(size), 0), COALESCE(SUM(CASE WHEN key = ? THEN size END), 0) FROM entries",
            (keep,),
        ).fetchone()
        if total - old + size <= capacity:
            return []
        excess = total - old + size - target
        victims: list[str] = []
        cur = conn.execute(
            f"SELECT key, size FROM entries WHERE key != ? ORDER BY {order}", (keep,)
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
        return victims


__all__ = ["DiskIndex", "BUSY_TIMEOUT"]
