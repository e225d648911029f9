"""PromptCache and its rooms: the coordinator, the plan, the read, the ledger, merges and whole states.

Owns the names engines import (PromptCache, Hit, CacheStats, DEFAULT_BLOCK_SIZE); holds no logic.
"""

from promptcache.cache.hit import Hit
from promptcache.cache.prompt_cache import DEFAULT_BLOCK_SIZE, PromptCache
from promptcache.cache.stats import CacheStats
from promptcache.codec import FixedWidthCodec

__all__ = ["PromptCache", "Hit", "CacheStats", "DEFAULT_BLOCK_SIZE", "FixedWidthCodec"]
