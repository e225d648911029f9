"""The server's workers: the shared prefix cache, the model loaded once, and one Engine per worker with
as many sequences as --parallel (auto: what the KV budget holds), and the KV-event publisher that
hears what they hold.

Owns turning ServerSettings into engines, the pool over them and the publisher's listeners; never
speaks HTTP and never runs a request (pool.py and jobs.py do).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from promptcache.cache import PromptCache
from promptcache.engines.llama_cpp import Engine, Model
from promptcache.errors import ConfigError
from promptcache.server.kv_events import LIVE, KVEventPublisher, cache_medium
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
    events: KVEventPublisher | None = None

    @property
    def engine(self) -> Engine:
        return self.pool.engines[0]

    def reset_prefix_cache(self) -> int:
        """Forget what this server holds but what running requests use: the engines' idle
        sequences and the prefix cache (vLLM's /reset_prefix_cache); KV-event consumers get
        AllBlocksCleared and then what is still held. Returns the sequences dropped."""
        dropped = self.pool.free_idle()
        if self.cache is not None:
            self.cache.clear()
        if self.events is not None:
            self.events.reset()
        return dropped

    def close(self) -> None:
        self.pool.close()
        if self.events is not None:
            self.events.close()
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
    events = kv_events(settings, engines, cache)
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
    return Workers(pool, cache, engines[0].n_ctx, managers, events)


def kv_events(
    settings: ServerSettings, engines: list[Engine], cache: PromptCache | None
) -> KVEventPublisher | None:
    """The KV-event publisher (--kv-events), listening to every engine's live sequences (medium
    GPU) and to the prefix cache's entries of the server's model (CPU for a RAM tier, DISK for a
    disk tier; a Redis tier alone is shared by the fleet and says nothing about this server), or
    None. Raises ConfigError when an endpoint cannot be bound."""
    if not settings.kv_events:
        return None
    import zmq

    try:
        publisher = KVEventPublisher(
            settings.kv_events,
            block_size=settings.kv_events_block_size,
            layout=settings.kv_events_layout,
            topic=settings.kv_events_topic,
            replay=settings.kv_events_replay,
        )
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot publish KV events on {settings.kv_events}: {exc}") from None
    for engine in engines:
        engine.listen(publisher.listener(LIVE), granularity=settings.kv_events_block_size)
    medium = cache_medium(cache.store) if cache is not None else None
    if cache is not None and medium is not None:
        cache.listen(publisher.listener(medium), fingerprint=engines[0].fingerprint)
    return publisher


__all__ = [
    "AUTO_PARALLEL",
    "DEFAULT_N_CTX",
    "Workers",
    "kv_events",
    "load_workers",
    "parallel",
    "shared_cache",
]
