"""PromptLogprobs: the log-probabilities of prompt tokens (for `echo`), remembered by token prefix.

Owns the bounded, in-process memo that lets an echo request restore a cached prefix's KV and still
report every prompt token's log-probability; never evaluates a model and never touches the KV cache.

Why a memo next to the KV cache, not a whole re-evaluation: a restored prefix has KV but no logits,
and the log-probability of token i needs the logits at position i - 1. Re-evaluating every echo
prompt would make scoring harnesses (lm-evaluation-harness sends one context with each answer) pay
the whole prefill every time. So every echo evaluation records each position's entry here, keyed by
a hash chain over the fingerprint and the tokens up to and including that token, and an echo request
restores at most as many tokens as the memo covers (llm.LLM.prompt_logprobs). The entries equal what
a cold evaluation computes because the KV they were computed over is exact (README, "Exactness").
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from hashlib import blake2b

from cachetools import LRUCache

from promptcache.engines.llama_cpp.generation import TokenLogprob

PositionKey = bytes  # blake2b chain over the fingerprint and tokens[: i + 1]: names token i's entry


def position_keys(fingerprint: str, tokens: Sequence[int]) -> list[PositionKey]:
    """One key per token: key i names tokens[: i + 1] under this fingerprint."""
    keys = []
    h = blake2b(fingerprint.encode(), digest_size=16).digest()
    for token in tokens:
        h = blake2b(h + int(token).to_bytes(4, "little"), digest_size=16).digest()
        keys.append(h)
    return keys


class PromptLogprobs:
    """Entries (TokenLogprob of token i given tokens[:i]) by position key, least recently used out
    first past `max_entries` (an entry with 20 alternatives is about 2 KB). Thread-safe: a server's
    workers share one."""

    def __init__(self, max_entries: int = 65536) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._entries: LRUCache[PositionKey, TokenLogprob] = LRUCache(max_entries)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def covered(self, keys: Sequence[PositionKey]) -> list[TokenLogprob]:
        """Entries for tokens 1, 2, ... of the prompt whose keys these are, up to the first one missing."""
        out = []
        with self._lock:
            for key in keys[1:]:
                entry = self._entries.get(key)  # a hit is the most recently used
                if entry is None:
                    break
                out.append(entry)
        return out

    def put(self, keys: Sequence[PositionKey], entries: Sequence[TokenLogprob]) -> None:
        """Remember entries for tokens 1, 2, ... (entries[j] belongs to keys[j + 1])."""
        with self._lock:
            for key, entry in zip(keys[1:], entries, strict=False):
                self._entries[key] = entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


__all__ = ["PromptLogprobs", "position_keys"]
