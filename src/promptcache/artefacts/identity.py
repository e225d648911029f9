"""What produced an artefact, as a key: canonical JSON of (source, transform, params, library versions), blake2b.

Owns how values and functions are identified; never stores anything and never unpickles (datasets'
Hasher, which serializes with dill, is used to hash only, as the last resort for opaque values).

How a function is identified (the key changes, so the cache misses, when any of these change):
- with `version=` given: its module, qualified name and that version only. Use this when the
  function reads state the rules below cannot see (files, network, random seeds); bump the version
  whenever its output changes.
- otherwise: its module and qualified name, its source text (when inspect can read it), a digest of
  its bytecode and constants (nested functions and lambdas included), its default arguments, the
  values its closure captures, and the values of the module globals its code names. Values are
  identified by content: numbers, strings, containers, numpy arrays (bytes), `datasets.Dataset`
  (its fingerprint), the models a preprocess function tokenizes with (below), functions and
  partials (recursively), modules (name and version), objects with a `__cache_identity__()` method
  (what it returns), anything else by datasets' Hasher. A value that cannot be identified raises
  TypeError.
Identical source with different captured values (two tokenizers in two closures) gives two keys.

Models, by what their tokenization depends on (recognised by type, imported only where the value's
own module already is): promptcache's `LLM`, `CachedCausalLM` and its tokenizer, and
`llama_cpp.Llama`, by promptcache.model.model_identity of their GGUF (the vocabulary is in the
file; llama-cpp-python's version is in every key); a Hugging Face tokenizer
(`PreTrainedTokenizerBase`) by a digest of its vocabulary, merges, normalizer and special tokens
(the fast tokenizer's backend JSON, else the files save_pretrained writes) and the settings that
change its output. A function that evaluates a model (logits, sampled text) rather than tokenizing
with it depends on more than this: pass `version=` for it.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import sys
import textwrap
import types
from hashlib import blake2b
from importlib import metadata
from pathlib import Path
from typing import Any

KEY_DIGEST_SIZE = 20
"""Bytes of blake2b in an artefact key (40 hex characters): collisions need about 2**80 artefacts."""

_LIBRARIES = ("promptcache", "datasets", "pyarrow", "llama_cpp_python", "safetensors", "numpy")


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Versions of python and the libraries whose change may change an artefact (absent ones as "-")."""
    versions = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for dist in _LIBRARIES:
        try:
            versions[dist] = metadata.version(dist.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[dist] = "-"
    return versions


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text. Raises TypeError for non-JSON values."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def artefact_key(kind: str, source: Any, transform: Any, params: Any = None) -> str:
    """The key of the artefact `kind` made from `source` by `transform` with `params`, under today's libraries.

    `source`, `transform` and `params` are identified with value_identity. Returns "<kind>-<40 hex>".
    Raises TypeError for a value that cannot be identified.
    """
    record = {
        "kind": kind,
        "source": value_identity(source),
        "transform": value_identity(transform),
        "params": value_identity(params),
        "versions": library_versions(),
    }
    digest = blake2b(canonical_json(record).encode(), digest_size=KEY_DIGEST_SIZE).hexdigest()
    return f"{kind}-{digest}"


def function_identity(fn: Any, version: str | int | None = None) -> dict[str, Any]:
    """What identifies a function's behaviour (see the module docstring). Raises TypeError for opaque captures."""
    return _function(fn, version, set())


def value_identity(value: Any) -> Any:
    """A JSON-able value equal for equal content (see the module docstring). Raises TypeError if unidentifiable."""
    return _value(value, set())


def _digest(blob: bytes) -> str:
    return blake2b(blob, digest_size=16).hexdigest()


def _name(obj: Any) -> str:
    return (
        f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    )


def _code(code: types.CodeType) -> dict[str, Any]:
    consts = []
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            consts.append(_code(c))
        elif isinstance(
            c, frozenset
        ):  # set literals: iteration order follows string hashing, which varies
            consts.append(sorted(repr(x) for x in c))
        else:
            consts.append(repr(c))
    return {"bytecode": _digest(code.co_code), "consts": consts, "names": list(code.co_names)}


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


def _function(fn: Any, version: str | int | None, seen: set[int]) -> dict[str, Any]:
    if not isinstance(fn, types.FunctionType):
        if version is not None:
            return {"callable": _name(fn), "version": str(version)}
        return {"callable": _value(fn, seen)}
    if version is not None:
        return {"function": _name(fn), "version": str(version)}
    if (
        id(fn) in seen
    ):  # recursion (a function naming itself): its name is enough, the rest is already in
        return {"function": _name(fn), "recursive": True}
    seen = seen | {id(fn)}
    try:
        source: str | None = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        source = None
    closure = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell: a name bound later in the enclosing function
            contents = None
        closure[name] = _value(contents, seen)
    module_globals = {
        name: _value(fn.__globals__[name], seen)
        for name in sorted(_global_names(fn.__code__))
        if name in fn.__globals__
    }
    return {
        "function": _name(fn),
        "source": source,
        "code": _code(fn.__code__),
        "defaults": _value(fn.__defaults__, seen),
        "kwdefaults": _value(fn.__kwdefaults__, seen),
        "closure": closure,
        "globals": module_globals,
    }


def _value(value: Any, seen: set[int]) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"float": repr(value)} if not math.isfinite(value) else value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": _digest(bytes(value))}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_value(v, seen) for v in value]}
    if isinstance(value, dict):
        items = [[_value(k, seen), _value(v, seen)] for k, v in value.items()]
        return {"dict": sorted(items, key=canonical_json)}
    if isinstance(value, (set, frozenset)):
        return {"set": sorted((_value(v, seen) for v in value), key=canonical_json)}
    if isinstance(value, os.PathLike):
        return {"path": os.fspath(value)}
    identify = getattr(type(value), "__cache_identity__", None)
    if identify is not None and not isinstance(value, type):
        return {"object": _value(type(value), seen), "identity": _value(identify(value), seen)}
    if isinstance(value, types.FunctionType):
        return _function(value, None, seen)
    if isinstance(value, functools.partial):
        return {
            "partial": _value(value.func, seen),
            "args": _value(value.args, seen),
            "keywords": _value(value.keywords, seen),
        }
    if isinstance(value, types.MethodType):
        return {"method": _value(value.__func__, seen), "self": _value(value.__self__, seen)}
    if isinstance(
        value, (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType)
    ):
        return {"builtin": _name(value)}
    if isinstance(value, types.ModuleType):
        return {"module": value.__name__, "version": str(getattr(value, "__version__", ""))}
    if isinstance(value, type):
        try:
            source = _digest(inspect.getsource(value).encode())
        except (OSError, TypeError):
            source = None
        return {"class": _name(value), "source": source}
    module = type(value).__module__ or ""
    if module.startswith("numpy") and hasattr(value, "tobytes") and hasattr(value, "dtype"):
        return {
            "ndarray": str(value.dtype),
            "shape": list(getattr(value, "shape", ())),
            "bytes": _digest(value.tobytes()),
        }
    if module.startswith("datasets") and hasattr(value, "_fingerprint"):
        return {"dataset": value._fingerprint}
    model = _model(value)
    if model is not None:
        return model
    return {"hashed": _value(type(value), seen), "digest": _hasher(value)}


