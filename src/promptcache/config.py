"""CacheConfig: every setting of the cache tiers, from keyword arguments, a TOML/YAML file and
PROMPTCACHE_* environment variables, in that order of precedence; build_cache, the one cache factory.

Owns parsing, validation and which stores a setting builds; stores and caches do the work (see
docs/configuration.md). Never defines a policy, codec or path of its own: it imports theirs.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from promptcache.errors import ConfigError
from promptcache.files import read_settings_file, user_cache_dir
from promptcache.store.compression import CODECS, Compressor
from promptcache.store.disk import DiskStore
from promptcache.store.disk import default_path as default_disk_path
from promptcache.store.memory import MemoryStore
from promptcache.store.policies import POLICIES, POLICY_NAMES

if TYPE_CHECKING:
    from promptcache.artefacts import DatasetCache, ModelCache, SystemCache
    from promptcache.cache import PromptCache
    from promptcache.store.redis import RedisStore
    from promptcache.store.tiered import TieredStore

log = logging.getLogger(__name__)

CONFIG_ENV = "PROMPTCACHE_CONFIG"
"""Environment variable naming a config file, read when no config_file is given."""

CACHE_KINDS = ("ram", "disk", "tiered")
"""The cache names build_cache accepts besides a PromptCache and None."""

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(?:([kmgt])(?:i?b)?|(b))?\s*", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(s|m|h|d)?\s*", re.IGNORECASE)
_NAMESPACE = re.compile(r"[0-9A-Za-z_.-]{1,64}")
_OFF = ("", "none", "null", "off")
_BARE_NUMBER = re.compile(r"\s*\d+(?:\.\d*)?\s*")

TIERS = ("memory", "disk", "redis")
"""The KV tiers, fastest first; each has a section ([cache.memory], ...) of per-tier settings."""

ARTEFACT_CACHES = ("model_cache", "training_cache", "system_cache")
"""The artefact caches' sections (LlamaHome's cache types): derived model files, processed
datasets, temporary files. Each has its own size, path, policy and max_age."""

ARTEFACT_POLICIES = ("lru", "fifo", "time", "ttl", "size")
"""Policies of the artefact caches ("time" and "ttl": oldest written first, with a max_age)."""

SECTION_MB_LIMIT = 10**6
"""A bare `size` in a section at or above this many (MB, so a terabyte or more; as bytes, a megabyte
or more) is refused as ambiguous: write a unit."""

# Names the seed's sections use for promptcache's settings: [cache.memory] type = "lru" is memory_policy.
_SECTION_SYNONYMS = {"type": "policy", "cleanup_policy": "policy", "temp_dir": "path"}
# LlamaHome's environment names; a bare number there is refused (its unit is not documented).
_LLAMAHOME_SIZES = {"CACHE_MEMORY_SIZE": "memory_size", "CACHE_DISK_SIZE": "disk_size"}


def parse_size(value: object) -> int:
    """Bytes from a number (a fraction of a byte is dropped) or a string like "512MB", "4GB", "1.5GiB"
    (1 KB = 1024 bytes). Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("must be a size in bytes, not a bool")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value == value and abs(value) != float("inf"):
        n = int(value)  # bytes computed as a fraction of something (LlamaHome: available * 0.3)
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or m.group(3) or "").lower()])
    else:
        raise ValueError(
            f"{value!r} is not a size; use bytes as an int or a string like '512MB' or '4GB' "
            "(units B, KB, MB, GB, TB, powers of 1024)"
        )
    if n < 0:
        raise ValueError(f"{value!r} is negative; use 0 (tier off) or more bytes")
    return n


