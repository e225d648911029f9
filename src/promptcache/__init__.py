"""promptcache: never prefill the same tokens twice.

Public entry points; engines and the server are imported lazily so the core needs no model.
"""

from __future__ import annotations

from promptcache.cache import DEFAULT_BLOCK_SIZE, Hit, PromptCache
from promptcache.codec import FixedWidthCodec, OpaqueCodec, StateCodec
from promptcache.errors import (
    CapacityError,
    CodecError,
    ConfigError,
    ContextOverflowError,
    CorruptEntryError,
    ModelMismatchError,
    PromptCacheError,
    StoreUnavailableError,
)
from promptcache.index import RadixIndex
from promptcache.store import MemoryStore, Store

__version__ = "0.1.0"

_LAZY = {
    "LLM": "promptcache.engines.llama_cpp",
    "GenerationConfig": "promptcache.engines.llama_cpp",
    "Completion": "promptcache.engines.llama_cpp",
    "default_model_path": "promptcache.model",
    "DiskStore": "promptcache.store.disk",
    "RedisStore": "promptcache.store.redis",
    "TieredStore": "promptcache.store.tiered",
    "CacheConfig": "promptcache.config",
    "CacheManager": "promptcache.manager",
    "default_cache": "promptcache.config",
    "CachedCausalLM": "promptcache.lm",
}


def __getattr__(name: str) -> object:
    """Engines, the model finder and the disk store load on first use: the core needs no llama.cpp."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'promptcache' has no attribute {name!r}")


__all__ = [
    "LLM",
    "GenerationConfig",
    "Completion",
    "default_model_path",
    "DiskStore",
    "RedisStore",
    "TieredStore",
    "CacheConfig",
    "CacheManager",
    "default_cache",
    "CachedCausalLM",
    "PromptCache",
    "Hit",
    "DEFAULT_BLOCK_SIZE",
    "FixedWidthCodec",
    "OpaqueCodec",
    "StateCodec",
    "RadixIndex",
    "MemoryStore",
    "Store",
    "PromptCacheError",
    "ModelMismatchError",
    "CorruptEntryError",
    "CapacityError",
    "CodecError",
    "ConfigError",
    "ContextOverflowError",
    "StoreUnavailableError",
]
