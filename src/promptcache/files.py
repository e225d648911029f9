"""Where promptcache keeps files of its own, how it writes them, and how it reads settings files.

Owns the user cache directory, atomic file replacement and TOML/YAML parsing; never interprets
the settings it reads (promptcache.config and server/settings.py do).
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any

import platformdirs

from promptcache.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def user_cache_dir(*parts: str) -> Path:
    """platformdirs' user cache directory for promptcache (~/.cache/promptcache on Linux) / parts."""
    return Path(platformdirs.user_cache_dir("promptcache")).joinpath(*parts)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> int:
    """Write `data` to `path` so readers see the old file or the whole new one, never a part.

    Writes a uniquely named temporary file beside `path`, then renames it over `path`; the
    temporary file is removed on any failure. Returns the bytes written; raises OSError.
    """
    target = Path(path)
    blob = data.encode() if isinstance(data, str) else data
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return len(blob)


def read_settings_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The table a TOML file (or, by suffix .yaml/.yml, a YAML file) holds. Raises ConfigError."""
    p = Path(path)
    yaml_file = p.suffix.lower() in (".yaml", ".yml")
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    try:
        if yaml_file:
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = tomllib.loads(text)
    except Exception as exc:  # noqa: BLE001 - YAML and TOML raise their own error types
        raise ConfigError(
            f"config file {p} is not valid {'YAML' if yaml_file else 'TOML'}: {exc}"
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {p} must hold a table of settings")
    return values


__all__ = ["user_cache_dir", "atomic_write", "read_settings_file"]
