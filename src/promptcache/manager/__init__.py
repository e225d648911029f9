"""CacheManager (cache_manager.py) with its background cleanup (cleanup.py) and its reporting
(reporting.py). Owns the names users import; no logic here.
"""

from promptcache.manager.cache_manager import (
    DEFAULT_CACHE,
    HASHED_KEY_PREFIX,
    CacheManager,
    storage_key,
)
from promptcache.manager.cleanup import Done
from promptcache.manager.reporting import EntryInfo

__all__ = ["CacheManager", "Done", "EntryInfo", "DEFAULT_CACHE", "HASHED_KEY_PREFIX", "storage_key"]
