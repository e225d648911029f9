"""The server's workers: the shared prefix cache, the model loaded once, and one Engine per worker with
as many sequences as --parallel (auto: what the KV budget holds).

Owns turning ServerSettings into engines and the pool over them; never speaks HTTP and never runs a
request (pool.py and jobs.py do).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from promptcache.cache import PromptCache
from promptcache.engines.llama_cpp import Engine, Model
from promptcache.errors import ConfigError
from promptcache.server.pool import EnginePool
from promptcache.server.settings import ServerSettings

log = logging.getLogger(__name__)

DEFAULT_N_CTX = (
    4096  # tokens one request may hold unless --n-ctx says otherwise (at most the model's)
)
AUTO_PARALLEL = (
    4,
    16,
)  # --parallel auto: at least 4 sequences, at most 16 (the probe's largest group)


@dataclass
class Workers:
    """What create_app serves with: the pool, its engines, the shared cache, the context of one
    request, and cache managers to close at shutdown."""

    pool: EnginePool
    cache: PromptCache | None
    n_ctx: int
    managers: list[Any] = field(default_factory=list)

    @property
    def engine(self) -> Engine:
        return self.pool.engines[0]

    def close(self) -> None:
        self.pool.close()
        while self.managers:
            self.managers.pop().close()


def shared_cache(settings: ServerSettings) -> tuple[PromptCache | None, list[Any]]:
    """The prefix cache every worker shares (and the managers that clean it up in the background).
    Raises ConfigError for bad cache settings and StoreUnavailableError for an unusable directory."""
    from promptcache.config import CacheConfig, build_cache

    if settings.cache == "tiered":
        from promptcache.manager import CacheManager

        # The manager runs the background cleanup (max_age, capacity) for as long as the server lives.
        manager = CacheManager(CacheConfig(config_file=settings.config))
        return manager.cache(), [manager]
    if settings.cache == "none":
        return None, []
    size = {"memory_size" if settings.cache == "ram" else "disk_size": settings.cache_bytes}
    path = {"disk_path": settings.cache_dir} if settings.cache_dir else {}
    return build_cache(settings.cache, CacheConfig(**size, **path)), []


def request_context(settings: ServerSettings, model: Model) -> int:
    """Tokens one request may hold: --n-ctx, else the model's context up to DEFAULT_N_CTX."""
    n_train = model.n_ctx_train
    if settings.n_ctx and settings.n_ctx > n_train:
        log.warning(
            "n_ctx %d exceeds the model's context of %d; using %d", settings.n_ctx, n_train, n_train
        )
    return min(settings.n_ctx or DEFAULT_N_CTX, n_train)


def parallel(settings: ServerSettings, model: Model, n_ctx: int) -> int:
    """Sequences per worker: --parallel, or (auto) as many as max_kv_bytes holds at n_ctx tokens
    each, from 4 to 16. Raises ConfigError when they do not fit max_kv_bytes."""
    per_sequence = -(-n_ctx // 256) * 256 * model.kv_bytes_per_token  # llama.cpp pads to 256 cells
    budget = settings.max_kv_bytes // settings.workers
    if settings.parallel == "auto":
        low, high = AUTO_PARALLEL
        n = max(low, min(high, budget // per_sequence))
    else:
        n = int(settings.parallel)
    need = settings.workers * n * per_sequence
    if need > settings.max_kv_bytes:
        raise ConfigError(
            f"{settings.workers} worker(s) x {n} sequences x {n_ctx} tokens need "
            f"{need / 2**20:,.0f} MiB of KV cache, over max_kv_bytes "
            f"({settings.max_kv_bytes / 2**20:,.0f} MiB): lower --parallel or --n-ctx, or raise "
            "--max-kv-bytes"
        )
    return n


def load_workers(settings: ServerSettings, expected: tuple[type[Exception], ...]) -> Workers:
    """The engines (probed and ready to serve) and their pool. Raises ConfigError for bad settings
    and FileNotFoundError for no model."""
    cache, managers = shared_cache(settings)
    model = Model(settings.model)
    n_ctx = request_context(settings, model)
    n_seq = parallel(settings, model, n_ctx)
    first = Engine(
        model,
        cache=cache,
        n_seq=n_seq,
        n_ctx=n_ctx,
        n_threads=settings.threads_per_worker(),
        exact=settings.exact,
        exact_chunk=settings.exact_chunk,
    )
    _ = first.exact_batch, first.fingerprint  # probe now, not during the first request
    engines = [first] + [first.sibling() for _ in range(settings.workers - 1)]
    pool = EnginePool(
        engines, max_queue=settings.max_queue, budget=settings.prefill_budget, expected=expected
    )
    log.info(
        "%d worker(s) x %d sequence(s) of %d tokens (--parallel %s), KV cache %.0f MiB in all",
        settings.workers,
        n_seq,
        engines[0].n_ctx,
        settings.parallel,
        pool.kv_bytes / 2**20,
    )
    return Workers(pool, cache, engines[0].n_ctx, managers)


__all__ = ["AUTO_PARALLEL", "DEFAULT_N_CTX", "Workers", "load_workers", "parallel", "shared_cache"]
