"""The sqlite plumbing the file-backed indexes share (store.disk and artefacts.store)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from promptcache.errors import StoreUnavailableError


def connect(path: str | Path, timeout: float, **kwargs: Any) -> sqlite3.Connection:
    """An autocommit connection to the index at `path`, waiting up to `timeout` s for its lock."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, **kwargs)
    # NORMAL in WAL mode: a commit survives a process crash; only a power cut may lose the last ones.
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, taken at once (BEGIN IMMEDIATE): the cross-process lock of the index."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


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
