"""CacheConfig: every setting of the cache tiers, from keyword arguments, a TOML/YAML file and
PROMPTCACHE_* environment variables, in that order of precedence; build_cache, the one cache factory.

Owns parsing, validation and which stores a setting builds; stores and caches do the work (see
docs/configuration.md). Never defines a policy, codec or path of its own: it imports theirs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from promptcache.errors import ConfigError
from promptcache.files import read_settings_file
from promptcache.store.compression import CODECS, Compressor
from promptcache.store.disk import DiskStore
from promptcache.store.disk import default_path as default_disk_path
from promptcache.store.memory import MemoryStore
from promptcache.store.policies import POLICIES, POLICY_NAMES

if TYPE_CHECKING:
    from promptcache.cache import PromptCache
    from promptcache.store.redis import RedisStore
    from promptcache.store.tiered import TieredStore

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


def parse_size(value: object) -> int:
    """Bytes from an int or a string like "512MB", "4GB", "1.5GiB" (1 KB = 1024 bytes). Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("must be a size in bytes, not a bool")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
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

    def __init__(self, config_file: str | os.PathLike[str] | None = None, **values: Any) -> None:
        """Settings from `values`, then `config_file` (or $PROMPTCACHE_CONFIG), then the environment.

        Raises ConfigError naming the file or the setting that is wrong and what is accepted.
        """
        if config_file is None and os.environ.get(CONFIG_ENV):
            config_file = os.environ[CONFIG_ENV]
        merged = read_config_file(config_file) if config_file else {}
        merged.update(values)
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

    @field_validator("memory_size", "disk_size", "redis_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)

    @field_validator("max_age", mode="before")
    @classmethod
    def _max_age(cls, value: object) -> float | None:
        return parse_seconds(value, allow_none=True)

    @field_validator("cleanup_interval", mode="before")
    @classmethod
    def _interval(cls, value: object) -> float | None:
        return parse_seconds(value, allow_none=False)

    @field_validator("policy", "compression", mode="before")
    @classmethod
    def _choice(cls, value: object, info: Any) -> str:
        accepted = POLICY_NAMES if info.field_name == "policy" else CODECS
        name = value.strip().lower() if isinstance(value, str) else value
        if name not in accepted:
            raise ValueError(f"{value!r} is not accepted; use one of {', '.join(accepted)}")
        return name

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

    @field_validator("disk_path", mode="before")
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
        if POLICIES[self.policy].needs_max_age and self.max_age is None:
            others = ", ".join(n for n in POLICY_NAMES if not POLICIES[n].needs_max_age)
            raise ValueError(
                f"policy {self.policy!r} needs max_age (seconds); set max_age or use {others}"
            )
        if not self.memory_size and not self.disk_size and not self.redis_url:
            raise ValueError(
                "every tier is off; give memory_size or disk_size above 0, or a redis_url"
            )
        try:
            if self.compression != "none":
                Compressor(self.compression, self.compression_level)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return self

    # -- building -------------------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        """Whether other processes can see the entries (a disk or Redis tier)."""
        return bool(self.disk_size or self.redis_url)

    def compressor(self) -> Compressor:
        """The Compressor for disk and Redis values. Raises ConfigError for a level out of range."""
        try:
            return Compressor(
                self.compression, self.compression_level if self.compression != "none" else None
            )
        except ValueError as exc:
            raise ConfigError(
                f"invalid cache setting compression_level={self.compression_level!r}: {exc}"
            ) from None

    def memory_store(self) -> MemoryStore | None:
        """The RAM tier, or None when memory_size is 0."""
        if not self.memory_size:
            return None
        return MemoryStore(self.memory_size, policy=self.policy, max_age=self.max_age)

    def disk_store(self) -> DiskStore | None:
        """The disk tier, or None when disk_size is 0.

        Raises StoreUnavailableError when the directory or its index cannot be created."""
        if not self.disk_size:
            return None
        return DiskStore(
            self.disk_path,
            self.disk_size,
            policy=self.policy,
            max_age=self.max_age,
            compression=self.compressor(),
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
            policy=self.policy,
            compression=self.compressor(),
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

    The settings may sit at the top level or under a [cache] table; nested tables join their
    names with "_" ([cache.disk] path = ... is disk_path). Raises ConfigError.
    """
    values = read_settings_file(path)
    if isinstance(values.get("cache"), dict):
        values = values["cache"]
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if isinstance(value, dict):
            for sub, inner in value.items():
                flat[f"{name}_{str(sub).replace('-', '_')}"] = inner
        else:
            flat[name] = value
    return flat


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
    "CACHE_KINDS",
    "CacheConfig",
    "build_cache",
    "default_cache",
    "default_disk_path",
    "parse_size",
    "parse_seconds",
    "read_config_file",
]
