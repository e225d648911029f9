"""CacheConfig: every setting of the cache tiers and artefact caches, nested per section, from keyword
arguments, a TOML/YAML file and PROMPTCACHE_* environment variables, in that order of precedence.

Owns the sources and their precedence, the shared settings, the checks across sections and the
stores and caches a config describes; never parses a unit or a file itself (units.py, files.py).
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from promptcache.config.files import CONFIG_ENV, read_config_file
from promptcache.config.sections import (
    ARTEFACT_CACHES,
    FLAT_NAMES,
    TIERS,
    ArtefactSections,
    ArtefactSettings,
    DiskSettings,
    MemorySettings,
    RedisSettings,
    TierSettings,
    choose,
    merge,
    nest,
    pick,
)
from promptcache.config.units import BARE_NUMBER, is_off, parse_count, parse_seconds
from promptcache.errors import ConfigError
from promptcache.store.compression import CODECS, Compressor
from promptcache.store.disk import DiskStore
from promptcache.store.memory import MemoryStore
from promptcache.store.policies import POLICIES, POLICY_NAMES

if TYPE_CHECKING:
    from promptcache.artefacts import DatasetCache, ModelCache, SystemCache
    from promptcache.cache import PromptCache
    from promptcache.store.redis import RedisStore
    from promptcache.store.tiered import TieredStore

log = logging.getLogger(__name__)

_NAMESPACE = re.compile(r"[0-9A-Za-z_.-]{1,64}")

LLAMAHOME_VARIABLES = {
    "CACHE_MEMORY_SIZE": "memory_size",
    "CACHE_DISK_SIZE": "disk_size",
    "CACHE_POLICY": "policy",
}
"""LlamaHome's environment names and the setting each sets, read after PROMPTCACHE_*. A bare
number as one of its sizes is refused: LlamaHome does not say its unit."""


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


class SectionEnvironment(PydanticBaseSettingsSource):
    """The sections' settings from the environment, by their flat names (PROMPTCACHE_MEMORY_SIZE
    is memory.size, PROMPTCACHE_MODEL_CACHE_MAX_AGE artefacts.model_cache.max_age), and below them
    LLAMAHOME_VARIABLES; a pydantic-settings source (names in any case, as pydantic-settings reads
    PROMPTCACHE_ names)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads every variable at once

    def __call__(self) -> dict[str, Any]:
        environ = {name.upper(): value for name, value in os.environ.items()}
        values = {name: environ[var] for var, name in LLAMAHOME_VARIABLES.items() if var in environ}
        for name in FLAT_NAMES:
            if (var := f"PROMPTCACHE_{name.upper()}") in environ:
                values[name] = environ[var]
        return nest(values)


