"""Units of the settings: sizes in bytes ("512MB", "4GB") and durations in seconds ("30s", "2h").

Owns parsing a value a user wrote into bytes or seconds; never knows which setting it is for.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(?:([kmgt])(?:i?b)?|(b))?\s*", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(s|m|h|d)?\s*", re.IGNORECASE)
_OFF = ("", "none", "null", "off")

BARE_NUMBER = re.compile(r"\s*\d+(?:\.\d*)?\s*")
"""A number written without a unit (a size whose unit depends on where it is written)."""


def is_off(value: object) -> bool:
    """Whether `value` says "none" (None, "", "none", "null", "off", any case)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in _OFF)


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
    if is_off(value):
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


def parse_count(value: object, low: int) -> int:
    """A whole number of at least `low` from an int or its digits. Raises ValueError."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        n = int(str(value).strip()) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a whole number; use an int of {low} or more") from None
    if n < low:
        raise ValueError(f"{value!r} is too small; use an int of {low} or more")
    return n


__all__ = ["BARE_NUMBER", "is_off", "parse_count", "parse_seconds", "parse_size"]
