"""The sqlite plumbing the file-backed indexes share (store.disk_index and artefacts.store).

Owns connections (one per thread and process), WAL, the schema, the cross-process write lock, a
damaged file set aside and errors turned into StoreUnavailableError; never knows what a row means.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from promptcache.errors import StoreUnavailableError

log = logging.getLogger(__name__)

_SQLITE_FULL = 13


def disk_full(exc: BaseException) -> bool:
    """Whether an OSError or sqlite3.Error says the disk (or the user's quota) is full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL  # Python 3.11+ sets it


@contextmanager
def unavailable(
    action: str, where: str, detail: Callable[[BaseException], str | None] | None = None
) -> Iterator[None]:
    """Turn an OSError or sqlite3.Error into StoreUnavailableError("cannot {action} {where}: ...").

    `detail(exc)` may give the text after the colon (None: the error itself)."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        message = detail(exc) if detail is not None else None
        raise StoreUnavailableError(f"cannot {action} {where}: {message or exc}") from exc
    except UnicodeDecodeError as exc:
        # sqlite names a damaged schema object in its message; when the damage hit that name,
        # Python's sqlite3 cannot decode the message and raises this instead of DatabaseError.
        damaged = sqlite3.DatabaseError(f"malformed database (an undecodable error message: {exc})")
        raise StoreUnavailableError(f"cannot {action} {where}: {damaged}") from damaged


class _Connection(sqlite3.Connection):
    """A connection close() can reach from any thread, held weakly so that a finished thread's is freed."""

    owner_pid: int


class Database:
    """One sqlite file that several processes and threads share, in WAL mode, under `schema`.

    where: what errors name ("the disk cache at /path"). full_hint: what a full disk's error tells
    the user to do ("free space or lower capacity_bytes (now N)"). busy_timeout: seconds a process
    waits for another one's write transaction before giving up.

    Connections are per thread and per process (sqlite's are not shared across threads or forks);
    close() closes this process's from any thread, and the next use reopens. A file that sqlite
    calls damaged (not busy, not unreadable) is set aside on open() and a new empty one made: the
    rows of an index only say which files are complete, so without them nothing is served (a file
    without a row is a crashed writer's) and gc reclaims the files.
    """

    def __init__(
        self,
        path: Path,
        schema: str,
        *,
        busy_timeout: float,
        where: str,
        full_hint: str = "free space",
    ) -> None:
        self.path = path
        self.schema = schema
        self.busy_timeout = busy_timeout
        self.where = where
        self.full_hint = full_hint
        self._local = threading.local()
        self._generation = 0
        self._conns: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._conns_lock = threading.Lock()

    def open(self) -> None:
        """Create the file and schema if needed (WAL mode); a damaged file is set aside for a new one.

        Raises StoreUnavailableError when the file cannot be created, read or locked."""
        try:
            self._create()
        except StoreUnavailableError as exc:
            cause = exc.__cause__
            if not isinstance(cause, sqlite3.DatabaseError) or isinstance(
                cause, sqlite3.OperationalError
            ):
                raise
            self._set_aside(cause)  # damaged (not busy or unreadable): start a new one
            self._create()

    def _create(self) -> None:
        with self.unavailable("open"):
            conn = self.conn()
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning(
                    "index %s runs in %s mode, not WAL: readers will wait for writers",
                    self.path,
                    mode,
                )
            conn.executescript(self.schema)

    def _set_aside(self, exc: sqlite3.DatabaseError) -> None:
        self.close()
        aside = self.path.with_name(f"{self.path.stem}.corrupt-{time.time_ns()}{self.path.suffix}")
        log.warning("index %s is damaged (%s); moved it to %s", self.path, exc, aside)
        with self.unavailable("set aside the damaged index of"):
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                try:
                    os.unlink(str(self.path) + suffix)
                except FileNotFoundError:
                    pass

    def conn(self) -> sqlite3.Connection:
        """This thread's autocommit connection (made on first use, and again after close())."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or conn.owner_pid != os.getpid() or local.generation != self._generation:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,  # one thread uses it; close() may run in another
                factory=_Connection,
            )
            # NORMAL in WAL mode: a commit survives a process crash; only a power cut may lose the last ones.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.owner_pid = os.getpid()
            local.conn, local.generation = conn, self._generation
            with self._conns_lock:
                self._conns.add(conn)
        return conn

    @contextmanager
    def locked(self, on_abort: Callable[[], object] | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE): the cross-process lock under
        which the files an index lists are placed or removed. On any exception, the commit's
        included, `on_abort()` runs while the lock is still held (to undo what the body did to
        files), then the transaction is rolled back."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            try:
                if on_abort is not None:
                    on_abort()
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            raise

    def unavailable(self, action: str) -> AbstractContextManager[None]:
        """OSError and sqlite3.Error inside become StoreUnavailableError("cannot {action} {where}: ...")."""

        def detail(exc: BaseException) -> str | None:
            return f"the disk is full ({exc}); {self.full_hint}" if disk_full(exc) else None

        return unavailable(action, self.where, detail)

    def close(self) -> None:
        """Close this process's connections, from any thread; later calls reopen them. Never raises."""
        with self._conns_lock:
            # A connection inherited through fork belongs to the parent: leave it alone.
            mine = [conn for conn in self._conns if conn.owner_pid == os.getpid()]
            self._conns = weakref.WeakSet()
            self._generation += 1
        for conn in mine:
            try:
                conn.close()
            except sqlite3.Error as exc:
                log.debug("closing an index connection of %s: %s", self.path, exc)


__all__ = ["Database", "disk_full", "unavailable"]
