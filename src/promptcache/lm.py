"""CachedCausalLM: next-token log-probabilities for probabilistic programs, as LLaMPPL offers them.

Owns the result cache (log-probabilities by exact token sequence); KV reuse across particles that
extend one prompt is the LLM's prefix cache, so this module stores no engine state itself.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from promptcache.engines.llama_cpp import LLM


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p for every token, computed stably in float64 and returned as float32."""
    x = logits.astype(np.float64)
    x -= x.max()
    x -= np.log(np.exp(x).sum())
    return x.astype(np.float32)


class CachedCausalLM:
    """Next-token log-probabilities with two caches (LLaMPPL's `CachedCausalLM` API):

    - results: the log-probabilities after an exact token sequence, kept in an LRU of `cache_size`
      entries, so cloned particles asking the same question run the model once;
    - KV: every query goes through the LLM's prefix cache, so particles extending a shared prompt
      (see `cache_kv`) evaluate only their own tokens, with logits equal to an uncached run.
    """

    def __init__(self, llm: LLM | None = None, *, cache_size: int = 1024) -> None:
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError("cache_size must be an int >= 0 (0 turns the result cache off)")
        self.llm = llm if llm is not None else LLM()
        self.cache_size = cache_size
        self._results: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @classmethod
    def from_pretrained(
        cls, model_path: str | os.PathLike[str] | None = None, *, cache_size: int = 1024, **llm_kwargs: Any
    ) -> CachedCausalLM:
        """Load a GGUF (default: the embedded SmolLM2) with an LLM(**llm_kwargs)."""
        return cls(LLM(model_path, **llm_kwargs), cache_size=cache_size)

    @property
    def vocab_size(self) -> int:
        return self.llm.n_vocab

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text)

    def next_token_logprobs(self, token_ids: Sequence[int]) -> np.ndarray:
        """log p(next token | token_ids) for every token (read-only float32 array of vocab_size).

        Raises ValueError/TypeError for an empty or malformed token sequence.
        """
        key = tuple(int(t) for t in token_ids)
        with self._lock:
            cached = self._results.get(key)
            if cached is not None:
                self._results.move_to_end(key)
                self.hits += 1
                return cached
        logprobs = log_softmax(self.llm.logits(list(key)))
        logprobs.setflags(write=False)
        with self._lock:
            self.misses += 1
            if self.cache_size:
                self._results[key] = logprobs
                while len(self._results) > self.cache_size:
                    self._results.popitem(last=False)
        return logprobs

    next_token_logprobs_unbatched = next_token_logprobs

    def cache_kv(self, prompt_tokens: Sequence[int]) -> None:
        """Evaluate a prompt every particle will extend, and keep its KV in the prefix cache."""
        self.llm.logits(list(prompt_tokens))

    def clear_cache(self) -> None:
        """Forget cached log-probabilities and the KV cache (as LLaMPPL's clear_cache does)."""
        with self._lock:
            self._results.clear()
        self.clear_kv_cache()

    def clear_kv_cache(self) -> None:
        """Forget cached KV (live context and prefix cache), keeping cached log-probabilities."""
        self.llm.kv_cache_clear()
        if self.llm.cache is not None:
            self.llm.cache.clear()
