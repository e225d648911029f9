"""The sections of the settings: one model per KV tier and per artefact cache, fields and their checks.

Owns each section's fields, defaults and accepted values; never reads a file or the environment and
never builds a store (settings.py and factory.py do). The accepted names are the stores' own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from promptcache.config.units import is_off, parse_count, parse_seconds, parse_size
from promptcache.files import user_cache_dir
from promptcache.store.compression import CODECS
from promptcache.store.disk import default_path as default_disk_path
from promptcache.store.policies import POLICY_NAMES

T = TypeVar("T")

TIERS = ("memory", "disk", "redis")
"""The KV tiers, fastest first; each has a section ([cache.memory], ...) of per-tier settings."""

ARTEFACT_CACHES = ("model_cache", "training_cache", "system_cache")
"""The artefact caches' sections (LlamaHome's cache types): derived model files, processed
datasets, temporary files. Each has its own size, path, policy and max_age."""

ARTEFACT_POLICIES = ("lru", "fifo", "time", "ttl", "size")
"""Policies of the artefact caches ("time" and "ttl": oldest written first, with a max_age)."""


def pick(what: str, options: dict[str, T], name: str) -> T:
    """options[name], or a ValueError naming `what` is wanted and the names there are."""
    if name not in options:
        raise ValueError(f"{name!r} is not {what}; use one of {', '.join(options)}")
    return options[name]


def choose(value: object, accepted: tuple[str, ...], *, allow_none: bool) -> str | None:
    """`value` as one of the `accepted` names (any case); None where allowed. Raises ValueError."""
    if value is None and allow_none:
        return None
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in accepted:
        raise ValueError(f"{value!r} is not accepted; use one of {', '.join(accepted)}")
    return str(name)


def _allows_none(cls: type[BaseModel], info: ValidationInfo) -> bool:
    """A field whose default is None accepts None (a per-tier setting left to the shared one)."""
    return cls.model_fields[str(info.field_name)].default is None


def _directory(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise ValueError("is empty; name a directory (default: the user cache dir / 'kv')")
    return Path(os.path.expanduser(str(value))) if isinstance(value, (str, Path)) else value


class Section(BaseModel):
    """A table of settings; unknown names are refused, and a section does not change once made."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("size", mode="before", check_fields=False)
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)

    @field_validator("cleanup_interval", "max_age", mode="before", check_fields=False)
    @classmethod
    def _seconds(cls, value: object) -> float | None:
        return parse_seconds(value, allow_none=True)


class TierSettings(Section):
    """One KV tier: its capacity, and its own policy, compression and cleanup interval (None: the
    shared setting of the same name)."""

    size: int
    policy: str | None = Field(None, description="Eviction order of this tier; none: policy.")
    compression: str | None = Field(
        None, description="Compression of this tier; none: compression."
    )
    cleanup_interval: float | None = Field(
        None, description="Seconds between cleanups of this tier; none: cleanup_interval."
    )

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, value: object, info: ValidationInfo) -> str | None:
        value = "ttl" if isinstance(value, str) and value.strip().lower() == "time" else value
        return choose(value, POLICY_NAMES, allow_none=_allows_none(cls, info))

    @field_validator("compression", mode="before")
    @classmethod
    def _compression(cls, value: object, info: ValidationInfo) -> str | None:
        if isinstance(value, bool):
            return "zstd" if value else "none"  # LlamaHome's compression: true
        return choose(value, CODECS, allow_none=_allows_none(cls, info))


class MemorySettings(TierSettings):
    """[cache.memory]: the RAM tier of this process."""

    size: int = Field(2 << 30, description="Capacity of the RAM tier; 0 turns the tier off.")
    compression: str = Field(
        "none",
        description="Compression of RAM values: none, zstd, lz4 (true: zstd, false: none). Not inherited from compression.",
    )
    max_items: int | None = Field(
        None, description="Most entries the RAM tier holds; none: bytes alone limit it."
    )

    @field_validator("max_items", mode="before")
    @classmethod
    def _max_items(cls, value: object) -> int | None:
        return None if is_off(value) else parse_count(value, 1)


