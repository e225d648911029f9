"""create_app: the OpenAI-compatible FastAPI application of `promptcache serve`.

Owns the routes: HTTP requests into worker jobs, job events into OpenAI responses and server-sent
events. Never generates on the event loop (the pool's threads do; every worker shares one
PromptCache); prompts are built in prompts.py and session jobs live in sessions.py.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from promptcache.cache import PromptCache
from promptcache.engines.llama_cpp import LLM
from promptcache.engines.sequences import SequenceEngine
from promptcache.errors import ConfigError
from promptcache.server.batching import BatchPool
from promptcache.server.jobs import Ask, Limits, batched_job, generation_job, sampling
from promptcache.server.metrics import Metrics, cache_stats, tier_stats
from promptcache.server.pool import END, Job, QueueFullError, WorkerPool
from promptcache.server.prompts import (
    Prompt,
    chat_messages,
    completion_prompt,
)
from promptcache.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Envelope,
    error_body,
    merge_logprobs,
    parse_json,
    parse_request,
    sse,
)
from promptcache.server.sessions import SessionDirectory, restore_job, save_job, session_prompt
from promptcache.server.settings import ServerSettings

log = logging.getLogger(__name__)

_DISCONNECTED = 499  # nginx's "client closed request": nobody reads it, but logs say what happened


@dataclass
class _Server:
    """What the routes share."""

    settings: ServerSettings
    pool: WorkerPool
    cache: PromptCache | None
    metrics: Metrics
    sessions: SessionDirectory
    model_id: str
    model_path: str
    n_ctx: int
    max_tokens: int
    n_vocab: int
    fingerprint: str
    tokenizer: LLM  # tokenizing reads only the vocabulary: any worker's model, on any thread
    streams: ClientStreams

    @property
    def batched(self) -> bool:
        return isinstance(self.pool, BatchPool)

    @property
    def limits(self) -> Limits:
        return Limits(self.n_ctx, self.max_tokens)

    @property
    def system_fingerprint(self) -> str:
        return "fp_" + self.fingerprint[:12]

    def check_model(self, name: str | None) -> None:
        if name is None or name in (self.model_id, "default", Path(self.model_path).name):
            return
        raise ApiError(
            404,
            f"The model '{name}' does not exist: this server serves '{self.model_id}' (or say 'default')",
            param="model",
            code="model_not_found",
        )


# ------------------------------------------------------------------------------------ app factory


_MANAGERS: list[Any] = []  # cache managers started by load_workers, closed at shutdown


def load_workers(settings: ServerSettings) -> tuple[list[LLM], PromptCache | None]:
    """`settings.workers` LLMs over one shared PromptCache, probed and ready to serve.

    Raises ConfigError for bad cache settings and StoreUnavailableError for an unusable cache directory."""
    from promptcache.config import CacheConfig, build_cache

    cache: PromptCache | None
    if settings.cache == "tiered":
        from promptcache.manager import CacheManager

        # The manager runs the background cleanup (max_age, capacity) for as long as the server lives.
        manager = CacheManager(CacheConfig(config_file=settings.config))
        cache = manager.cache()
        _MANAGERS.append(manager)
    elif settings.cache == "none":
        cache = None
    else:  # "ram" or "disk": the one tier, sized by the server's own settings
        size = {"memory_size" if settings.cache == "ram" else "disk_size": settings.cache_bytes}
        path = {"disk_path": settings.cache_dir} if settings.cache_dir else {}
        cache = build_cache(settings.cache, CacheConfig(**size, **path))
    llms = []
    for _ in range(settings.workers):
        llm = LLM(
            settings.model,
            n_ctx=min(2048, settings.n_ctx or 2048),
            n_threads=settings.threads_per_worker(),
            cache=cache,
            exact=settings.exact,
        )
        _ = llm.exact_batch, llm.fingerprint  # probe now, not during the first request
        llms.append(llm)
    return llms, cache


def batch_engines(settings: ServerSettings, llms: list[LLM], n_ctx: int) -> list[SequenceEngine]:
    """One SequenceEngine per worker LLM, `settings.parallel` sequences of n_ctx tokens each (the
    default context: the model's, at most 4,096). Raises ConfigError when their KV cache would pass
    settings.max_kv_bytes."""
    per_request = settings.n_ctx or min(n_ctx, 4096)
    engines = [
        SequenceEngine(llm, n_seq=settings.parallel, n_ctx=min(per_request, n_ctx)) for llm in llms
    ]
    need = sum(e.kv_bytes for e in engines)
    if need > settings.max_kv_bytes:
        raise ConfigError(
            f"{len(engines)} worker(s) x {settings.parallel} sequences x {engines[0].n_ctx} tokens "
            f"need {need / 2**20:,.0f} MiB of KV cache, over max_kv_bytes "
            f"({settings.max_kv_bytes / 2**20:,.0f} MiB): lower --parallel or --n-ctx, or raise "
            "--max-kv-bytes"
        )
    log.info(
        "continuous batching: %d sequence(s) x %d tokens per worker, KV cache %.0f MiB in all",
        settings.parallel,
        engines[0].n_ctx,
        need / 2**20,
    )
    return engines


def make_pool(settings: ServerSettings, llms: list[LLM], n_ctx: int) -> tuple[WorkerPool, int]:
    """The workers: a BatchPool of SequenceEngines with --parallel > 1 (when the model reuses
    between sequences in its mode), else a WorkerPool of the LLMs; and the context of one request."""
    engines = batch_engines(settings, llms, n_ctx) if settings.parallel > 1 else []
    if engines and not engines[0].shares:
        log.warning(
            "--parallel %d ignored: in exact mode this model reuses nothing between sequences "
            "(strategy %r), so requests run one at a time on each worker's own context",
            settings.parallel,
            llms[0].exact_strategy,
        )
        engines = []
    if not engines:
        return WorkerPool(llms, max_queue=settings.max_queue, expected=(ApiError,)), n_ctx
    pool = BatchPool(
        engines, max_queue=settings.max_queue, expected=(ApiError,), budget=settings.prefill_chunk
    )
    return pool, engines[0].n_ctx


def create_app(settings: ServerSettings | None = None, *, llms: list[LLM] | None = None) -> FastAPI:
    """The server application. Loads `settings.workers` LLMs unless `llms` are given (they must share
    one PromptCache and one model). Raises ConfigError for bad settings and FileNotFoundError for no model."""
    settings = settings or ServerSettings.load()
    if llms is None:
        llms, cache = load_workers(settings)
    else:
        cache = llms[0].cache
        if any(llm.cache is not cache or llm.fingerprint != llms[0].fingerprint for llm in llms):
            raise ValueError("every worker LLM must use the same model, settings and PromptCache")
    first = llms[0]
    n_ctx = min(settings.n_ctx or first.n_ctx_train, first.n_ctx_train)
    if settings.n_ctx and settings.n_ctx > first.n_ctx_train:
        log.warning(
            "n_ctx %d exceeds the model's context of %d; using %d", settings.n_ctx, n_ctx, n_ctx
        )
    pool_ref: list[WorkerPool] = []
    metrics = Metrics(cache, lambda: pool_ref[0] if pool_ref else None)
    pool, n_ctx = make_pool(settings, llms, n_ctx)
    pool_ref.append(pool)
    server = _Server(
        settings=settings,
        pool=pool,
        cache=cache,
        metrics=metrics,
        sessions=SessionDirectory(settings.sessions_path),
        model_id=Path(first.model_path).stem,
        model_path=first.model_path,
        n_ctx=n_ctx,
        max_tokens=min(settings.max_tokens or n_ctx, n_ctx),
        n_vocab=first.n_vocab,
        fingerprint=first.fingerprint,
        tokenizer=first,
        streams=ClientStreams(settings.max_streams_per_client),
    )
    log.info(
        "serving %s (context %d) with %d worker(s) x %d thread(s) x %d request(s) at once, cache %s",
        server.model_id,
        n_ctx,
        pool.size,
        settings.threads_per_worker(),
        settings.parallel,
        settings.cache,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.get_running_loop().run_in_executor(None, pool.close)
        while _MANAGERS:
            _MANAGERS.pop().close()

    app = FastAPI(
        title="promptcache", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.server = server
    if settings.api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=settings.api_key)
    _install_error_handlers(app, server)
    _install_routes(app, server)
    return app


class _ApiKeyMiddleware:
    """401 for every request but /health without `Authorization: Bearer <api key>`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key
            ):
                response = JSONResponse(
                    error_body(
                        "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                        code="invalid_api_key",
                    ),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _install_error_handlers(app: FastAPI, server: _Server) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        route = request.scope.get("route")
        server.metrics.request(getattr(route, "path", "other"), str(exc.status))
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(
            error_body(message, code=code), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(f"internal error: {exc}", type="server_error"), status_code=500
        )


def _as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (ValueError, TypeError)):
        return ApiError(400, str(exc))
    return ApiError(500, f"generation failed: {exc}", type="server_error")