class CacheConfig(BaseSettings):
    """Settings of the cache tiers and artefact caches; see docs/configuration.md for every setting.

    Sections: memory, disk, redis (the KV tiers, TierSettings) and model_cache, training_cache,
    system_cache (ArtefactSettings): `config.disk.path`. Their flat names still work everywhere:
    `CacheConfig(memory_size="4GB")`, `config.memory_size`, `memory_size = "4GB"` in a file and
    PROMPTCACHE_MEMORY_SIZE. The settings outside the sections are shared by the tiers.

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
    )

    memory: MemorySettings = Field(default_factory=MemorySettings)
    disk: DiskSettings = Field(default_factory=DiskSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    policy: str = Field(
        "lru",
        description="Eviction order in every tier: lru, fifo, ttl (needs max_age) or size (largest first).",
    )
    max_age: float | None = Field(
        None,
        description="Seconds an entry lives in any tier ('30m', '2h' work too); none: until evicted.",
    )
    compression: str = Field(
        "none", description="Compression of disk and Redis values: none, zstd or lz4."
    )
    compression_level: int | None = Field(
        None,
        description="Codec level: zstd -7 to 22 (default 3), lz4 0 to 16 (default 0); none: the codec's default. Ignored without compression.",
    )
    cleanup_interval: float = Field(
        60.0, description="Seconds between background cleanups (max_age, capacity, reconciliation)."
    )
    namespace: str = Field(
        "promptcache",
        description="Prefix of every Redis key: deployments with different namespaces share nothing.",
    )
    eviction_threshold: float | None = Field(
        None,
        description="0 < t <= 1: a put that would exceed a tier's capacity evicts down to t x capacity "
        "(RAM, disk and artefact caches; Redis evicts to capacity). None: 1.0 for the KV tiers, 0.9 for artefact caches.",
    )
    artefacts: ArtefactSections = Field(default_factory=ArtefactSections)

    def __init__(self, config_file: str | os.PathLike[str] | None = None, **values: Any) -> None:
        """Settings from `values`, then `config_file` (or $PROMPTCACHE_CONFIG), then the environment.

        Raises ConfigError naming the file or the setting that is wrong and what is accepted.
        """
        if config_file is None and os.environ.get(CONFIG_ENV):
            config_file = os.environ[CONFIG_ENV]
        merged = merge(nest(read_config_file(config_file)) if config_file else {}, nest(values))
        _refuse_unitless_llamahome_sizes(merged)
        try:
            super().__init__(**merged)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    def __getattr__(self, name: str) -> Any:
        """A section's field by its flat name: config.memory_size is config.memory.size."""
        place = FLAT_NAMES.get(name)
        if place is None:
            return super().__getattr__(name)  # type: ignore[misc]
        value: Any = self
        for part in place:  # a flat name's place: its section(s), then the field
            value = value.__dict__[part]
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise ConfigError(
            f"a CacheConfig does not change once made; build another: "
            f"CacheConfig(**{{**config.model_dump(), {name!r}: ...}})"
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> CacheConfig:
        """Settings from `overrides`, then the file at `path`, then the environment. Raises ConfigError."""
        return cls(config_file=path, **overrides)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments (__init__ merged the file under them, so it outranks the environment),
        then PROMPTCACHE_* (the shared settings, then the sections'), then LlamaHome's variables."""
        return init_settings, env_settings, SectionEnvironment(settings_cls)

    # -- validation -----------------------------------------------------------------------------

    @field_validator("max_age", mode="before")
    @classmethod
    def _max_age(cls, value: object) -> float | None:
        return parse_seconds(value, allow_none=True)

    @field_validator("cleanup_interval", mode="before")
    @classmethod
    def _interval(cls, value: object) -> float | None:
        return parse_seconds(value, allow_none=False)

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, value: object) -> str | None:
        value = "ttl" if isinstance(value, str) and value.strip().lower() == "time" else value
        return choose(value, POLICY_NAMES, allow_none=False)

    @field_validator("compression", mode="before")
    @classmethod
    def _compression(cls, value: object) -> str | None:
        if isinstance(value, bool):
            return "zstd" if value else "none"
        return choose(value, CODECS, allow_none=False)

    @field_validator("eviction_threshold", mode="before")
    @classmethod
    def _threshold(cls, value: object) -> float | None:
        if is_off(value):
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

    @field_validator("compression_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> int | None:
        if is_off(value):
            return None
        try:
            return parse_count(value, -(1 << 31))
        except ValueError:
            raise ValueError(
                f"{value!r} is not an int; use a level such as 1 or 3 (or none)"
            ) from None

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _NAMESPACE.fullmatch(value):
            raise ValueError(f"{value!r} is not accepted; use 1 to 64 characters of [0-9A-Za-z_.-]")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CacheConfig:
        others = ", ".join(n for n in POLICY_NAMES if not POLICIES[n].needs_max_age)
        policies = {"policy": self.policy, **{f"{t}_policy": self.tier(t).policy for t in TIERS}}
        for setting, name in policies.items():
            if name is not None and POLICIES[name].needs_max_age and self.max_age is None:
                raise ValueError(
                    f"{setting} {name!r} needs max_age (seconds); set max_age or use {others}"
                )
        for kind in ARTEFACT_CACHES:
            section = self.artefact(kind)
            if section.policy in ("time", "ttl") and section.max_age is None:
                raise ValueError(
                    f"{kind}_policy {section.policy!r} needs {kind}_max_age (seconds); set it or use lru, fifo, size"
                )
        if not self.memory.size and not self.disk.size and not self.redis.url:
            raise ValueError(
                "every tier is off; give memory_size or disk_size above 0, or a redis_url"
            )
        try:
            for tier in TIERS:
                self.compressor(tier)
        except ConfigError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
        return self

    # -- what the settings mean for one tier or artefact cache ----------------------------------

    def tier(self, name: str) -> TierSettings:
        """The section of KV tier `name` ("memory", "disk", "redis"). Raises ValueError."""
        tiers: dict[str, TierSettings] = {
            "memory": self.memory,
            "disk": self.disk,
            "redis": self.redis,
        }
        return pick("a tier", tiers, name)

    def artefact(self, kind: str) -> ArtefactSettings:
        """The section of artefact cache `kind` (model_cache, training_cache, system_cache). Raises ValueError."""
        return self.artefacts.section(kind)

    @property
    def shared(self) -> bool:
        """Whether other processes can see the entries (a disk or Redis tier)."""
        return bool(self.disk.size or self.redis.url)

    def tier_policy(self, tier: str) -> str:
        """The eviction policy of KV tier `tier` ("memory", "disk", "redis"): its own, else policy."""
        return self.tier(tier).policy or self.policy

    def tier_cleanup_interval(self, tier: str) -> float:
        """Seconds between cleanups of KV tier `tier`: its own interval, else cleanup_interval."""
        return self.tier(tier).cleanup_interval or self.cleanup_interval

    def compressor(self, tier: str = "disk") -> Compressor:
        """The Compressor of KV tier `tier` (default: disk, whose codec is `compression` unless
        disk_compression says otherwise). compression_level applies to the codec `compression` names;
        a tier with another codec uses that codec's default level. Raises ConfigError for a level out of range.
        """
        name = self.tier(tier).compression or self.compression
        level = self.compression_level if name == self.compression != "none" else None
        try:
            return Compressor(name, level)
        except ValueError as exc:
            raise ConfigError(
                f"invalid cache setting compression_level={self.compression_level!r}: {exc}"
            ) from None

    def _kv_threshold(self) -> float:
        return self.eviction_threshold if self.eviction_threshold is not None else 1.0

    # -- the stores and caches the settings describe --------------------------------------------

    def memory_store(self) -> MemoryStore | None:
        """The RAM tier, or None when memory_size is 0."""
        if not self.memory.size:
            return None
        return MemoryStore(
            self.memory.size,
            policy=self.tier_policy("memory"),
            max_age=self.max_age,
            max_items=self.memory.max_items,
            eviction_threshold=self._kv_threshold(),
            compression=self.compressor("memory"),
        )

    def disk_store(self) -> DiskStore | None:
        """The disk tier, or None when disk_size is 0.

        Raises StoreUnavailableError when the directory or its index cannot be created."""
        if not self.disk.size:
            return None
        return DiskStore(
            self.disk.path,
            self.disk.size,
            policy=self.tier_policy("disk"),
            max_age=self.max_age,
            compression=self.compressor("disk"),
            eviction_threshold=self._kv_threshold(),
            use_mmap=self.disk.use_mmap,
        )

    def redis_store(self) -> RedisStore | None:
        """The Redis tier (one server or a cluster), or None without a redis_url. Sends nothing until first used."""
        if not self.redis.url:
            return None
        from promptcache.store.redis import RedisStore  # redis-py loads only where a URL is set

        return RedisStore(
            self.redis.url,
            self.redis.size,
            namespace=self.namespace,
            ttl=self.max_age,
            policy=self.tier_policy("redis"),
            compression=self.compressor("redis"),
            cluster=self.redis.cluster,
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
        """build_cache("tiered", config) with the cache name `name` (see factory.tiered_cache)."""
        from promptcache.config.factory import tiered_cache

        return tiered_cache(self.build_store(), name)

    def _artefact_options(self, kind: str) -> dict[str, Any]:
        section = self.artefact(kind)
        options: dict[str, Any] = {"policy": section.policy, "max_age": section.max_age}
        if self.eviction_threshold is not None:
            options["eviction_threshold"] = self.eviction_threshold
        return options

    def model_cache(self) -> ModelCache:
        """The ModelCache of the model_cache settings (opens or creates its directory).

        Raises StoreUnavailableError when the directory cannot be created."""
        from promptcache.artefacts import ModelCache

        section = self.artefacts.model_cache
        if section.compression:
            log.warning(
                "model_cache compression = true: model files are kept uncompressed so that llama.cpp "
                "and safetensors can memory-map them (see docs/configuration.md)"
            )
        return ModelCache(section.path, section.size, **self._artefact_options("model_cache"))

    def training_cache(self) -> DatasetCache:
        """The DatasetCache of the training_cache settings (opens or creates its directory).

        Raises StoreUnavailableError when the directory cannot be created."""
        from promptcache.artefacts import DatasetCache

        section = self.artefacts.training_cache
        return DatasetCache(
            section.path,
            section.size,
            batch_buffer=section.batch_buffer,
            prefetch=section.prefetch,
            **self._artefact_options("training_cache"),
        )

    def system_cache(self) -> SystemCache:
        """The SystemCache of the system_cache settings (opens or creates its directory).

        Raises StoreUnavailableError when the directory cannot be created."""
        from promptcache.artefacts import SystemCache

        section = self.artefacts.system_cache
        return SystemCache(section.path, section.size, **self._artefact_options("system_cache"))

    def artefact_cache(self, kind: str) -> ModelCache | DatasetCache | SystemCache:
        """The artefact cache `kind` names: model_cache(), training_cache() or system_cache().
        Raises ValueError for another kind."""
        builders = {
            "model_cache": self.model_cache,
            "training_cache": self.training_cache,
            "system_cache": self.system_cache,
        }
        return pick("an artefact cache", builders, kind)()


SETTING_NAMES = (
    *FLAT_NAMES,
    *(
        name
        for name in CacheConfig.model_fields
        if name not in ("memory", "disk", "redis", "artefacts")
    ),
)
"""Every setting by its flat name, as the documentation's table lists them."""

_PLACES = {place: name for name, place in FLAT_NAMES.items()}


def _refuse_unitless_llamahome_sizes(values: dict[str, Any]) -> None:
    """LlamaHome's size variables are refused as bare numbers where they would be used (no keyword,
    file or PROMPTCACHE_ variable gives that size): their unit is not documented."""
    for variable, name in LLAMAHOME_VARIABLES.items():
        raw = os.environ.get(variable)
        place = FLAT_NAMES.get(name)
        if raw is None or place is None or not BARE_NUMBER.fullmatch(raw) or not float(raw):
            continue
        section, field = place
        given = field in values.get(section, {}) or f"PROMPTCACHE_{name.upper()}" in os.environ
        if not given:
            n = raw.strip()
            raise ConfigError(
                f"{variable}={raw} has no unit: LlamaHome's files give sizes in MB, promptcache "
                f"reads bare numbers as bytes; write {variable}={n}MB or {variable}={n}B"
            )


def _setting_name(loc: tuple[int | str, ...]) -> str:
    """The flat name of the setting at a validation error's location (("memory", "size"): memory_size)."""
    for end in range(len(loc), 0, -1):
        if (name := _PLACES.get(tuple(map(str, loc[:end])))) is not None:
            return name
    return "_".join(str(part) for part in loc if part != "artefacts")


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        name = _setting_name(err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            problems.append(
                f"unknown cache setting {name!r}; the settings are {', '.join(SETTING_NAMES)}"
            )
        elif name:
            problems.append(f"invalid cache setting {name}={err.get('input')!r}: {msg}")
        else:
            problems.append(f"invalid cache settings: {msg}")
    return "; ".join(problems)


__all__ = [
    "CacheConfig",
    "LLAMAHOME_VARIABLES",
    "SETTING_NAMES",
    "SectionEnvironment",
    "keywords_then_environment",
]
