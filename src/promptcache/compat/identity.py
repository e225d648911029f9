"""Which model calls a drop-in cache: the calling Llama, found by a stack walk, and its fingerprint.

Owns fingerprints and state shapes of Llamas and the rule for whom a call is served; never reads
or writes an entry.

llama-cpp-python 0.3.36 calls the cache from `Llama._create_completion` as `self.cache[...]`, so
the nearest caller frame (at most a dozen up) whose `self` is a `llama_cpp.Llama` is the
model, and `llama_fingerprint` names its whole GGUF file (promptcache.model.model_identity: a
fine-tune of the same shape, or one changed byte, is another model) with the settings a state's
layout depends on, memoized per Llama. Frames rather than wrapping `Llama.set_cache`: nothing
global is patched, `llm.cache = cache` works too, and one cache set on two Llamas of two models
tells them apart on every call. Fail safe: when llama_cpp's own code calls the cache and no Llama
is found up the stack (a llama-cpp-python that calls from elsewhere), the call is refused: a miss,
nothing stored (logged once). A call from user code with no Llama up the stack (cache[key] by
hand) is served under the cache's fingerprint or "".
"""

from __future__ import annotations

import logging
import sys
import weakref
from hashlib import blake2b
from typing import NamedTuple

import llama_cpp
from llama_cpp import Llama

from promptcache.model import model_identity

log = logging.getLogger(__name__)

__all__ = ["Shape", "Caller", "llama_fingerprint", "llama_identity", "resolve_caller"]


class Shape(NamedTuple):
    """What a state must match to load into a context: vocabulary size and context length."""

    n_vocab: int
    n_ctx: int


Caller = tuple[str, Shape | None]
"""(fingerprint, shape) a call is served under; no shape when no Llama made the call."""


_LLAMA_IDS: weakref.WeakKeyDictionary[Llama, tuple[str, Shape]] = weakref.WeakKeyDictionary()


def llama_fingerprint(llm: Llama) -> str:
    """A fingerprint for `llm`: its GGUF file's content hash plus every setting a state's layout depends on.

    The caches compute it themselves for the Llama that calls them; pass it as `fingerprint=`
    to pin one explicitly. Includes the llama-cpp-python version and llama.cpp's system info
    (backend and instruction set), since a state is only as portable as the kernels that made it.
    Raises OSError when the model file cannot be read.
    """
    return llama_identity(llm)[0]


def llama_identity(llm: Llama) -> tuple[str, Shape]:
    """(fingerprint, state shape) of `llm`, memoized per Llama. Raises OSError, AttributeError."""
    known = _LLAMA_IDS.get(llm)
    if known is not None:
        return known
    params = llm.context_params
    parts = [
        "llama-cpp-python",
        llama_cpp.__version__,
        llama_cpp.llama_print_system_info().decode("utf-8", "replace"),
        model_identity(llm.model_path),
        f"n_vocab={llm.n_vocab()}",
        f"n_ctx={llm.n_ctx()}",
        f"score_rows={llm.scores.shape[0]}",
    ]
    for name in ("type_k", "type_v", "flash_attn", "flash_attn_type", "swa_full", "embeddings"):
        if hasattr(params, name):
            parts.append(f"{name}={getattr(params, name)}")
    fingerprint = blake2b("\x00".join(parts).encode(), digest_size=16).hexdigest()
    known = (fingerprint, Shape(llm.n_vocab(), len(llm.input_ids)))
    _LLAMA_IDS[llm] = known
    return known


class _Refused:
    """The caller is llama_cpp code, but no Llama was found up the stack: serve and store nothing."""


_REFUSED = _Refused()
_CALLER_DEPTH = 12
_refusal_logged = False


def _calling_llama() -> Llama | _Refused | None:
    """The Llama whose method called the cache (nearest frame whose `self` is a Llama), if any.

    _REFUSED when llama_cpp code is on the stack without a Llama in reach: the calling convention
    this relies on (llama-cpp-python 0.3.36) has changed, and a miss is the safe answer.
    """
    global _refusal_logged
    frame = sys._getframe(1)
    from_llama_cpp = False
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            break
        if "self" in frame.f_code.co_varnames:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Llama):
                return obj
        module = frame.f_globals.get("__name__", "")
        if module == "llama_cpp" or module.startswith("llama_cpp."):
            from_llama_cpp = True
        frame = frame.f_back
    if not from_llama_cpp:
        return None
    if not _refusal_logged:
        _refusal_logged = True
        log.warning(
            "llama_cpp called a promptcache cache but no Llama was found among its callers "
            "(llama-cpp-python %s; promptcache is tested with 0.3.36): serving and storing nothing; "
            "pass fingerprint=llama_fingerprint(llm) to the cache to use it anyway",
            llama_cpp.__version__,
        )
    return _REFUSED


def resolve_caller(fingerprint: str | None) -> Caller | None:
    """(fingerprint, shape) a call is served under; None: refuse (miss, store nothing).

    `fingerprint` (the cache's own) wins; else the calling Llama's; else "" with no shape.
    """
    found = _calling_llama()
    if isinstance(found, Llama):
        try:
            llama_fp, shape = llama_identity(found)
        except (OSError, AttributeError, TypeError, ValueError) as exc:
            log.warning("cannot fingerprint the calling Llama, serving nothing: %s", exc)
            return None
        return (fingerprint if fingerprint is not None else llama_fp), shape
    if found is _REFUSED and fingerprint is None:
        return None
    return (fingerprint or ""), None
