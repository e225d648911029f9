"""Saved sessions of the server: one file per id in one directory (in the spirit of llama-server's
slot save/restore), and the engine jobs that save and restore them. Never speaks HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from promptcache.engines.llama_cpp import Query, session
from promptcache.errors import (
    ContextOverflowError,
    CorruptEntryError,
    ModelMismatchError,
    PromptCacheError,
)
from promptcache.files import atomic_write
from promptcache.server.events import Result
from promptcache.server.pool import Ending, Job, JobRun, Worker
from promptcache.server.prompts import (
    Prompt,
    chat_messages,
    completion_prompt,
    context_error,
    prompt_tokens,
)
from promptcache.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)

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
            raise _not_found(session_id)
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


def _not_found(session_id: str) -> ApiError:
    return ApiError(
        404, f"no session named {session_id!r}", param="session_id", code="session_not_found"
    )


def session_prompt(body: dict[str, Any], n_vocab: int) -> Prompt:
    """The prompt a save request names: {"messages": [...]} or {"prompt": text or token ids}."""
    if ("messages" in body) == ("prompt" in body):
        raise ApiError(
            400,
            "send either 'messages' (a chat) or 'prompt' (text or token ids) to save",
            param="messages",
        )
    if "messages" in body:
        req = parse_request(ChatCompletionRequest, {"messages": body["messages"]})
        return Prompt(messages=chat_messages(req), param="messages")
    return completion_prompt(parse_request(CompletionRequest, {"prompt": body["prompt"]}), n_vocab)


def save_job(
    session_id: str, path: Path, prompt: Prompt, n_ctx: int
) -> Callable[[Worker, Job], JobRun]:
    """An engine job that prefills `prompt` (reusing the shared cache) and writes its state to
    `path` atomically, off the round; it emits Result(session object). Raises ApiError 400 past the
    context, 500 when the file cannot be written."""

    def run(worker: Worker, job: Job) -> JobRun:
        tokens, _ = prompt_tokens(worker.llm, prompt)
        if len(tokens) >= n_ctx:
            raise context_error(n_ctx, len(tokens), 1, prompt.param)
        adv = (yield {0: Query(tokens, insert=False)})[0]
        engine = worker.engine
        held = engine.settle(adv.seq)  # type: ignore[arg-type]
        blob = session.pack(
            held,
            engine.state(held.seq_id),
            codec_name=engine.codec.name,
            fingerprint=engine.fingerprint,
        )

        def write() -> None:
            try:
                n_bytes = atomic_write(path, blob)
            except OSError as exc:
                raise ApiError(
                    500, f"cannot write the session: {exc}", type="server_error"
                ) from None
            body = {"id": session_id, "object": "session", "tokens": len(tokens), "bytes": n_bytes}
            job.emit(Result({**body, "cached_tokens": adv.reused}))

        return Ending(cache=(0,), then=write)

    return run


def restore_job(session_id: str, path: Path, *, share: bool) -> Callable[[Worker, Job], JobRun]:
    """An engine job that loads the session at `path` into a sequence of its worker and, with
    `share`, puts its state into the shared cache for every worker (off the round); it emits
    Result(session object). Raises ApiError 404 (gone), 409 (another model), 400 (too long for the
    context) or 422 (damaged)."""

    def run(worker: Worker, job: Job) -> JobRun:
        yield from ()  # no query: loading a state is not a round
        engine = worker.engine
        try:
            blob = path.read_bytes()
        except OSError:
            raise _not_found(session_id) from None
        try:
            live, state = session.unpack(blob, fingerprint=engine.fingerprint)
            if len(live.tokens) >= engine.n_ctx:
                raise ContextOverflowError(
                    f"the session holds {len(live.tokens)} tokens; a request may hold {engine.n_ctx}"
                )
            seq = engine.load(live.tokens, state, live.n_reusable)
        except ModelMismatchError as exc:
            raise ApiError(
                409, str(exc), param="session_id", code="session_model_mismatch"
            ) from None
        except ContextOverflowError as exc:
            raise ApiError(
                400, str(exc), param="session_id", code="context_length_exceeded"
            ) from None
        except (CorruptEntryError, PromptCacheError) as exc:
            raise ApiError(
                422, f"the session is damaged: {exc}", param="session_id", code="session_corrupt"
            ) from None
        states = engine.snapshot(engine.settle(seq).seq_id) if share else []
        body = {"id": session_id, "object": "session", "tokens": len(live.tokens), "cached": share}

        def store() -> None:
            engine.store(states)
            job.emit(Result(body))

        return Ending(then=store)

    return run