def parse_seconds(value: object, *, allow_none: bool) -> float | None:
    """Seconds from a number or a string like "90", "30s", "10m", "2h", "1d". Raises ValueError."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
        if allow_none:
            return None
        raise ValueError("is required; use seconds as a number or a string like '30s', '10m', '2h'")
    if isinstance(value, bool):
        raise ValueError("must be seconds, not a bool")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
        seconds = float(m.group(1)) * _SECONDS[(m.group(2) or "").lower()]
    else:
        raise ValueError(
            f"{value!r} is not a duration; use seconds or a string like '30s', '10m', '2h', '1d'"
        )
    if seconds <= 0:
        raise ValueError(
            f"{value!r} must be more than 0 seconds" + (" (or none)" if allow_none else "")
        )
    return seconds


def _env(name: str, *aliases: str) -> Any:
    """Field(validation_alias=...) reading PROMPTCACHE_<NAME> then the aliases from the environment.

    With populate_by_name, keyword arguments and files still use the field's own name.
    """
    return AliasChoices(f"promptcache_{name}", *aliases)


def keywords_then_environment(
    cls: type[BaseSettings],
    settings_cls: type[BaseSettings],
    init_settings: PydanticBaseSettingsSource,
    env_settings: PydanticBaseSettingsSource,
    dotenv_settings: PydanticBaseSettingsSource,
    file_secret_settings: PydanticBaseSettingsSource,
) -> tuple[PydanticBaseSettingsSource, ...]:
    """pydantic-settings sources of every promptcache settings class: keyword arguments (into which
    the loader has merged the settings file), then the environment; no dotenv or secrets files."""
    return init_settings, env_settings


class CacheConfig(BaseSettings):
    """Settings of the cache tiers; see docs/configuration.md for the table of every setting.

    Sources, highest precedence first: keyword arguments, a TOML or YAML file (`config_file=`, or
    the file named by $PROMPTCACHE_CONFIG), then environment variables PROMPTCACHE_<SETTING>
    (CACHE_MEMORY_SIZE, CACHE_DISK_SIZE and CACHE_POLICY are accepted too, as LlamaHome writes them).
    Raises ConfigError (a ValueError) naming the setting and the accepted values.
    """

    model_config = SettingsConfigDict(
        env_prefix="PROMPTCACHE_",
        extra="forbid",
        validate_default=True,
        frozen=True,
        populate_by_name=True,
    )

    memory_size: int = Field(
        2 << 30,
        validation_alias=_env("memory_size", "cache_memory_size"),
        description="Capacity of the RAM tier; 0 turns the tier off.",
    )
    disk_size: int = Field(
        10 << 30,
        validation_alias=_env("disk_size", "cache_disk_size"),
        description="Capacity of the disk tier (entry files); 0 turns the tier off.",
    )
    disk_path: Path = Field(
        default_factory=default_disk_path,
        validation_alias=_env("disk_path"),
        description="Directory of the disk tier, shared by every process that names it.",
    )
    redis_url: str | None = Field(
        None,
        validation_alias=_env("redis_url"),
        description="Redis of the shared tier (redis://host:port/db, rediss://..., unix:///path); none: no Redis tier.",
    )
    redis_size: int = Field(
        1 << 30,
        validation_alias=_env("redis_size"),
        description="Capacity of the namespace in Redis (packed entries; Redis adds ~100 bytes a key).",
    )
    policy: str = Field(
        "lru",
        validation_alias=_env("policy", "cache_policy"),
        description="Eviction order in every tier: lru, fifo, ttl (needs max_age) or size (largest first).",
    )
    max_age: float | None = Field(
        None,
        validation_alias=_env("max_age"),
        description="Seconds an entry lives in any tier ('30m', '2h' work too); none: until evicted.",
    )
    compression: str = Field(
        "none",
        validation_alias=_env("compression"),
        description="Compression of disk and Redis values: none, zstd or lz4.",
    )
    compression_level: int | None = Field(
        None,
        validation_alias=_env("compression_level"),
        description="Codec level: zstd -7 to 22 (default 3), lz4 0 to 16 (default 0); none: the codec's default. Ignored without compression.",
    )
    cleanup_interval: float = Field(
        60.0,
        validation_alias=_env("cleanup_interval"),
        description="Seconds between background cleanups (max_age, capacity, reconciliation).",
    )
    namespace: str = Field(
        "promptcache",
        validation_alias=_env("namespace"),
        description="Prefix of every Redis key: deployments with different namespaces share nothing.",
    )
    eviction_threshold: float | None = Field(
        None,
        validation_alias=_env("eviction_threshold"),
        description="0 < t <= 1: a put that would exceed a tier's capacity evicts down to t x capacity "
        "(RAM, disk and artefact caches; Redis evicts to capacity). None: 1.0 for the KV tiers, 0.9 for artefact caches.",
    )
    # -- per KV tier ([cache.memory], [cache.disk], [cache.redis]): None inherits the shared setting --
    memory_policy: str | None = Field(
        None,
        validation_alias=_env("memory_policy"),
        description="Eviction order of the RAM tier; none: policy.",
    )
    disk_policy: str | None = Field(
        None,
        validation_alias=_env("disk_policy"),
        description="Eviction order of the disk tier; none: policy.",
    )
    redis_policy: str | None = Field(
        None,
        validation_alias=_env("redis_policy"),
        description="Eviction order of the Redis tier; none: policy.",
    )
    memory_compression: str = Field(
        "none",
        validation_alias=_env("memory_compression"),
        description="Compression of RAM values: none, zstd, lz4 (true: zstd, false: none). Not inherited from compression.",
    )
    disk_compression: str | None = Field(
        None,
        validation_alias=_env("disk_compression"),
        description="Compression of disk values; none: compression.",
    )
    redis_compression: str | None = Field(
        None,
        validation_alias=_env("redis_compression"),
        description="Compression of Redis values; none: compression.",
    )
    memory_cleanup_interval: float | None = Field(
        None,
        validation_alias=_env("memory_cleanup_interval"),
        description="Seconds between cleanups of the RAM tier; none: cleanup_interval.",
    )
    disk_cleanup_interval: float | None = Field(
        None,
        validation_alias=_env("disk_cleanup_interval"),
        description="Seconds between cleanups of the disk tier; none: cleanup_interval.",
    )
    redis_cleanup_interval: float | None = Field(
        None,
        validation_alias=_env("redis_cleanup_interval"),
        description="Seconds between cleanups of the Redis tier; none: cleanup_interval.",
    )
    memory_max_items: int | None = Field(
        None,
        validation_alias=_env("memory_max_items"),
        description="Most entries the RAM tier holds; none: bytes alone limit it.",
    )
    disk_use_mmap: bool = Field(
        False,
        validation_alias=_env("disk_use_mmap"),
        description="Read disk entries through a memory map (one copy of a value instead of two).",
    )
    # -- artefact caches (LlamaHome's model_cache, training_cache, system_cache sections) -------------
    model_cache_size: int = Field(
        1 << 30,
        validation_alias=_env("model_cache_size"),
        description="Capacity of the model cache (derived model files).",
    )
    model_cache_path: Path = Field(
        default_factory=lambda: user_cache_dir("models"),
        validation_alias=_env("model_cache_path"),
        description="Directory of the model cache.",
    )
    model_cache_policy: str = Field(
        "lru",
        validation_alias=_env("model_cache_policy"),
        description="Eviction order of the model cache.",
    )
    model_cache_max_age: float | None = Field(
        None,
        validation_alias=_env("model_cache_max_age"),
        description="Seconds a model artefact lives; none: until evicted.",
    )
    model_cache_format: str = Field(
        "gguf",
        validation_alias=_env("model_cache_format"),
        description="Format of exported model artefacts: gguf or safetensors.",
    )
    model_cache_compression: bool = Field(
        False,
        validation_alias=_env("model_cache_compression"),
        description="Accepted for LlamaHome files; model files stay uncompressed so they can be memory-mapped (a warning says so).",
    )
    training_cache_size: int = Field(
        512 << 20,
        validation_alias=_env("training_cache_size"),
        description="Capacity of the training (dataset) cache.",
    )
    training_cache_path: Path = Field(
        default_factory=lambda: user_cache_dir("datasets"),
        validation_alias=_env("training_cache_path"),
        description="Directory of the training cache.",
    )
    training_cache_policy: str = Field(
        "fifo",
        validation_alias=_env("training_cache_policy"),
        description="Eviction order of the training cache.",
    )
    training_cache_max_age: float | None = Field(
        None,
        validation_alias=_env("training_cache_max_age"),
        description="Seconds a dataset artefact lives; none: until evicted.",
    )
    training_cache_batch_buffer: int = Field(
        32,
        validation_alias=_env("training_cache_batch_buffer"),
        description="Processed batches held before they are appended to the artefact.",
    )
    training_cache_prefetch: int = Field(
        4,
        validation_alias=_env("training_cache_prefetch"),
        description="Batches a background thread makes ahead when streaming.",
    )
    system_cache_size: int = Field(
        256 << 20,
        validation_alias=_env("system_cache_size"),
        description="Capacity of the system cache (temporary files).",
    )
    system_cache_path: Path = Field(
        default_factory=lambda: user_cache_dir("temp"),
        validation_alias=_env("system_cache_path"),
        description="Directory of the system cache (LlamaHome's temp_dir).",
    )
    system_cache_policy: str = Field(
        "time",
        validation_alias=_env("system_cache_policy"),
        description="Eviction order of the system cache.",
    )
    system_cache_max_age: float | None = Field(
        86400.0,
        validation_alias=_env("system_cache_max_age"),
        description="Seconds a temporary artefact lives.",
    )

    def __init__(self, config_file: str | os.PathLike[str] | None = None, **values: Any) -> None:
        """Settings from `values`, then `config_file` (or $PROMPTCACHE_CONFIG), then the environment.

        Raises ConfigError naming the file or the setting that is wrong and what is accepted.
        """
        if config_file is None and os.environ.get(CONFIG_ENV):
            config_file = os.environ[CONFIG_ENV]
        merged = read_config_file(config_file) if config_file else {}
        merged.update(values)
        for variable, setting in _LLAMAHOME_SIZES.items():
            raw = os.environ.get(variable)
            in_use = setting not in merged and f"PROMPTCACHE_{setting.upper()}" not in os.environ
            if in_use and raw is not None and _BARE_NUMBER.fullmatch(raw) and float(raw):
                n = raw.strip()
                raise ConfigError(
                    f"{variable}={raw} has no unit: LlamaHome's files give sizes in MB, promptcache "
                    f"reads bare numbers as bytes; write {variable}={n}MB or {variable}={n}B"
                )
        try:
            super().__init__(**merged)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise ConfigError(
            f"a CacheConfig does not change once made; build another: "
            f"CacheConfig(**{{**config.model_dump(), {name!r}: ...}})"
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> CacheConfig:
        """Settings from `overrides`, then the file at `path`, then the environment. Raises ConfigError."""
        return cls(config_file=path, **overrides)

    # __init__ merges the file under the keyword arguments, so the file outranks the environment.
    settings_customise_sources = classmethod(keywords_then_environment)

    # -- validation -----------------------------------------------------------------------------

    @field_validator(
        "memory_size",
        "disk_size",
        "redis_size",
        "model_cache_size",
        "training_cache_size",
        "system_cache_size",
        mode="before",
    )
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)

    @field_validator(
        "max_age",
        "model_cache_max_age",
        "training_cache_max_age",
        "system_cache_max_age",
        mode="before",
    )
    @classmethod
    def _max_age(cls, value: object) -> float | None:
        return parse_seconds(value, allow_none=True)

    @field_validator("cleanup_interval", mode="before")
    @classmethod
    def _interval(cls, value: object) -> float | None:
        return parse_seconds(value, allow_none=False)

    @field_validator(*(f"{tier}_cleanup_interval" for tier in TIERS), mode="before")
    @classmethod
    def _tier_interval(cls, value: object) -> float | None:
        return parse_seconds(value, allow_none=True)

    @field_validator(
        "policy",
        "compression",
        *(f"{tier}_policy" for tier in TIERS),
        *(f"{tier}_compression" for tier in TIERS),
        *(f"{cache}_policy" for cache in ARTEFACT_CACHES),
        "model_cache_format",
        mode="before",
    )
    @classmethod
    def _choice(cls, value: object, info: Any) -> str | None:
        field = info.field_name
        if value is None and field not in ("policy", "compression", "memory_compression"):
            return None  # a per-tier setting left to the shared one
        if field.endswith("compression") and isinstance(value, bool):
            return "zstd" if value else "none"  # LlamaHome's compression: true
        name = value.strip().lower() if isinstance(value, str) else value
        if field.startswith(ARTEFACT_CACHES):
            accepted: tuple[str, ...] = (
                ("gguf", "safetensors") if field == "model_cache_format" else ARTEFACT_POLICIES
            )
        elif field.endswith("policy"):
            accepted = POLICY_NAMES
            name = "ttl" if name == "time" else name  # the seed's name for oldest-written-first
        else:
            accepted = CODECS
        if name not in accepted:
            raise ValueError(f"{value!r} is not accepted; use one of {', '.join(accepted)}")
        return name

    @field_validator("eviction_threshold", mode="before")
    @classmethod
    def _threshold(cls, value: object) -> float | None:
        if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
            return None
        try:
            if isinstance(value, bool):
                raise TypeError
            threshold = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a fraction; use a number such as 0.9") from None
        if not 0 < threshold <= 1:
            raise ValueError(
                f"{value!r} is out of range; use a fraction above 0 and at most 1 (0.9: evict down to 90%)"
            )
        return threshold

    @field_validator(
        "memory_max_items", "training_cache_batch_buffer", "training_cache_prefetch", mode="before"
    )
    @classmethod
    def _count(cls, value: object, info: Any) -> int | None:
        if info.field_name == "memory_max_items" and (
            value is None or (isinstance(value, str) and value.strip().lower() in _OFF)
        ):
            return None
        low = 0 if info.field_name == "training_cache_prefetch" else 1
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            n = int(str(value).strip()) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise ValueError(
                f"{value!r} is not a whole number; use an int of {low} or more"
            ) from None
        if n < low:
            raise ValueError(f"{value!r} is too small; use an int of {low} or more")
        return n

    @field_validator("compression_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> int | None:
        if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
            return None
        if isinstance(value, bool):
            raise ValueError("must be an int, not a bool")
        try:
            return int(str(value).strip()) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise ValueError(
                f"{value!r} is not an int; use a level such as 1 or 3 (or none)"
            ) from None

    @field_validator("redis_url", mode="before")
    @classmethod
    def _redis_url(cls, value: object) -> str | None:
        if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
            return None
        if not isinstance(value, str) or not re.match(r"(redis|rediss|unix)://", value.strip()):
            raise ValueError(
                f"{value!r} is not a Redis URL; use redis://host:port/db, rediss://host:port/db, "
                "unix:///path/to/socket, or none for no Redis tier"
            )
        return value.strip()

    @field_validator("disk_path", *(f"{cache}_path" for cache in ARTEFACT_CACHES), mode="before")
    @classmethod
    def _disk_path(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; name a directory (default: the user cache dir / 'kv')")
        return Path(os.path.expanduser(str(value))) if isinstance(value, (str, Path)) else value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _NAMESPACE.fullmatch(value):
            raise ValueError(f"{value!r} is not accepted; use 1 to 64 characters of [0-9A-Za-z_.-]")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CacheConfig:
        others = ", ".join(n for n in POLICY_NAMES if not POLICIES[n].needs_max_age)
        for setting in ("policy", *(f"{tier}_policy" for tier in TIERS)):
            name = getattr(self, setting)
            if name is not None and POLICIES[name].needs_max_age and self.max_age is None:
                raise ValueError(
                    f"{setting} {name!r} needs max_age (seconds); set max_age or use {others}"
                )
        for cache in ARTEFACT_CACHES:
            policy = getattr(self, f"{cache}_policy")
            if policy in ("time", "ttl") and getattr(self, f"{cache}_max_age") is None:
                raise ValueError(
                    f"{cache}_policy {policy!r} needs {cache}_max_age (seconds); set it or use lru, fifo, size"
                )
        if not self.memory_size and not self.disk_size and not self.redis_url:
            raise ValueError(
                "every tier is off; give memory_size or disk_size above 0, or a redis_url"
            )
        try:
            for tier in TIERS:
                self.compressor(tier)
        except ConfigError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
        return self

    # -- building -------------------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        """Whether other processes can see the entries (a disk or Redis tier)."""
        return bool(self.disk_size or self.redis_url)

    def tier_policy(self, tier: str) -> str:
        """The eviction policy of KV tier `tier` ("memory", "disk", "redis"): its own, else policy."""
        return getattr(self, f"{tier}_policy") or self.policy

    def tier_cleanup_interval(self, tier: str) -> float:
        """Seconds between cleanups of KV tier `tier`: its own interval, else cleanup_interval."""
        return getattr(self, f"{tier}_cleanup_interval") or self.cleanup_interval

    def compressor(self, tier: str = "disk") -> Compressor:
        """The Compressor of KV tier `tier` (default: disk, whose codec is `compression` unless
        disk_compression says otherwise). compression_level applies to the codec `compression` names;
        a tier with another codec uses that codec's default level. Raises ConfigError for a level out of range.
        """
        name = getattr(self, f"{tier}_compression") or self.compression
        level = self.compression_level if name == self.compression != "none" else None
        try:
            return Compressor(name, level)
        except ValueError as exc:
            raise ConfigError(
                f"invalid cache setting compression_level={self.compression_level!r}: {exc}"
            ) from None

    def _kv_threshold(self) -> float:
        return self.eviction_threshold if self.eviction_threshold is not None else 1.0

    def memory_store(self) -> MemoryStore | None:
        """The RAM tier, or None when memory_size is 0."""
        if not self.memory_size:
            return None
        return MemoryStore(
            self.memory_size,
            policy=self.tier_policy("memory"),
            max_age=self.max_age,
            max_items=self.memory_max_items,
            eviction_threshold=self._kv_threshold(),
            compression=self.compressor("memory"),
        )

    def disk_store(self) -> DiskStore | None:
        """The disk tier, or None when disk_size is 0.

        Raises StoreUnavailableError when the directory or its index cannot be created."""
        if not self.disk_size:
            return None
        return DiskStore(
            self.disk_path,
            self.disk_size,
            policy=self.tier_policy("disk"),
            max_age=self.max_age,
            compression=self.compressor("disk"),
            eviction_threshold=self._kv_threshold(),
            use_mmap=self.disk_use_mmap,
        )

    def redis_store(self) -> RedisStore | None:
        """The Redis tier, or None without a redis_url. Sends nothing until first used."""
        if not self.redis_url:
            return None
        from promptcache.store.redis import RedisStore  # redis-py loads only where a URL is set

        return RedisStore(
            self.redis_url,
            self.redis_size,
            namespace=self.namespace,
            ttl=self.max_age,
            policy=self.tier_policy("redis"),
            compression=self.compressor("redis"),
        )

    def build_store(self) -> TieredStore:
        """A TieredStore of the tiers this config turns on: RAM, then disk, then Redis.

        Raises StoreUnavailableError when the disk directory cannot be created; an unreachable
        Redis does not raise (that tier is skipped until it answers).
        """
        from promptcache.store.tiered import TieredStore

        tiers = [self.memory_store(), self.disk_store(), self.redis_store()]
        return TieredStore([tier for tier in tiers if tier is not None])

    def build_cache(self, name: str = "default") -> PromptCache:
        """A PromptCache over build_store(), its keys under the cache name `name`.

        It probes the store for other processes' entries (shared) when a disk or Redis tier is on.
        Processes that use the same tiers and name share their prefixes.
        """
        from promptcache.cache import PromptCache
        from promptcache.store.tiered import NamespacedStore

        return PromptCache(NamespacedStore(self.build_store(), name), shared=self.shared)

    # -- artefact caches ------------------------------------------------------------------------

    def _artefact_options(self, cache: str) -> dict[str, Any]:
        options: dict[str, Any] = {
            "policy": getattr(self, f"{cache}_policy"),
            "max_age": getattr(self, f"{cache}_max_age"),
        }
        if self.eviction_threshold is not None:
            options["eviction_threshold"] = self.eviction_threshold
        return options

    def model_cache(self) -> ModelCache:
        """The ModelCache of the model_cache settings (opens or creates its directory).

        Raises StoreUnavailableError when the directory cannot be created."""
        from promptcache.artefacts import ModelCache

        if self.model_cache_compression:
            log.warning(
                "model_cache compression = true: model files are kept uncompressed so that llama.cpp "
                "and safetensors can memory-map them (see docs/configuration.md)"
            )
        return ModelCache(
            self.model_cache_path, self.model_cache_size, **self._artefact_options("model_cache")
        )

    def training_cache(self) -> DatasetCache:
        """The DatasetCache of the training_cache settings (opens or creates its directory).

        Raises StoreUnavailableError when the directory cannot be created."""
        from promptcache.artefacts import DatasetCache

        return DatasetCache(
            self.training_cache_path,
            self.training_cache_size,
            batch_buffer=self.training_cache_batch_buffer,
            prefetch=self.training_cache_prefetch,
            **self._artefact_options("training_cache"),
        )

    def system_cache(self) -> SystemCache:
        """The SystemCache of the system_cache settings (opens or creates its directory).

        Raises StoreUnavailableError when the directory cannot be created."""
        from promptcache.artefacts import SystemCache

        return SystemCache(
            self.system_cache_path,
            self.system_cache_size,
            **self._artefact_options("system_cache"),
        )


def build_cache(
    spec: PromptCache | str | None, config: CacheConfig | None = None
) -> PromptCache | None:
    """The cache `spec` names, built from `config` (default: CacheConfig(), the file and environment).

    spec: a PromptCache (returned as is), None (no cache), "ram" (config's RAM tier alone), "disk"
    (its disk tier alone) or "tiered" (every tier it turns on, under the cache name "default"; for
    background cleanup, use CacheManager(config).cache() instead). The config is read only for a
    name. Raises ValueError for another spec, ConfigError for bad settings or a named tier that
    is off (size 0), StoreUnavailableError when the disk directory cannot be created.
    """
    from promptcache.cache import PromptCache

    if spec is None or isinstance(spec, PromptCache):
        return spec
    if spec not in CACHE_KINDS:
        raise ValueError(
            f"cache must be a PromptCache, {', '.join(map(repr, CACHE_KINDS))} or None, not {spec!r}"
        )
    config = config if config is not None else CacheConfig()
    if spec == "tiered":
        return config.build_cache()
    store = config.memory_store() if spec == "ram" else config.disk_store()
    if store is None:
        setting = "memory_size" if spec == "ram" else "disk_size"
        raise ConfigError(f"cache {spec!r} needs {setting} above 0; it is 0 in this config")
    return PromptCache(store)


def default_cache() -> PromptCache:
    """The PromptCache the environment describes (CacheConfig() with no arguments): what LLM(cache="tiered") uses."""
    return CacheConfig().build_cache()


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings of a TOML (or, by suffix .yaml/.yml, YAML) file, flattened to setting names.

    The settings may sit at the top level or under a [cache] table; the artefact sections
    (model_cache, training_cache, system_cache) may also sit at the top level beside [cache].
    Nested tables join their names with "_" ([cache.disk] path = ... is disk_path); in them `type`
    and `cleanup_policy` mean policy and `temp_dir` means path. A bare number as a section's `size`
    is MB, as LlamaHome documents ([cache.memory] size = 1000 is 1000 MB); at or above
    SECTION_MB_LIMIT it is refused as ambiguous. Raises ConfigError, also for a setting given twice.
    """
    values = read_settings_file(path)
    table = values
    if isinstance(values.get("cache"), dict):
        table = dict(values["cache"])
        for section in ARTEFACT_CACHES:
            if isinstance(values.get(section), dict):
                if isinstance(table.get(section), dict):
                    raise ConfigError(
                        f"{path}: {section} is given both at the top level and under [cache]; keep one"
                    )
                table[section] = values[section]
    prefix = "cache." if table is not values else ""
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}

    def add(setting: str, value: Any, spelled: str) -> None:
        if setting in flat:
            raise ConfigError(
                f"{path}: {setting} is set twice, by {where[setting]} and by {spelled}; keep one"
            )
        flat[setting], where[setting] = value, spelled

    for key, value in table.items():
        name = str(key).replace("-", "_")
        if not isinstance(value, dict):
            add(name, value, f"{prefix}{key}")
            continue
        section = f"{'cache.' if name in TIERS and prefix else ''}{name}"
        for sub, inner in value.items():
            sub_name = str(sub).replace("-", "_")
            sub_name = _SECTION_SYNONYMS.get(sub_name, sub_name)
            spelled = f"[{section}] {sub}"
            if sub_name == "size":
                inner = _section_size(inner, spelled)
            add(f"{name}_{sub_name}", inner, spelled)
    return flat


