"""create_app: the OpenAI-compatible FastAPI application of `promptcache serve`.

Owns the application: what the routes share (Server), the API key, error answers and shutdown. The
workers are built in workers.py, the routes live in routes.py, responses in responses.py; nothing
generates on the event loop (the pool's threads do, over one shared PromptCache).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from promptcache.cache import PromptCache
from promptcache.engines.llama_cpp import LLM
from promptcache.server.jobs import Limits
from promptcache.server.kv_events import KVEventPublisher
from promptcache.server.metrics import Metrics
from promptcache.server.pool import EnginePool
from promptcache.server.protocol import ApiError, error_body
from promptcache.server.routes import ClientStreams, install_routes
from promptcache.server.sessions import SessionDirectory
from promptcache.server.settings import ServerSettings
from promptcache.server.workers import Workers, load_workers

log = logging.getLogger(__name__)


@dataclass
class Server:
    """What the routes share."""

    settings: ServerSettings
    workers: Workers
    metrics: Metrics
    sessions: SessionDirectory
    streams: ClientStreams

    @property
    def pool(self) -> EnginePool:
        return self.workers.pool

    @property
    def cache(self) -> PromptCache | None:
        return self.workers.cache

    @property
    def events(self) -> KVEventPublisher | None:
        return self.workers.events

    @property
    def tokenizer(self) -> LLM:
        """Tokenizing reads only the vocabulary: any worker's model, on any thread."""
        return self.pool.workers[0].llm

    @property
    def model_path(self) -> str:
        return self.workers.engine.model.path

    @property
    def model_id(self) -> str:
        return Path(self.model_path).stem

    @property
    def n_vocab(self) -> int:
        return self.workers.engine.n_vocab

    @property
    def n_ctx(self) -> int:
        return self.workers.n_ctx

    @property
    def max_tokens(self) -> int:
        return min(self.settings.max_tokens or self.n_ctx, self.n_ctx)

    @property
    def fingerprint(self) -> str:
        return self.workers.engine.fingerprint

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


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """The server application: loads the model and its workers. Raises ConfigError for bad settings
    and FileNotFoundError for no model."""
    settings = settings or ServerSettings.load()
    pool_ref: list[EnginePool] = []
    workers = load_workers(settings, expected=(ApiError,))
    pool_ref.append(workers.pool)
    server = Server(
        settings=settings,
        workers=workers,
        metrics=Metrics(workers.cache, lambda: pool_ref[0] if pool_ref else None, workers.events),
        sessions=SessionDirectory(settings.sessions_path),
        streams=ClientStreams(settings.max_streams_per_client),
    )
    log.info(
        "serving %s (context %d per request), cache %s",
        server.model_id,
        server.n_ctx,
        settings.cache,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.get_running_loop().run_in_executor(None, workers.close)

    app = FastAPI(
        title="promptcache", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.server = server
    if settings.api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=settings.api_key)
    _install_error_handlers(app, server)
    install_routes(app, server)
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


def _install_error_handlers(app: FastAPI, server: Server) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        route = request.scope.get("route")
        server.metrics.request(route.path if route is not None else "other", str(exc.status))
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


__all__ = ["Server", "create_app"]