class DiskSettings(TierSettings):
    """[cache.disk]: the disk tier, shared by every process that names its directory."""

    size: int = Field(
        10 << 30, description="Capacity of the disk tier (entry files); 0 turns the tier off."
    )
    path: Path = Field(
        default_factory=default_disk_path,
        description="Directory of the disk tier, shared by every process that names it.",
    )
    use_mmap: bool = Field(
        False,
        description="Read disk entries through a memory map (one copy of a value instead of two).",
    )

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, value: object) -> object:
        return _directory(value)


class RedisSettings(TierSettings):
    """[cache.redis]: the Redis tier, shared by every machine that reaches it."""

    size: int = Field(
        1 << 30,
        description="Capacity of the namespace in Redis (packed entries; Redis adds ~100 bytes a key).",
    )
    url: str | None = Field(
        None,
        description="Redis of the shared tier (redis://host:port/db, rediss://..., unix:///path), or a Redis "
        "Cluster: any node's URL, or several comma-separated (a list in a file); none: no Redis tier.",
    )
    cluster: bool | None = Field(
        None,
        description="Whether url is a Redis Cluster; none: several URLs are, one URL is asked (INFO cluster).",
    )

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: object) -> str | None:
        if is_off(value):
            return None
        parts = value.split(",") if isinstance(value, str) else value
        if isinstance(parts, (list, tuple)) and all(isinstance(p, str) for p in parts):
            parts = [p.strip() for p in parts]
            if parts and all(p.startswith(("redis://", "rediss://", "unix://")) for p in parts):
                return ",".join(parts)
        raise ValueError(
            f"{value!r} is not a Redis URL; use redis://host:port/db, rediss://host:port/db, "
            "unix:///path/to/socket, a Redis Cluster's nodes as 'redis://host:port,redis://host:port' "
            "(or a list), or none for no Redis tier"
        )

    @field_validator("cluster", mode="before")
    @classmethod
    def _cluster(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("auto", "", "none", "null"):
            return None
        return value  # pydantic reads true/false/yes/no/on/off/1/0

    @model_validator(mode="after")
    def _target(self) -> RedisSettings:
        if self.url is not None:
            from promptcache.store.redis_client import RedisTarget  # redis-py loads only with a URL

            RedisTarget.parse(self.url, self.cluster)  # raises ValueError saying what is wrong
        return self


class ArtefactSettings(Section):
    """One artefact cache (LlamaHome's cache types): a directory of files with its own capacity,
    eviction order and age limit."""

    size: int
    path: Path
    policy: str
    max_age: float | None = Field(
        None, description="Seconds an artefact lives; none: until evicted."
    )

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, value: object) -> object:
        return _directory(value)

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, value: object) -> str | None:
        return choose(value, ARTEFACT_POLICIES, allow_none=False)


class ModelCacheSettings(ArtefactSettings):
    """model_cache: derived model files (assembled or requantized GGUFs, safetensors exports)."""

    size: int = Field(1 << 30, description="Capacity of the model cache (derived model files).")
    path: Path = Field(
        default_factory=lambda: user_cache_dir("models"),
        description="Directory of the model cache.",
    )
    policy: str = Field("lru", description="Eviction order of the model cache.")
    format: str = Field(
        "gguf", description="Format of exported model artefacts: gguf or safetensors."
    )
    compression: bool = Field(
        False,
        description="Accepted for LlamaHome files; model files stay uncompressed so they can be memory-mapped (a warning says so).",
    )

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, value: object) -> str | None:
        return choose(value, ("gguf", "safetensors"), allow_none=False)


