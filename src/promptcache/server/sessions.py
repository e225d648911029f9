"""Saved sessions of the server: one file per id in one directory (in the spirit of llama-server's
slot save/restore). Validates ids and maps them to paths; the LLM writes and reads the files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from promptcache.server.protocol import ApiError

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SUFFIX = ".session"


class SessionDirectory:
    """Session files `<id>.session` under `path` (created on the first save)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def file(self, session_id: str, *, must_exist: bool = False) -> Path:
        """The file of `session_id`. Raises ApiError 400 for an invalid id and 404 for a missing one."""
        if not SESSION_ID.fullmatch(session_id):
            raise ApiError(
                400,
                "a session id is 1 to 64 letters, digits, '-' or '_', starting with a letter or digit",
                param="session_id",
                code="invalid_session_id",
            )
        path = self.path / f"{session_id}{SUFFIX}"
        if must_exist and not path.is_file():
            raise ApiError(
                404,
                f"no session named {session_id!r}",
                param="session_id",
                code="session_not_found",
            )
        return path

    def prepare(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ApiError(
                500, f"cannot create the session directory: {exc}", type="server_error"
            ) from None

    def list(self) -> list[dict[str, Any]]:
        if not self.path.is_dir():
            return []
        out = []
        for p in sorted(self.path.glob(f"*{SUFFIX}")):
            session_id = p.name[: -len(SUFFIX)]
            if SESSION_ID.fullmatch(session_id):
                st = p.stat()
                out.append(
                    {
                        "id": session_id,
                        "object": "session",
                        "bytes": st.st_size,
                        "modified": int(st.st_mtime),
                    }
                )
        return out

    def delete(self, session_id: str) -> None:
        self.file(session_id, must_exist=True).unlink(missing_ok=True)
