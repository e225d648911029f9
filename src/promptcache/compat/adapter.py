"""The adapter for users' BaseLlamaCache subclasses, written as llama-cpp-python's docs show.

Owns what such a subclass's `__setitem__` receives (a PortableLlamaState: a LlamaState that is also
a JSON-ready dict carrying the model fingerprint) and how what its `__getitem__` returns (None,
that dict as read back, a state of another model) becomes a state or a KeyError; never stores.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from llama_cpp.llama import LlamaState

from promptcache.compat.entry import Entry
from promptcache.compat.identity import Caller, Shape, resolve_caller
from promptcache.errors import CorruptEntryError

log = logging.getLogger(__name__)

__all__ = ["PortableLlamaState", "adapt_getitem", "adapt_setitem"]

_PORTABLE_FORMAT = "promptcache.llama_state/1"


class PortableLlamaState(dict, LlamaState):
    """A LlamaState that is also a JSON-ready dict: what a user subclass's `__setitem__` receives.

    As a LlamaState it has input_ids, scores, n_tokens, llama_state, llama_state_size and seed; as a
    dict it holds three strings (format, the model's fingerprint, the compact state in base64), so
    `json.dump(value, f)` works and what `json.load` returns is read back by the base class.
    """

    def __init__(self, state: Any, fingerprint: str) -> None:
        """Raises TypeError when `state` is not shaped like llama_cpp.LlamaState."""
        entry = Entry.from_state(b"", state, fingerprint)
        dict.__init__(
            self,
            format=_PORTABLE_FORMAT,
            fingerprint=fingerprint,
            state=base64.b64encode(entry.encode()).decode("ascii"),
        )
        LlamaState.__init__(
            self,
            input_ids=state.input_ids,
            scores=state.scores,
            n_tokens=entry.n_tokens,
            llama_state=entry.llama_state,
            llama_state_size=entry.llama_state_size,
            seed=entry.seed,
        )


def _state_from_user(value: Any, caller: Caller) -> LlamaState:
    """What a user subclass's __getitem__ returned, as a state for `caller`; KeyError when unusable."""
    fingerprint, shape = caller
    if isinstance(value, dict) and value.get("format") == _PORTABLE_FORMAT:
        if value.get("fingerprint") != fingerprint:
            raise KeyError("cached state belongs to another model")
        try:
            payload = base64.b64decode(str(value["state"]), validate=True)
            entry = Entry.decode(payload, fingerprint)
        except (KeyError, binascii.Error, ValueError, CorruptEntryError) as exc:
            log.warning("cached state read back from a custom cache is unusable: %s", exc)
            raise KeyError("unusable cached state") from None
        if shape is not None and entry.shape != shape:
            raise KeyError("cached state has another shape than the model")
        return entry.to_state()
    if not isinstance(value, LlamaState):
        log.warning("a custom cache returned %s, not a LlamaState: a miss", type(value).__name__)
        raise KeyError("not a cached state")
    try:
        found = Shape(np.shape(value.scores)[1], np.size(value.input_ids))
    except (AttributeError, IndexError, TypeError):
        raise KeyError("not a cached state") from None
    if shape is not None and found != shape:
        raise KeyError("cached state has another shape than the model")
    return value


def adapt_getitem(method: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """A subclass's `__getitem__` made to answer for the calling model: a state or a KeyError."""

    @functools.wraps(method)
    def __getitem__(self: Any, key: Any) -> LlamaState:
        caller = resolve_caller(None)
        if caller is None:
            raise KeyError("the calling model is unknown")
        try:
            value = method(self, key)
        except (ValueError, OSError) as exc:  # e.g. a file a crashed write left half-written
            log.warning(
                "%s failed to read an entry, treating it as a miss: %r", type(self).__name__, exc
            )
            raise KeyError("unreadable cache entry") from None
        if value is None:
            raise KeyError("no cached state for this key")
        return _state_from_user(value, caller)

    return __getitem__


def adapt_setitem(method: Callable[[Any, Any, Any], None]) -> Callable[[Any, Any, Any], None]:
    """A subclass's `__setitem__` handed a PortableLlamaState of the calling model (nothing when refused)."""

    @functools.wraps(method)
    def __setitem__(self: Any, key: Any, value: Any) -> None:
        caller = resolve_caller(None)
        if caller is None:
            return
        if isinstance(value, LlamaState) and not isinstance(value, PortableLlamaState):
            value = PortableLlamaState(value, caller[0])
        method(self, key, value)

    return __setitem__