class TrainingCacheSettings(ArtefactSettings):
    """training_cache: processed datasets (DatasetCache)."""

    size: int = Field(512 << 20, description="Capacity of the training (dataset) cache.")
    path: Path = Field(
        default_factory=lambda: user_cache_dir("datasets"),
        description="Directory of the training cache.",
    )
    policy: str = Field("fifo", description="Eviction order of the training cache.")
    batch_buffer: int = Field(
        32, description="Processed batches held before they are appended to the artefact."
    )
    prefetch: int = Field(4, description="Batches a background thread makes ahead when streaming.")

    @field_validator("batch_buffer", "prefetch", mode="before")
    @classmethod
    def _count(cls, value: object, info: ValidationInfo) -> int:
        return parse_count(value, 0 if info.field_name == "prefetch" else 1)


class SystemCacheSettings(ArtefactSettings):
    """system_cache: named temporary files (SystemCache; LlamaHome's temp_dir)."""

    size: int = Field(256 << 20, description="Capacity of the system cache (temporary files).")
    path: Path = Field(
        default_factory=lambda: user_cache_dir("temp"),
        description="Directory of the system cache (LlamaHome's temp_dir).",
    )
    policy: str = Field("time", description="Eviction order of the system cache.")
    max_age: float | None = Field(86400.0, description="Seconds a temporary artefact lives.")


class ArtefactSections(Section):
    """The artefact caches' sections, each by its name in files and in the environment."""

    model_cache: ModelCacheSettings = Field(default_factory=ModelCacheSettings)
    training_cache: TrainingCacheSettings = Field(default_factory=TrainingCacheSettings)
    system_cache: SystemCacheSettings = Field(default_factory=SystemCacheSettings)

    def section(self, kind: str) -> ArtefactSettings:
        """The section of artefact cache `kind` (model_cache, ...). Raises ValueError."""
        sections: dict[str, ArtefactSettings] = {
            "model_cache": self.model_cache,
            "training_cache": self.training_cache,
            "system_cache": self.system_cache,
        }
        return pick("an artefact cache", sections, kind)


TIER_SECTIONS: dict[str, type[TierSettings]] = {
    "memory": MemorySettings,
    "disk": DiskSettings,
    "redis": RedisSettings,
}

FLAT_NAMES: dict[str, tuple[str, ...]] = {
    **{
        f"{tier}_{field}": (tier, field)
        for tier, model in TIER_SECTIONS.items()
        for field in model.model_fields
    },
    **{
        f"{kind}_{field}": ("artefacts", kind, field)
        for kind, info in ArtefactSections.model_fields.items()
        for field in info.annotation.model_fields  # type: ignore[union-attr]
    },
}
"""Each section field's flat name (memory_size, disk_path, model_cache_format, ...) and its place
in CacheConfig: the names keyword arguments, files and PROMPTCACHE_* variables have always used."""


def nest(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with flat names (memory_size) moved to their places ({"memory": {"size": ...}});
    a flat name outranks the same field in a section table given beside it. Other names stay
    where they are (validation refuses unknown ones by name). The tables given are not changed."""
    out = {k: v.model_dump() if isinstance(v, Section) else v for k, v in values.items()}
    for name in [k for k in out if k in FLAT_NAMES]:
        *sections, field = FLAT_NAMES[name]
        table = out
        for section in sections:
            inner = table.get(section)
            table[section] = dict(inner) if isinstance(inner, dict) else {}
            table = table[section]
        table[field] = out.pop(name)
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over`'s values, tables merged table by table (over wins)."""
    out = dict(base)
    for name, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(name), dict)
        out[name] = merge(out[name], value) if both else value
    return out


__all__ = [
    "ARTEFACT_CACHES",
    "ARTEFACT_POLICIES",
    "ArtefactSections",
    "ArtefactSettings",
    "DiskSettings",
    "FLAT_NAMES",
    "MemorySettings",
    "ModelCacheSettings",
    "RedisSettings",
    "TIER_SECTIONS",
    "Section",
    "SystemCacheSettings",
    "TIERS",
    "TierSettings",
    "TrainingCacheSettings",
    "choose",
    "merge",
    "nest",
    "pick",
]
