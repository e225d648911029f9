"""EngineView: what an LLM tells of the engine it runs on (model, vocabulary, cache, fingerprint,
exactness, context) and the model's tokenizer, as LLM's base class.

Owns only these read-through facts (and switching the cache); the conversation and the calls a user
makes are LLM's (llm.py). Never evaluates anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from promptcache.cache import PromptCache
    from promptcache.codec import StateCodec
    from promptcache.engines.llama_cpp.context import Context
    from promptcache.engines.llama_cpp.engine import Engine
    from promptcache.engines.llama_cpp.plan import ReuseRules


class EngineView:
    """Read-through facts of `self.engine` (set by the subclass)."""

    engine: Engine

    @property
    def model_path(self) -> str:
        return self.engine.model.path

    @property
    def model(self) -> Any:
        """The loaded GGUF (engines.llama_cpp.Model): weights, vocabulary, metadata."""
        return self.engine.model

    @property
    def vocab(self) -> Any:
        """The model's llama_vocab pointer (for llama.cpp samplers such as grammars)."""
        return self.engine.model.vocab

    @property
    def n_vocab(self) -> int:
        return self.engine.model.n_vocab

    @property
    def n_ctx_train(self) -> int:
        return self.engine.model.n_ctx_train

    @property
    def cache(self) -> PromptCache | None:
        """The prefix cache (a PromptCache or None); setting a PromptCache, a name or None switches."""
        return self.engine.cache

    @cache.setter
    def cache(self, cache: PromptCache | str | None) -> None:
        self.engine.use_cache(cache)

    @property
    def codec(self) -> StateCodec:
        return self.engine.codec

    @property
    def fingerprint(self) -> str:
        """Hash of the model file, KV layout, kernels and reuse mode (Engine.fingerprint)."""
        return self.engine.fingerprint

    @property
    def exact_batch(self) -> int:
        return self.engine.exact_batch

    @property
    def exact_chunk(self) -> int:
        return self.engine.exact_chunk

    @property
    def exact_strategy(self) -> str:
        """How reuse stays exact: "token", "aligned", "fast" (exact=False) or "none"."""
        return self.engine.exact_strategy

    @property
    def may_reuse(self) -> bool:
        return self.engine.may_reuse

    @property
    def rules(self) -> ReuseRules:
        return self.engine.rules

    # ------------------------------------------------------------ context

    @property
    def context(self) -> Context | None:
        """The live llama.cpp context (None before the first call or after close)."""
        return self.engine.context

    @property
    def context_size(self) -> int:
        """Tokens the live context holds per sequence (0 before the first call or after close)."""
        context = self.engine.context
        return context.n_ctx_seq if context is not None else 0

    @property
    def contexts_created(self) -> int:
        return self.engine.stats.contexts_created

    # ------------------------------------------------------------ tokens

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of `text` (a BOS is added when the model wants one and add_bos is True)."""
        return self.engine.model.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """Text of token ids."""
        return self.engine.model.detokenize(list(tokens), special=special)

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character)."""
        return self.engine.model.token_to_piece(token, special=special)

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends a generation (end of text, end of turn)."""
        return self.engine.model.is_eog(token)


__all__ = ["EngineView"]
