"""The OpenAI-compatible HTTP server (`promptcache serve`): engines batching many requests, one shared
prefix cache.

Entry points only; `app` builds the application, `workers` its engines, `pool` runs them, `routes`
and `responses` speak HTTP, `protocol` speaks OpenAI.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from promptcache.server.settings import ServerSettings

if TYPE_CHECKING:
    from fastapi import FastAPI


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI application (see promptcache.server.app.create_app)."""
    from promptcache.server.app import create_app as _create_app

    return _create_app(settings)


def run(settings: ServerSettings) -> None:
    """Load the model(s) and serve until interrupted (blocks). Raises ConfigError for bad settings."""
    import uvicorn

    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("promptcache").setLevel(level)
    app = create_app(settings)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        logging.getLogger(__name__).warning(
            "listening on %s without an API key: anyone who can reach it can use the model",
            settings.host,
        )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )


__all__ = ["ServerSettings", "create_app", "run"]
