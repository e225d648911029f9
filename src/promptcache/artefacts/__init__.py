"""Derived-artefact caches: tokenized datasets, derived model files and temporary files, keyed by what made them.

Owns the public names of the artefact caches; never imports datasets, safetensors or llama_cpp until used.
"""

from __future__ import annotations

from promptcache.artefacts.dataset import DatasetCache
from promptcache.artefacts.identity import (
    artefact_key,
    function_identity,
    library_versions,
    value_identity,
)
from promptcache.artefacts.models import ModelCache
from promptcache.artefacts.store import ArtefactInfo, ArtefactStore
from promptcache.artefacts.stream import BatchStream
from promptcache.artefacts.system import SystemCache
from promptcache.artefacts.tokenizer import GGUFTokenizer

__all__ = [
    "DatasetCache",
    "ModelCache",
    "SystemCache",
    "BatchStream",
    "GGUFTokenizer",
    "ArtefactStore",
    "ArtefactInfo",
    "artefact_key",
    "function_identity",
    "value_identity",
    "library_versions",
]
