"""The server's routes: generation (/v1/completions, /v1/chat/completions), status (/health, /v1/models,
/metrics, /v1/cache/stats), vLLM's tokenizer endpoints and saved sessions.

Owns turning an HTTP request into an Ask or a job and choosing how to answer; the jobs run in the
pool (jobs.py, sessions.py) and responses.py assembles what they emit. Never generates on the
event loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from promptcache import __version__
from promptcache.server.jobs import Ask, generation_job, sampling
from promptcache.server.metrics import cache_stats, tier_stats
from promptcache.server.prompts import Prompt, chat_prompt, completion_prompt, render_prompt
from promptcache.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Envelope,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    parse_request,
)
from promptcache.server.responses import (
    DISCONNECTED,
    event_stream,
    first_event,
    job_events,
    job_result,
    read_json,
    submit,
    whole_response,
)
from promptcache.server.sessions import restore_job, save_job, session_prompt

if TYPE_CHECKING:
    from promptcache.server.app import Server


def install_routes(app: FastAPI, server: Server) -> None:
    _install_status_routes(app, server)
    _install_generation_routes(app, server)
    _install_tokenizer_routes(app, server)
    _install_fleet_routes(app, server)
    _install_session_routes(app, server)


# ------------------------------------------------------------------------------------ generation


class ClientStreams:
    """Generations running per client address, bounded by `limit` (None: unbounded): past it, 429
    with Retry-After, so one client cannot take every sequence. Used on the event loop only."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, client: str) -> None:
        n = self._open.get(client, 0)
        if self.limit is not None and n >= self.limit:
            raise ApiError(
                429,
                f"this client already runs {n} generation(s), the most one client may run at once; "
                "retry when one ends",
                type="rate_limit_error",
                code="too_many_streams",
                headers={"Retry-After": "1"},
            )
        self._open[client] = n + 1

    def release(self, client: str) -> None:
        n = self._open.pop(client, 0) - 1
        if n > 0:
            self._open[client] = n


async def _released(
    stream: AsyncIterator[bytes], release: Callable[[], None]
) -> AsyncIterator[bytes]:
    try:
        async for part in stream:
            yield part
    finally:
        release()


def _check_ask(server: Server, ask: Ask) -> None:
    """400 for what no worker could serve: max_tokens past the server's limit or 0 without echo,
    n past the sequences a worker holds."""
    if ask.max_tokens is not None and ask.max_tokens > server.max_tokens:
        raise ApiError(
            400,
            f"max_tokens is too large: {ask.max_tokens}; this server allows at most {server.max_tokens}",
            param="max_tokens",
            code="invalid_value",
        )
    if ask.max_tokens == 0 and not ask.echo:
        raise ApiError(
            400,
            "max_tokens must be at least 1 (0 only with echo, to score the prompt)",
            param="max_tokens",
            code="invalid_value",
        )
    if ask.n > server.pool.parallel:
        raise ApiError(
            400,
            f"n is too large: {ask.n}; this server runs at most {server.pool.parallel} "
            "sequences per worker (--parallel)",
            param="n",
            code="invalid_value",
        )


async def _generate(request: Request, server: Server, ask: Ask, req: Any) -> Response:
    """Check the request and the client's running generations, then run it; the client's count is
    released when the answer (or its stream) ends."""
    _check_ask(server, ask)
    client = request.client.host if request.client is not None else "unknown"
    server.streams.acquire(client)
    handed = False
    try:
        response = await _run_generation(request, server, ask, req)
        if isinstance(response, StreamingResponse):
            response.body_iterator = _released(
                response.body_iterator, lambda: server.streams.release(client)
            )
            handed = True
        return response
    finally:
        if not handed:
            server.streams.release(client)


