"""The one factory: a PromptCache from what a user names (`cache="tiered"`), or theirs passed through.

Owns the cache names and which stores each builds from a CacheConfig; never reads a setting itself
(settings.py does) and never runs a cleanup (CacheManager does).
"""

from __future__ import annotations

from promptcache.cache import DEFAULT_BLOCK_SIZE, PromptCache
from promptcache.config.settings import CacheConfig
from promptcache.errors import ConfigError
from promptcache.store import Store
from promptcache.store.tiered import NamespacedStore

CACHE_KINDS = ("ram", "disk", "tiered", "none")
"""The cache names build_cache accepts besides a PromptCache and None ("none" is None)."""

DEFAULT_CACHE_NAME = "default"
"""The cache name of build_cache("tiered") and of CacheManager.cache() when unnamed."""


def build_cache(
    cache: PromptCache | str | None, config: CacheConfig | None = None
) -> PromptCache | None:
    """The cache `cache` names, built from `config` (default: CacheConfig(), the file and environment).

    cache: a PromptCache (returned as it is), None or "none" (no cache), "ram" (config's RAM tier
    alone), "disk" (its disk tier alone) or "tiered" (every tier it turns on, under the cache name
    "default"; for background cleanup, use CacheManager(config).cache() instead). The config is read
    only for a name. Raises ValueError for another name, ConfigError for bad settings or a named tier
    that is off (size 0), StoreUnavailableError when the disk directory cannot be created.
    """
    if cache is None or isinstance(cache, PromptCache):
        return cache
    if cache not in CACHE_KINDS:
        raise ValueError(
            f"cache must be a PromptCache, 'ram', 'disk', 'tiered' or None ('none' means None), "
            f"not {cache!r}"
        )
    if cache == "none":
        return None
    config = config if config is not None else CacheConfig()
    if cache == "tiered":
        return tiered_cache(config.build_store())
    store = config.memory_store() if cache == "ram" else config.disk_store()
    if store is None:
        setting = "memory_size" if cache == "ram" else "disk_size"
        raise ConfigError(f"cache {cache!r} needs {setting} above 0; it is 0 in this config")
    return PromptCache(store)


def tiered_cache(
    tiers: Store, name: str = DEFAULT_CACHE_NAME, *, block_size: int = DEFAULT_BLOCK_SIZE
) -> PromptCache:
    """The PromptCache called `name` over `tiers` (a TieredStore, or any store): its keys are
    "<name>:..." there, so processes using the same tiers and name share prefixes. It probes the
    store for other processes' entries when a tier is persistent (disk, Redis). What
    build_cache("tiered") and CacheManager.cache(name) hand out. Raises ValueError for a name
    outside [0-9a-z_-]{1,32}."""
    return PromptCache(NamespacedStore(tiers, name), block_size=block_size)


def default_cache() -> PromptCache:
    """build_cache("tiered"): the PromptCache the environment describes (CacheConfig())."""
    return tiered_cache(CacheConfig().build_store())


__all__ = ["CACHE_KINDS", "DEFAULT_CACHE_NAME", "build_cache", "default_cache", "tiered_cache"]
