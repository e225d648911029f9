"""Shared fixtures and helpers: deterministic synthetic states for the engine-agnostic core."""

from __future__ import annotations

import os
import tempfile

import pytest
from synthetic import WIDTH, synthetic_state  # noqa: F401 - tests import them from here

from promptcache.codec import FixedWidthCodec

# Artefact caches default to the user's cache directory: tests that build a CacheManager without
# explicit paths must never open (or clean) a real user's model, training or system cache.
_ARTEFACT_ROOT = tempfile.mkdtemp(prefix="promptcache-test-artefacts-")
for _name in ("MODEL", "TRAINING", "SYSTEM"):
    os.environ.setdefault(
        f"PROMPTCACHE_{_name}_CACHE_PATH", os.path.join(_ARTEFACT_ROOT, _name.lower())
    )


@pytest.fixture
def codec() -> FixedWidthCodec:
    return FixedWidthCodec(WIDTH)
