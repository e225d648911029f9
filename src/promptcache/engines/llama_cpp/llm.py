"""LLM: llama.cpp generation with automatic prefix caching, context reuse and sessions (cyllama's API).

Owns one conversation: a handle on one sequence of an Engine (its own, of one sequence, unless one is
given), the calls a user makes (complete, stream, chat, logits, prompt log-probabilities, sessions)
and what a reply leaves for the next call. Never plans reuse (plan.py), never schedules rows or
touches llama.cpp (engine.py), never lays out bytes on disk.

Exactness: README, "Exactness". A call's answer is the engine's canonical one (the prompt as an
uncached prefill evaluates it, each generated token decoded alone), so the same request gets the
same tokens and logprobs here, from CachedCausalLM and from the server with any --parallel.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from promptcache.cache import PromptCache
from promptcache.engines.llama_cpp.chat import ChatFormat
from promptcache.engines.llama_cpp.context import Closing, check_room
from promptcache.engines.llama_cpp.engine import Advance, Engine
from promptcache.engines.llama_cpp.engine_view import EngineView
from promptcache.engines.llama_cpp.generation import (
    TOP_LOGPROBS_MAX,
    Completion,
    Event,
    GenerationConfig,
    Grammar,
    KeepReply,
    RunStats,
    Step,
    TokenLogprob,
    TokenLoop,
    token_logprob,
)
from promptcache.engines.llama_cpp.plan import Query
from promptcache.engines.llama_cpp.prompt_logprobs import PromptLogprobs, position_keys
from promptcache.engines.llama_cpp.session import SessionMethods
from promptcache.errors import ContextOverflowError

log = logging.getLogger(__name__)


class LLM(EngineView, SessionMethods, Closing):
    """A llama.cpp model with automatic prefix caching (cyllama-style API).

    model_path: a GGUF file (default: promptcache.default_model_path()). n_ctx: the smallest context
    to create; a call that needs more recreates it larger (up to the model's training context).
    cache: a PromptCache, "ram", "disk", "tiered" (the tiers CacheConfig reads from PROMPTCACHE_*
    variables and $PROMPTCACHE_CONFIG: RAM, disk, Redis) or None. exact: README, "Exactness".
    exact_batch: skip the probe and trust this batch size. exact_chunk: use the aligned schedule with
    this chunk C instead of the probe's choice (exact mode; mostly for tests and measurements).
    engine: run on this Engine's sequences (shared with other handles) instead of an own one; the
    other arguments but model_path are then the engine's.
    After close() the object still works: the next call creates a new context.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
        cache: PromptCache | str | None = "ram",
        exact: bool = True,
        exact_batch: int | None = None,
        exact_chunk: int | None = None,
        flash_attn: bool = False,
        whole_states: bool = False,
        verbose: bool = False,
        engine: Engine | None = None,
    ) -> None:
        self._own = engine is None
        self.engine = engine or Engine(
            model_path,
            cache=cache,
            n_seq=1,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=n_threads,
            exact=exact,
            exact_batch=exact_batch,
            exact_chunk=exact_chunk,
            flash_attn=flash_attn,
            whole_states=whole_states,
            verbose=verbose,
        )
        s = self.engine.settings
        self.n_ctx, self.n_batch, self.n_threads = s.n_ctx, s.n_batch, s.n_threads
        self.exact, self.flash_attn, self.verbose = s.exact, s.flash_attn, s.verbose
        self.chat_format = ChatFormat(self.engine.model)
        # Prompt log-probabilities for echo, next to the KV cache (prompt_logprobs.py says why);
        # a server's workers share one. Unused without a cache: then echo evaluates every prompt.
        self.prompt_logprob_memo = PromptLogprobs()
        self._seq: int | None = None  # the engine sequence this conversation lives in
        self._lock = threading.RLock()
        self.last_stats = RunStats()

    # ------------------------------------------------------------ context

    def reserve(self, n_ctx: int | None = None) -> None:
        """Create the context now (for n_ctx tokens, default the constructor's) instead of on the
        first call, so that call's latency holds no allocation."""
        with self._lock:
            self.engine.reserve(n_ctx or self.n_ctx)

    def kv_cache_clear(self, clear_data: bool = True) -> None:
        """Empty the KV cache of this conversation, keeping the context (clear_data: also zero the
        KV buffers, as cyllama's kv_cache_clear does; False clears only the metadata)."""
        with self._lock:
            if self._own:
                self.engine.clear(data=clear_data)
            elif self._seq is not None and self._seq in self.engine.sequences:
                self.engine.free(self._seq)
            self._seq = None

    def reset_context(self) -> None:
        """Drop the context; the next call creates a fresh one (the PromptCache is kept)."""
        with self._lock:
            self._release()

    def close(self) -> None:
        """Release the context (idempotent). The model stays loaded; a later call re-creates it."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            with lock:
                self._release()

    def _release(self) -> None:
        if self._own:
            self.engine.close()
        elif self._seq is not None and self._seq in self.engine.sequences:
            self.engine.free(self._seq)
        self._seq = None

    @property
    def tokens(self) -> list[int]:
        """The tokens whose KV this conversation's sequence holds."""
        held = self._held()
        return list(held.tokens) if held is not None else []

    def _held(self) -> Any:
        if self._seq is None or self._seq not in self.engine.sequences:
            return None
        return self.engine.held(self._seq)

    def _prompt_tokens(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return self.tokenize(prompt)
        return self.engine.check(prompt, "the prompt")

    # ------------------------------------------------------------ evaluation

    def _ask(self, query: Query) -> Advance:
        """Run `query` on this conversation's sequence until it is done."""
        first: Advance | None = None
        rows: list[tuple[int, np.ndarray]] = []
        while True:
            (adv,) = self.engine.advance([replace(query, hint=self._seq)])
            if adv.seq is not None:
                self._seq = adv.seq
                first = first or adv
            rows += adv.rows
            if adv.done:
                assert first is not None
                return replace(
                    adv,
                    reused=first.reused,
                    source=first.source,
                    rows=rows,
                    restore_ms=first.restore_ms,
                )

    def _prefill(self, prompt: list[int], stats: RunStats, **query: Any) -> Advance:
        """Bring this conversation's sequence to `prompt` (restoring what the live sequence or the
        cache holds); the answer carries the last token's logits."""
        t0 = time.perf_counter()
        adv = self._ask(Query(prompt, insert=False, **query))
        stats.restore_ms = adv.restore_ms  # lookup and state load, inside the round
        stats.prefill_ms = (time.perf_counter() - t0) * 1000 - adv.restore_ms
        rules = self.engine.rules
        stats.prompt_tokens, stats.tokens_reused, stats.source = len(prompt), adv.reused, adv.source
        stats.strategy, stats.chunk = rules.strategy, rules.chunk
        stats.tokens_evaluated = len(prompt) - adv.reused
        return adv

    def _remember(
        self, prompt: list[int], stats: RunStats, keep_reply: KeepReply = False, reply: str = ""
    ) -> None:
        """Settle the sequence after a reply (plan.ReuseRules.finish: drop or re-read generated
        tokens, read ahead a chat's turn separator) and cache what this call computed."""
        held = self._held()
        if held is None:
            return
        t0 = time.perf_counter()
        engine = self.engine
        target = None
        if not isinstance(keep_reply, bool) and reply:
            target = self.chat_format.next_turn_prefix(keep_reply, reply)
        reread = engine.finish_query(held.seq_id, prompt, target, bool(keep_reply))
        if reread is not None:
            self._ask(reread)
            stats.reply_reread_ms = (time.perf_counter() - t0) * 1000
        engine.settle(self._seq)  # type: ignore[arg-type]
        if engine.cache is not None and engine.may_reuse:
            stats.bytes_cached += engine.save(self._seq)  # type: ignore[arg-type]
            stats.cache_insert_ms = (time.perf_counter() - t0) * 1000

    def _run(
        self, prompt: list[int], config: GenerationConfig, keep_reply: KeepReply = False
    ) -> Iterator[Event]:
        """Yield (token, new text, finish_reason or None, logprobs); sets last_stats; caches the
        prompt (and a kept reply) at the end."""
        stats = RunStats()
        self.last_stats = stats
        t_start = time.perf_counter()
        max_new = min(config.max_tokens, self.n_ctx_train - len(prompt))
        if max_new < 1:
            raise ContextOverflowError(
                f"the prompt has {len(prompt)} tokens and the model's context holds {self.n_ctx_train}"
            )
        self.engine.reserve(max(len(prompt) + max_new, config.n_ctx or 0))
        grammar = Grammar(self.vocab, config.grammar) if config.grammar else None
        loop = TokenLoop(
            config, max_new, is_eog=self.is_eog, piece=self.token_to_piece, grammar=grammar
        )
        tokens = list(prompt)
        try:
            logits = self._prefill(prompt, stats).logits
            while True:
                token, events = loop.feed(logits)
                if len(loop.generated) <= 1 and not stats.ttft_ms:
                    stats.ttft_ms = (time.perf_counter() - t_start) * 1000
                stats.tokens_generated = len(loop.generated)
                yield from events
                if token is None:
                    break
                tokens.append(token)
                logits = self._ask(Query(tokens, len(prompt), insert=False)).logits
        finally:
            loop.close()
            stats.tokens_generated = len(loop.generated)
            self._remember(prompt, stats, keep_reply, loop.text.text)
            stats.total_ms = (time.perf_counter() - t_start) * 1000

    def _config(
        self, config: GenerationConfig | None, overrides: dict[str, Any]
    ) -> GenerationConfig:
        if config is not None and not isinstance(config, GenerationConfig):
            raise TypeError("config must be a GenerationConfig")
        try:
            return replace(config or GenerationConfig(), **overrides)
        except TypeError as exc:
            raise TypeError(f"unknown generation option: {exc}") from None

    # ------------------------------------------------------------ generation API

    def complete(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig | None = None,
        *,
        keep_reply: KeepReply = False,
        **overrides: Any,
    ) -> Completion:
        """Generate a completion of `prompt` (text, or token ids). keep_reply: make the reply's KV
        reusable by the next call (costs a batch re-read of the reply where needed); pass the chat's
        messages to also read ahead the template's turn separator (chat does).
        Raises ValueError/TypeError on bad input and ContextOverflowError when the prompt cannot
        fit the model's context."""
        cfg = self._config(config, overrides)
        with self._lock:
            prompt_tokens = self._prompt_tokens(prompt)
            pieces, tokens, finish = [], [], "length"
            for token, piece, reason, _logprobs in self._run(prompt_tokens, cfg, keep_reply):
                if reason is not None:
                    finish = reason
                    continue
                pieces.append(piece)
                if token >= 0:
                    tokens.append(token)
            return Completion("".join(pieces), tokens, finish, len(prompt_tokens), self.last_stats)

    def __call__(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig | None = None,
        *,
        stream: bool = False,
        **overrides: Any,
    ) -> str | Iterator[str]:
        """The completion text of `prompt`, or with stream=True an iterator of text pieces."""
        if stream:
            return self.stream(prompt, config, **overrides)
        return self.complete(prompt, config, **overrides).text

    def stream(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig | None = None,
        *,
        keep_reply: KeepReply = False,
        **overrides: Any,
    ) -> Iterator[str]:
        """Text pieces as they are generated; closing the iterator early stops generation."""
        for piece, _reason in self.stream_events(
            prompt, config, keep_reply=keep_reply, **overrides
        ):
            if piece:
                yield piece

    def stream_events(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig | None = None,
        *,
        keep_reply: KeepReply = False,
        **overrides: Any,
    ) -> Iterator[tuple[str, str | None]]:
        """(text piece, finish_reason) pairs; the last one has the finish reason and no text."""
        for step in self.stream_steps(prompt, config, keep_reply=keep_reply, **overrides):
            yield step.text, step.finish_reason

    def stream_steps(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig | None = None,
        *,
        keep_reply: KeepReply = False,
        **overrides: Any,
    ) -> Iterator[Step]:
        """Steps (text piece, finish_reason, logprobs of the tokens the piece completes, given
        config.logprobs); the last one has the finish reason and no text."""
        cfg = self._config(config, overrides)
        with self._lock:
            prompt_tokens = self._prompt_tokens(prompt)
            for _token, piece, reason, logprobs in self._run(prompt_tokens, cfg, keep_reply):
                yield Step(piece, reason, logprobs)

    def _start_prompt(self, prompt: str | Sequence[int]) -> tuple[list[int], RunStats, float]:
        """(tokens, fresh last_stats, start time) of a call that reads a prompt's logits, once the
        context has room for them (ContextOverflowError when the model's context has none)."""
        tokens = self._prompt_tokens(prompt)
        stats = RunStats()
        self.last_stats = stats
        t0 = time.perf_counter()
        check_room(len(tokens) + 1, self.n_ctx_train)
        self.engine.reserve(len(tokens) + 1)
        return tokens, stats, t0

    def logits(self, prompt: str | Sequence[int]) -> np.ndarray:
        """Next-token logits after `prompt`, computed with the same caching as generation."""
        with self._lock:
            tokens, stats, t0 = self._start_prompt(prompt)
            out = self._prefill(tokens, stats).logits
            stats.ttft_ms = (time.perf_counter() - t0) * 1000
            self._remember(tokens, stats)
            stats.total_ms = (time.perf_counter() - t0) * 1000
            assert out is not None
            return out

    def prompt_logprobs(
        self, prompt: str | Sequence[int], top_k: int = 0
    ) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it, with its top_k
        alternatives (at most TOP_LOGPROBS_MAX); the first token has none (None), as in OpenAI's echo.

        Every evaluated position's logits are read, in the same batches as a plain prefill. With a
        cache, a prefix is restored only as far as `prompt_logprob_memo` holds its positions' entries
        (prompt_logprobs.py says why), and the new entries are remembered; without one, the whole
        prompt is evaluated. Sets last_stats; raises as complete() does."""
        if not isinstance(top_k, int) or not 0 <= top_k <= TOP_LOGPROBS_MAX:
            raise ValueError(f"top_k must be an int in [0, {TOP_LOGPROBS_MAX}]")
        with self._lock:
            tokens, stats, t0 = self._start_prompt(prompt)
            memo = self.prompt_logprob_memo if self.cache is not None else None
            keys = position_keys(self.fingerprint, tokens) if memo is not None else []
            known = memo.covered(keys) if memo is not None else []
            adv = self._prefill(tokens, stats, rows=True, max_reuse=len(known))
            entries = prompt_entries(tokens, adv, known)
            if memo is not None:
                memo.put(keys[adv.reused :], entries[adv.reused :])
            self._remember(tokens, stats)
            stats.ttft_ms = stats.total_ms = (time.perf_counter() - t0) * 1000
            return [None, *(e.head(top_k) for e in entries)]

    # ------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> tuple[str, list[str]]:
        """The prompt text for `messages` (with the assistant turn opened) and the template's stop
        strings; a GGUF without a template gets a plain "Role: content" format (logged once)."""
        return self.chat_format.apply(messages)

    def chat_tokens(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """The prompt tokens for `messages` under the model's chat template."""
        return self.chat_format.tokens(messages)

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        config: GenerationConfig | None = None,
        *,
        stream: bool = False,
        **overrides: Any,
    ) -> str | Iterator[str]:
        """The assistant's reply to `messages`, using the model's chat template."""
        tokens, stops = self.chat_format.render(messages)
        cfg = self._config(config, overrides)
        if stops and not cfg.stop:
            cfg = replace(cfg, stop=stops)
        if stream:
            return self.stream(tokens, cfg, keep_reply=list(messages))
        return self.complete(tokens, cfg, keep_reply=list(messages)).text


def prompt_entries(
    tokens: list[int], adv: Advance, known: list[TokenLogprob]
) -> list[TokenLogprob]:
    """Entries for tokens 1 .. n - 1 of a prompt: those of the reused prefix from `known`, the rest
    from the logits rows the evaluation returned (token i needs the logits at position i - 1)."""
    entries = known[: adv.reused]
    for lo, block in adv.rows:
        for j, logits in enumerate(block):
            i = lo + j + 1
            if i < len(tokens):
                entries.append(token_logprob(logits, tokens[i], TOP_LOGPROBS_MAX))
    return entries


__all__ = ["LLM", "prompt_entries"]
