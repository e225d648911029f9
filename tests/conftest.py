"""Shared fixtures and helpers: deterministic synthetic states for the engine-agnostic core."""

from __future__ import annotations

import os
import tempfile
from hashlib import blake2b

import pytest

from promptcache.codec import FixedWidthCodec

WIDTH = 8

# Artefact caches default to the user's cache directory: tests that build a CacheManager without
# explicit paths must never open (or clean) a real user's model, training or system cache.
_ARTEFACT_ROOT = tempfile.mkdtemp(prefix="promptcache-test-artefacts-")
for _name in ("MODEL", "TRAINING", "SYSTEM"):
    os.environ.setdefault(
        f"PROMPTCACHE_{_name}_CACHE_PATH", os.path.join(_ARTEFACT_ROOT, _name.lower())
    )


def synthetic_state(tokens: list[int], width: int = WIDTH) -> bytes:
    """Row p depends on tokens[: p + 1], as a KV cell does: the state of a prefix is a prefix of the state."""
    rows, h = [], blake2b(digest_size=width)
    for t in tokens:
        h.update(t.to_bytes(4, "little"))
        rows.append(h.copy().digest())
    return b"".join(rows)


@pytest.fixture
def codec() -> FixedWidthCodec:
    return FixedWidthCodec(WIDTH)