def _model(value: Any) -> dict[str, Any] | None:
    """The identity of a model or tokenizer (see the module docstring), None for any other value.

    Looks a class up only in a module already imported: an object of it cannot exist otherwise,
    and identifying a value must not import llama.cpp or transformers."""
    from promptcache.model import model_identity

    llm = sys.modules.get("promptcache.engines.llama_cpp.llm")
    if llm is not None and isinstance(value, llm.LLM):
        return {"llm": model_identity(value.model_path)}
    lm = sys.modules.get("promptcache.lm")
    if lm is not None and isinstance(value, lm.CachedCausalLM):
        return {"llm": model_identity(value.llm.model_path)}
    if lm is not None and isinstance(value, lm.GGUFTokenizer) and value.name_or_path:
        return {"llm": model_identity(value.name_or_path)}
    if type(value).__module__.startswith("llama_cpp") and hasattr(value, "model_path"):
        return {"llama": model_identity(value.model_path)}
    hf = sys.modules.get("transformers.tokenization_utils_base")
    if hf is not None and isinstance(value, hf.PreTrainedTokenizerBase):
        return _hf_tokenizer(value)
    return None


def _hf_tokenizer(tokenizer: Any) -> dict[str, Any]:
    """A Hugging Face tokenizer by its vocabulary, merges, normalizer, special tokens and settings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: one JSON holds everything tokenizing reads
        rules = _digest(backend.to_str().encode())
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="promptcache-tokenizer-") as tmp:
            tokenizer.save_pretrained(tmp)
            files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
            rules = _digest(
                b"".join(p.name.encode() + b"\0" + _digest(p.read_bytes()).encode() for p in files)
            )
    return {
        "tokenizer": _name(type(tokenizer)),
        "rules": rules,
        "added_tokens": _value(
            {str(i): repr(t) for i, t in tokenizer.added_tokens_decoder.items()}, set()
        ),
        "special_map": _value({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, set()),
        "settings": _value(
            {
                name: getattr(tokenizer, name, None)
                for name in ("padding_side", "truncation_side", "model_max_length", "chat_template")
            },
            set(),
        ),
    }


def _hasher(value: Any) -> str:
    try:
        from datasets.fingerprint import Hasher

        return Hasher.hash(value)
    except Exception as exc:  # noqa: BLE001 - dill raises many types for values it cannot serialize
        raise TypeError(
            f"cannot identify a {type(value).__qualname__} for a cache key ({exc}); give it a "
            "__cache_identity__() method returning plain values, or pass version= for the function"
        ) from None
