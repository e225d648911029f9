"""Responses: request bodies in, jobs' events out as OpenAI JSON bodies and server-sent events.

Owns reading a bounded JSON body, following a job's events until it ends or the client leaves, and
assembling them into one response or a stream; never runs a model and never chooses a route.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from promptcache.server.events import Done, End, Event, Failed, Piece, Result, Started, Usage
from promptcache.server.pool import EnginePool, Job, JobRun, QueueFullError, Worker
from promptcache.server.protocol import ApiError, Envelope, merge_logprobs, parse_json, sse

log = logging.getLogger(__name__)

DISCONNECTED = 499  # nginx's "client closed request": nobody reads it, but logs say what happened


def as_api_error(exc: BaseException) -> ApiError:
    """The error a client is answered for `exc`: itself, a 400 for bad values, else a 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (ValueError, TypeError)):
        return ApiError(400, str(exc))
    return ApiError(500, f"generation failed: {exc}", type="server_error")


async def read_json(request: Request, limit: int, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object (with `optional`, an empty body is {}); 413 past `limit` bytes (the
    rest is drained, up to a bound, so the client can read the answer), 400 for anything that is not
    a JSON object."""
    too_big = False
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise ApiError(400, "the Content-Length header is not a number") from None
    parts: list[bytes] = []
    size = 0
    if not too_big or int(declared or 0) <= 16 * limit:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                too_big = True
                if size > 16 * limit:
                    break
                continue
            parts.append(part)
    if too_big:
        raise ApiError(
            413,
            f"the request body exceeds {limit} bytes (the server's max_body_bytes)",
            code="request_too_large",
        )
    raw = b"".join(parts)
    if optional and not raw.strip():
        return {}
    return parse_json(raw)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def job_events(request: Request, job: Job) -> AsyncIterator[Event]:
    """The job's events until it ends; if the client disconnects first, the job is cancelled and the
    iteration stops. Closing the iterator early cancels the job too."""
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    getter: asyncio.Future[Event] | None = None
    try:
        while True:
            getter = asyncio.ensure_future(job.events.get())
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                log.info("client disconnected; stopping its request")
                return
            event = getter.result()
            if isinstance(event, End):
                return
            yield event
    finally:
        job.cancel()
        watcher.cancel()
        if getter is not None:
            getter.cancel()


def submit(pool: EnginePool, fn: Callable[[Worker, Job], JobRun], sequences: int = 1) -> Job:
    """Queue a job; a full server answers 503 with Retry-After."""
    job = Job(fn, asyncio.get_running_loop(), sequences)
    try:
        pool.submit(job)
    except QueueFullError as exc:
        raise ApiError(
            503,
            f"all {pool.sequences} sequence(s) are busy and {pool.max_queue} request(s) wait; "
            f"retry in {exc.retry_after} s",
            type="server_error",
            code="server_busy",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    return job


async def job_result(
    request: Request, pool: EnginePool, fn: Callable[[Worker, Job], JobRun]
) -> Response:
    """Run a job that emits one Result and answer it as JSON."""
    job = submit(pool, fn)
    result = None
    async with aclosing(job_events(request, job)) as events:
        async for event in events:
            if isinstance(event, Failed):
                raise as_api_error(event.error)
            if isinstance(event, Result):
                result = event.body
    if result is None:
        return Response(status_code=DISCONNECTED)
    return JSONResponse(result)


async def first_event(events: AsyncIterator[Event]) -> Started | None:
    """Wait for a generation to start, so errors before its first token are plain 4xx answers;
    None when the client left."""
    first = await anext(events, None)
    if isinstance(first, Started):
        return first
    await events.aclose()  # type: ignore[attr-defined]
    if isinstance(first, Failed):
        raise as_api_error(first.error)
    return None


async def whole_response(events: AsyncIterator[Event], envelope: Envelope, n: int) -> Response:
    """The generation's pieces joined into one OpenAI response (499 if the client left)."""
    choices: list[dict[str, Any]] = [
        {"text": "", "finish_reason": None, "logprobs": None} for _ in range(n)
    ]
    done = None
    async with aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if isinstance(event, Piece):
                choice = choices[event.index]
                choice["text"] += event.text
                choice["logprobs"] = merge_logprobs(choice["logprobs"], event.logprobs)
            elif isinstance(event, Done):
                choices[event.index]["finish_reason"] = event.finish_reason
            elif isinstance(event, Usage):
                done = event.usage
            elif isinstance(event, Failed):
                raise as_api_error(event.error)
    if done is None:
        return Response(status_code=DISCONNECTED)
    return JSONResponse(envelope.response(choices, done))


async def event_stream(
    events: AsyncIterator[Event], envelope: Envelope, *, n: int, include_usage: bool
) -> AsyncIterator[bytes]:
    """The generation as OpenAI's server-sent events, ending with [DONE]."""
    chat = envelope.kind == "chat"
    async with aclosing(events):  # type: ignore[type-var]
        if chat:
            for index in range(n):
                yield sse(envelope.chunk("", role=True, index=index))
        async for event in events:
            if isinstance(event, Piece):
                yield sse(envelope.chunk(event.text, index=event.index, logprobs=event.logprobs))
            elif isinstance(event, Done):
                yield sse(
                    envelope.chunk(None if chat else "", event.finish_reason, index=event.index)
                )
            elif isinstance(event, Usage) and include_usage:
                yield sse(envelope.usage_chunk(event.usage))
            elif isinstance(event, Failed):
                yield sse(as_api_error(event.error).body())
        yield sse("[DONE]")


__all__ = [
    "DISCONNECTED",
    "as_api_error",
    "event_stream",
    "first_event",
    "job_events",
    "job_result",
    "read_json",
    "submit",
    "whole_response",
]
