"""The one exception hierarchy of promptcache.

Every error the library raises on purpose derives from PromptCacheError; messages say what to do.
"""

from __future__ import annotations


class PromptCacheError(Exception):
    """Base class of every error promptcache raises on purpose."""


class ModelMismatchError(PromptCacheError):
    """A state, session or entry was made by another model or KV layout than the one in use."""


class CorruptEntryError(PromptCacheError):
    """A stored entry or session failed its format, length or checksum check."""


class CapacityError(PromptCacheError):
    """A value can never fit: it is larger than the store's whole capacity."""


class CodecError(PromptCacheError):
    """An engine state could not be parsed, cut or joined by its codec."""


class StoreUnavailableError(PromptCacheError):
    """A store (for example Redis) cannot be reached right now."""


class ConfigError(PromptCacheError, ValueError):
    """A configuration value is invalid; the message names the field and the accepted values."""


class ContextOverflowError(PromptCacheError, ValueError):
    """A request needs more tokens than the model's context can hold."""
