"""Settings files: TOML and YAML files, LlamaHome's included, read into promptcache's setting names.

Owns where settings sit in a file (top level, [cache], sections), LlamaHome's words for them and the
unit of a bare size in a section; never validates a value (settings.py does) nor parses the syntax
(promptcache.files.read_settings_file does).
"""

from __future__ import annotations

import os
from typing import Any

from promptcache.config.sections import ARTEFACT_CACHES, TIERS
from promptcache.config.units import BARE_NUMBER
from promptcache.errors import ConfigError
from promptcache.files import read_settings_file

CONFIG_ENV = "PROMPTCACHE_CONFIG"
"""Environment variable naming a config file, read when no config_file is given."""

SECTION_MB_LIMIT = 10**6
"""A bare `size` in a section at or above this many (MB, so a terabyte or more; as bytes, a megabyte
or more) is refused as ambiguous: write a unit."""

# Names the seed's sections use for promptcache's settings: [cache.memory] type = "lru" is memory_policy.
_SECTION_SYNONYMS = {"type": "policy", "cleanup_policy": "policy", "temp_dir": "path"}


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
        isinstance(value, (int, float)) or (isinstance(value, str) and BARE_NUMBER.fullmatch(value))
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


__all__ = ["CONFIG_ENV", "SECTION_MB_LIMIT", "read_config_file"]