async def _run_generation(request: Request, server: Server, ask: Ask, req: Any) -> Response:
    """Queue the generation, wait for it to start (errors before the first token are plain 4xx
    answers), then answer as one JSON body or as server-sent events."""
    endpoint = request.scope["route"].path
    job = submit(server.pool, generation_job(server.limits, server.metrics, endpoint, ask), ask.n)
    events = job_events(request, job)
    if await first_event(events) is None:
        return Response(status_code=DISCONNECTED)
    envelope = Envelope(
        "chat" if ask.kind == "chat" else "completion", server.model_id, server.system_fingerprint
    )
    if not req.stream:
        return await whole_response(events, envelope, ask.n)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(
        event_stream(events, envelope, n=ask.n, include_usage=include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _unsupported(condition: object, param: str, what: str) -> None:
    if condition:
        raise ApiError(
            400,
            f"{what} is not supported by this server",
            param=param,
            code="unsupported_parameter",
        )


def _install_generation_routes(app: FastAPI, server: Server) -> None:
    """/v1/completions and /v1/chat/completions."""
    limit = server.settings.max_body_bytes

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_request(CompletionRequest, await read_json(request, limit))
        server.check_model(req.model)
        _unsupported(req.best_of not in (None, 1, req.n), "best_of", "best_of other than n")
        _unsupported(req.suffix, "suffix", "suffix")
        ask = Ask(
            "completion",
            completion_prompt(req, server.n_vocab),
            req.max_tokens,
            n=req.n,
            sampling=sampling(req, server.n_vocab),
            echo=req.echo,
            logprobs=req.logprobs,
        )
        return await _generate(request, server, ask, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await read_json(request, limit))
        server.check_model(req.model)
        _unsupported(req.tools, "tools", "tool calling")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(
                400,
                "top_logprobs needs logprobs: true",
                param="top_logprobs",
                code="invalid_value",
            )
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        ask = Ask(
            "chat",
            chat_prompt(req),
            max_tokens,
            n=req.n,
            sampling=sampling(req, server.n_vocab),
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        )
        return await _generate(request, server, ask, req)


# ------------------------------------------------------------------------------------ status


def _install_status_routes(app: FastAPI, server: Server) -> None:
    """/health, /v1/models, /v1/cache/stats and /metrics."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        pool = server.pool
        return {
            "status": "ok",
            "model": server.model_id,
            "workers": pool.size,
            "parallel": pool.parallel,
            "busy": pool.busy,
            "waiting": pool.waiting,
        }

    def model_card() -> dict[str, Any]:
        return {
            "id": server.model_id,
            "object": "model",
            "created": int(os.path.getmtime(server.model_path)),
            "owned_by": "promptcache",
            "context_length": server.n_ctx,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        server.check_model(model_id)
        return model_card()

    @app.get("/v1/cache/stats")
    async def stats() -> dict[str, Any]:
        cache, pool = server.cache, server.pool
        return {
            "model": server.model_id,
            "fingerprint": server.fingerprint,
            "context_length": server.n_ctx,
            "workers": {
                "size": pool.size,
                "parallel": pool.parallel,
                "slots": pool.sequences,
                "busy": pool.busy,
                "kv_bytes": pool.kv_bytes,
                "batching": pool.engine_stats(),
            },
            "queue": {"waiting": pool.waiting, "capacity": pool.max_queue},
            "cache": cache_stats(cache) if cache is not None else None,
            "tiers": tier_stats(cache) if cache is not None else [],
            "kv_events": server.events.stats() if server.events is not None else None,
            **server.metrics.snapshot(),
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)


# ------------------------------------------------------------------------------------ tokenizer


def _install_tokenizer_routes(app: FastAPI, server: Server) -> None:
    """vLLM's /tokenize, /detokenize and /tokenizer_info, and the render endpoints: what
    lm-evaluation-harness's remote tokenizer and prefix-aware routers (vllm-router's cache_aware and
    kv_aware ask every worker for a request's tokens) need. Each answers with exactly the tokens the
    generation endpoint evaluates for that request (prompts.render_prompt, the one rendering), on a
    thread of its own: never queued behind generation."""
    limit = server.settings.max_body_bytes

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return _tokenizer_info(server)

    async def render(prompt: Prompt) -> list[int]:
        tokens, _ = await asyncio.to_thread(render_prompt, server.tokenizer, prompt)
        return tokens

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await read_json(request, limit)
        if "messages" in body:
            req = parse_request(TokenizeChatRequest, body)
            server.check_model(req.model)
            prompt = chat_prompt(req)
        else:
            text = parse_request(TokenizeCompletionRequest, body)
            server.check_model(text.model)
            prompt = Prompt(text=text.prompt, add_special_tokens=text.add_special_tokens)
        tokens = await render(prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.n_ctx}

    @app.post("/v1/completions/render")
    async def render_completion(request: Request) -> dict[str, Any]:
        req = parse_request(CompletionRequest, await read_json(request, limit))
        server.check_model(req.model)
        return _rendered(server, await render(completion_prompt(req, server.n_vocab)))

    @app.post("/v1/chat/completions/render")
    async def render_chat(request: Request) -> dict[str, Any]:
        req = parse_request(ChatCompletionRequest, await read_json(request, limit))
        server.check_model(req.model)
        return _rendered(server, await render(chat_prompt(req)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        tokens = (await read_json(request, limit)).get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and 0 <= t < server.n_vocab for t in tokens
        ):
            raise ApiError(
                400, f"send {{'tokens': [ids in [0, {server.n_vocab})]}}", param="tokens"
            )
        return {
            "prompt": await asyncio.to_thread(server.tokenizer.detokenize, tokens, special=True)
        }


def _tokenizer_info(server: Server) -> dict[str, Any]:
    model = server.tokenizer.model  # tokenizing reads only the vocabulary: any thread
    return {
        "tokenizer_class": "llama.cpp",
        "eos_token": model.token_text(model.handle.token_eos()),
        "bos_token": model.token_text(model.handle.token_bos()),
        "pad_token": None,
        "model_max_length": server.n_ctx,
        "chat_template": model.metadata.get("tokenizer.chat_template"),
    }


# ------------------------------------------------------------------------------------ fleet


def _install_fleet_routes(app: FastAPI, server: Server) -> None:
    """What routers in front of several servers ask of one: vLLM's /reset_prefix_cache, and
    sglang's /get_server_info and /get_load (sglang-router reads them; so do people)."""

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        await asyncio.to_thread(server.workers.reset_prefix_cache)
        return Response(status_code=200)

    @app.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        events = server.events
        return {
            "model_path": server.model_path,
            "served_model_name": server.model_id,
            "context_length": server.n_ctx,
            "max_running_requests": server.pool.sequences,
            "version": __version__,
            "kv_events": (
                {
                    "endpoint": events.endpoint,
                    "replay_endpoint": events.replay_endpoint,
                    "topic": events.topic,
                    "block_size": events.block_size,
                    "layout": events.layout,
                }
                if events is not None
                else None
            ),
        }

    @app.get("/get_load")
    async def load() -> list[dict[str, Any]]:
        pool = server.pool
        held = await asyncio.to_thread(lambda: [e.sequences for e in pool.engines])
        return [
            {
                "dp_rank": 0,
                "num_reqs": pool.busy,
                "num_waiting_reqs": pool.waiting,
                "num_tokens": sum(len(t) for seqs in held for t in seqs.values()),
            }
        ]


def _rendered(server: Server, tokens: list[int]) -> dict[str, Any]:
    """A render endpoint's answer: the token ids a generation request would evaluate (vLLM's
    field name, which vllm-router reads), their count and the context limit."""
    return {
        "model": server.model_id,
        "token_ids": tokens,
        "count": len(tokens),
        "max_model_len": server.n_ctx,
    }


# ------------------------------------------------------------------------------------ sessions


def _install_session_routes(app: FastAPI, server: Server) -> None:
    """/v1/sessions: list, save, restore and delete saved sessions (jobs in sessions.py)."""
    limit = server.settings.max_body_bytes

    @app.get("/v1/sessions")
    async def sessions() -> dict[str, Any]:
        return {"object": "list", "data": server.sessions.list()}

    @app.post("/v1/sessions/{session_id}/save")
    async def save_session(session_id: str, request: Request) -> Response:
        path = server.sessions.file(session_id)
        prompt = session_prompt(await read_json(request, limit), server.n_vocab)
        server.sessions.prepare()
        job = save_job(session_id, path, prompt, server.n_ctx)
        return await job_result(request, server.pool, job)

    @app.post("/v1/sessions/{session_id}/restore")
    async def restore_session(session_id: str, request: Request) -> Response:
        path = server.sessions.file(session_id, must_exist=True)
        # No options yet, but the body is read (and bounded) all the same.
        await read_json(request, limit, optional=True)
        job = restore_job(session_id, path, share=server.cache is not None)
        return await job_result(request, server.pool, job)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str) -> dict[str, Any]:
        server.sessions.delete(session_id)
        return {"id": session_id, "object": "session", "deleted": True}


__all__ = ["ClientStreams", "install_routes"]