def _section_size(value: Any, spelled: str) -> Any:
    """A section's `size`: a bare number is MB (LlamaHome's unit); one so large that bytes seem meant is refused."""
    if isinstance(value, bool) or not (
        isinstance(value, (int, float))
        or (isinstance(value, str) and _BARE_NUMBER.fullmatch(value))
    ):
        return value  # a string with a unit, or something the validator refuses with its message
    text = str(value).strip()
    n = float(text)
    if n == 0:
        return 0
    if n >= SECTION_MB_LIMIT:
        raise ConfigError(
            f"{spelled} = {value!r} is ambiguous: a bare number there is MB (as LlamaHome documents), "
            f"which makes {n / (1 << 20):,.1f} TB; write '{text}B' if you meant bytes "
            f"or '{text}MB' if you meant megabytes"
        )
    return f"{text}MB"


def _describe(exc: ValidationError) -> str:
    fields = CacheConfig.model_fields
    aliases = {}
    for name, info in fields.items():
        alias = info.validation_alias
        for choice in getattr(alias, "choices", []):
            aliases[str(choice).lower()] = name
    problems = []
    for err in exc.errors():
        loc = str(err["loc"][0]) if err["loc"] else ""
        name = aliases.get(loc.lower(), loc)
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown cache setting {loc!r}; the settings are {', '.join(fields)}")
        elif name in fields:
            problems.append(f"invalid cache setting {name}={err.get('input')!r}: {msg}")
        else:
            problems.append(f"invalid cache settings: {msg}")
    return "; ".join(problems)


__all__ = [
    "ARTEFACT_CACHES",
    "CACHE_KINDS",
    "CacheConfig",
    "TIERS",
    "build_cache",
    "default_cache",
    "default_disk_path",
    "parse_size",
    "parse_seconds",
    "read_config_file",
]