# ------------------------------------------------------------------------------------ request plumbing


async def _read_json(request: Request, limit: int, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object (with `optional`, an empty body is {}); 413 past `limit` bytes (the rest is drained, up to a bound, so the
    client can read the answer), 400 for anything that is not a JSON object."""
    too_big = False
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise ApiError(400, "the Content-Length header is not a number") from None
    chunks: list[bytes] = []
    size = 0
    if not too_big or int(declared or 0) <= 16 * limit:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                too_big = True
                if size > 16 * limit:
                    break
                continue
            chunks.append(chunk)
    if too_big:
        raise ApiError(
            413,
            f"the request body exceeds {limit} bytes (the server's max_body_bytes)",
            code="request_too_large",
        )
    raw = b"".join(chunks)
    if optional and not raw.strip():
        return {}
    return parse_json(raw)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _job_events(request: Request, job: Job) -> AsyncIterator[tuple[Any, ...]]:
    """The job's events until it ends; if the client disconnects first, the job is cancelled and the
    iteration stops. Closing the iterator early cancels the job too."""
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    getter: asyncio.Future[tuple[Any, ...]] | None = None
    try:
        while True:
            getter = asyncio.ensure_future(job.events.get())
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                log.info("client disconnected; stopping its request")
                return
            event = getter.result()
            if event == END:
                return
            yield event
    finally:
        job.cancel()
        watcher.cancel()
        if getter is not None:
            getter.cancel()


def _submit(server: _Server, fn: Callable[[LLM, Job], None]) -> Job:
    job = Job(fn, asyncio.get_running_loop())
    try:
        server.pool.submit(job)
    except QueueFullError as exc:
        raise ApiError(
            503,
            f"all {server.pool.size} worker(s) are busy and {server.pool.max_queue} request(s) wait; "
            f"retry in {exc.retry_after} s",
            type="server_error",
            code="server_busy",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    return job


async def _job_result(
    request: Request, server: _Server, fn: Callable[[LLM, Job], None]
) -> Response:
    """Run a job that emits one ("result", dict) and answer it as JSON."""
    job = _submit(server, fn)
    result = None
    async with aclosing(_job_events(request, job)) as events:
        async for event in events:
            if event[0] == "error":
                raise _as_api_error(event[1])
            if event[0] == "result":
                result = event[1]
    if result is None:
        return Response(status_code=_DISCONNECTED)
    return JSONResponse(result)


# ------------------------------------------------------------------------------------ generation


class ClientStreams:
    """Generations running per client address, bounded by `limit` (None: unbounded): past it, 429
    with Retry-After, so one client cannot take every slot. Used on the event loop only."""

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
        async for chunk in stream:
            yield chunk
    finally:
        release()


def _check_ask(server: _Server, ask: Ask) -> None:
    """400 for what no worker could serve: max_tokens past the server's limit or 0 without echo,
    n past the sequences a batching worker holds."""
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
    if server.batched and ask.n > server.pool.engines[0].n_seq:
        raise ApiError(
            400,
            f"n is too large: {ask.n}; this server batches at most {server.pool.engines[0].n_seq} "
            "sequences per worker (--parallel)",
            param="n",
            code="invalid_value",
        )


async def _generate(request: Request, server: _Server, ask: Ask, req: Any) -> Response:
    """Check the request and the client's running generations, then run it (_run_generation);
    the client's count is released when the answer (or its stream) ends."""
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


async def _run_generation(request: Request, server: _Server, ask: Ask, req: Any) -> Response:
    """Queue the generation, wait for it to start (so errors before the first token are plain 4xx
    answers), then answer as one JSON body or as server-sent events."""
    endpoint = request.scope["route"].path
    make = batched_job if server.batched else generation_job
    job = _submit(server, make(server.limits, server.metrics, endpoint, ask))
    job.slots = ask.n
    events = _job_events(request, job)
    first = await anext(events, None)
    if first is None or first[0] != "start":
        await events.aclose()
        if first is not None and first[0] == "error":
            raise _as_api_error(first[1])
        return Response(status_code=_DISCONNECTED)
    envelope = Envelope(
        "chat" if ask.kind == "chat" else "completion", server.model_id, server.system_fingerprint
    )
    if not req.stream:
        return await _whole_response(events, envelope, ask.n)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(
        _event_stream(events, envelope, n=ask.n, include_usage=include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _whole_response(
    events: AsyncIterator[tuple[Any, ...]], envelope: Envelope, n: int
) -> Response:
    """The generation's pieces joined into one OpenAI response (499 if the client left)."""
    choices: list[dict[str, Any]] = [
        {"text": "", "finish_reason": None, "logprobs": None} for _ in range(n)
    ]
    done = None
    async with aclosing(events):
        async for event in events:
            if event[0] == "piece":
                choice = choices[event[1]]
                choice["text"] += event[2]
                choice["logprobs"] = merge_logprobs(choice["logprobs"], event[3])
            elif event[0] == "done":
                choices[event[1]]["finish_reason"] = event[2]
            elif event[0] == "usage":
                done = event[1]
            elif event[0] == "error":
                raise _as_api_error(event[1])
    if done is None:
        return Response(status_code=_DISCONNECTED)
    return JSONResponse(envelope.response(choices, done))


async def _event_stream(
    events: AsyncIterator[tuple[Any, ...]], envelope: Envelope, *, n: int, include_usage: bool
) -> AsyncIterator[bytes]:
    """The generation as OpenAI's server-sent events, ending with [DONE]."""
    chat = envelope.kind == "chat"
    async with aclosing(events):
        if chat:
            for index in range(n):
                yield sse(envelope.chunk("", role=True, index=index))
        async for event in events:
            if event[0] == "piece":
                yield sse(envelope.chunk(event[2], index=event[1], logprobs=event[3]))
            elif event[0] == "done":
                yield sse(envelope.chunk(None if chat else "", event[2], index=event[1]))
            elif event[0] == "usage" and include_usage:
                yield sse(envelope.usage_chunk(event[1]))
            elif event[0] == "error":
                yield sse(_as_api_error(event[1]).body())
        yield sse("[DONE]")


def _unsupported(condition: object, param: str, what: str) -> None:
    if condition:
        raise ApiError(
            400,
            f"{what} is not supported by this server",
            param=param,
            code="unsupported_parameter",
        )


# ------------------------------------------------------------------------------------ routes


def _install_routes(app: FastAPI, server: _Server) -> None:
    _install_status_routes(app, server)
    _install_generation_routes(app, server)
    _install_tokenizer_routes(app, server)
    _install_session_routes(app, server)


def _install_tokenizer_routes(app: FastAPI, server: _Server) -> None:
    """vLLM's /tokenize, /detokenize and /tokenizer_info: what lm-evaluation-harness's remote
    tokenizer (local-completions, tokenizer_backend=remote) needs to score token-exact requests."""
    limit = server.settings.max_body_bytes

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        special = server.tokenizer.model  # LlamaModel: the vocabulary's special tokens

        def text(token: int) -> str | None:
            return special.token_get_text(token) if token >= 0 else None

        return {
            "tokenizer_class": "llama.cpp",
            "eos_token": text(special.token_eos()),
            "bos_token": text(special.token_bos()),
            "pad_token": None,
            "model_max_length": server.n_ctx,
            "chat_template": special.metadata().get("tokenizer.chat_template"),
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await _read_json(request, limit)
        prompt, add_special = body.get("prompt"), body.get("add_special_tokens", True)
        if not isinstance(prompt, str) or not isinstance(add_special, bool):
            raise ApiError(400, "send {'prompt': str, 'add_special_tokens': bool}", param="prompt")
        tokens = await asyncio.to_thread(server.tokenizer.tokenize, prompt, add_bos=add_special)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.n_ctx}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        tokens = (await _read_json(request, limit)).get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and 0 <= t < server.n_vocab for t in tokens
        ):
            raise ApiError(
                400, f"send {{'tokens': [ids in [0, {server.n_vocab})]}}", param="tokens"
            )
        return {
            "prompt": await asyncio.to_thread(server.tokenizer.detokenize, tokens, special=True)
        }


def _install_status_routes(app: FastAPI, server: _Server) -> None:
    """/health, /v1/models, /v1/cache/stats and /metrics."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": server.model_id,
            "workers": server.pool.size,
            "parallel": server.pool.slots // server.pool.size,
            "busy": server.pool.busy,
            "waiting": server.pool.waiting,
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
        cache = cache_stats(server.cache) if server.cache is not None else None
        return {
            "model": server.model_id,
            "fingerprint": server.fingerprint,
            "context_length": server.n_ctx,
            "workers": {
                "size": server.pool.size,
                "parallel": server.pool.slots // server.pool.size,
                "slots": server.pool.slots,
                "busy": server.pool.busy,
                "kv_bytes": server.pool.kv_bytes,
                "batching": server.pool.engine_stats(),
            },
            "queue": {"waiting": server.pool.waiting, "capacity": server.pool.max_queue},
            "cache": cache,
            "tiers": tier_stats(server.cache) if server.cache is not None else [],
            **server.metrics.snapshot(),
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)


def _install_generation_routes(app: FastAPI, server: _Server) -> None:
    """/v1/completions and /v1/chat/completions."""
    limit = server.settings.max_body_bytes

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_request(CompletionRequest, await _read_json(request, limit))
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
        req = parse_request(ChatCompletionRequest, await _read_json(request, limit))
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
            Prompt(messages=chat_messages(req), stops=req.stops(), param="messages"),
            max_tokens,
            n=req.n,
            sampling=sampling(req, server.n_vocab),
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        )
        return await _generate(request, server, ask, req)


def _install_session_routes(app: FastAPI, server: _Server) -> None:
    """/v1/sessions: list, save, restore and delete saved sessions (jobs in sessions.py)."""
    limit = server.settings.max_body_bytes

    @app.get("/v1/sessions")
    async def sessions() -> dict[str, Any]:
        return {"object": "list", "data": server.sessions.list()}

    @app.post("/v1/sessions/{session_id}/save")
    async def save_session(session_id: str, request: Request) -> Response:
        path = server.sessions.file(session_id)
        prompt = session_prompt(await _read_json(request, limit), server.n_vocab)
        server.sessions.prepare()
        return await _job_result(request, server, save_job(session_id, path, prompt, server.n_ctx))

    @app.post("/v1/sessions/{session_id}/restore")
    async def restore_session(session_id: str, request: Request) -> Response:
        path = server.sessions.file(session_id, must_exist=True)
        # No options yet, but the body is read (and bounded) all the same.
        await _read_json(request, limit, optional=True)
        job = restore_job(session_id, path, share=server.cache is not None)
        return await _job_result(request, server, job)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str) -> dict[str, Any]:
        server.sessions.delete(session_id)
        return {"id": session_id, "object": "session", "deleted": True}
