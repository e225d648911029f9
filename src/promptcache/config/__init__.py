"""Configuration: CacheConfig (settings nested per tier and artefact cache), its units and files, and
build_cache, the one factory of a PromptCache from a name. Owns the names users import; no logic here.
"""

from promptcache.config.factory import CACHE_KINDS, build_cache, default_cache, tiered_cache
from promptcache.config.files import CONFIG_ENV, SECTION_MB_LIMIT, read_config_file
from promptcache.config.sections import ARTEFACT_CACHES, ARTEFACT_POLICIES, TIERS
from promptcache.config.settings import CacheConfig, keywords_then_environment
from promptcache.config.units import parse_seconds, parse_size
from promptcache.store.disk import default_path as default_disk_path

__all__ = [
    "ARTEFACT_CACHES",
    "ARTEFACT_POLICIES",
    "CACHE_KINDS",
    "CONFIG_ENV",
    "CacheConfig",
    "SECTION_MB_LIMIT",
    "TIERS",
    "build_cache",
    "default_cache",
    "default_disk_path",
    "keywords_then_environment",
    "parse_seconds",
    "parse_size",
    "read_config_file",
    "tiered_cache",
]
