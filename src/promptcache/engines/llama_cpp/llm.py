"""LLM: llama.cpp generation with automatic prefix caching, context reuse and sessions.

Owns one model, its context and live sequence, and carries out the reuse plan (plan.py) against
the PromptCache; never decides reuse rules itself and never lays out bytes on disk.

Exactness: see the README's "Exactness" section. In short, a probe finds the smallest batch
`exact_batch` whose floats match one large batch; where there is one (strategy "token"), prompts
are evaluated in batches of at least that size (the uncached run too) and at least that many tokens
are evaluated after a restore. Where there is none (strategy "aligned"), every prompt is evaluated
in chunks aligned to multiples of a measured C and restored only at a multiple of C, so a cached run
repeats the cold run's kernel calls. In the default exact mode generated tokens' KV is never reused
as it is (a chat re-reads its reply as a batch: keep_reply). `exact=False` reuses generated tokens'
KV as llama-server does (logits may drift). States that cannot be cut (sliding-window or recurrent
models, or `whole_states=True`) are cached whole at checkpoints (n - exact_batch; aligned: the last
multiples of C) so repeats hit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from hashlib import blake2b
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.cache import Hit, PromptCache
from promptcache.codec import OpaqueCodec, StateCodec
from promptcache.engines.llama_cpp import probe, session
from promptcache.engines.llama_cpp.context import Closing, Context, bindings, token_piece
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
from promptcache.engines.llama_cpp.plan import (
    LiveSequence,
    ReuseRules,
    check_token_ids,
    common_prefix,
)
from promptcache.engines.llama_cpp.prompt_logprobs import PromptLogprobs, position_keys
from promptcache.errors import CodecError, ContextOverflowError, CorruptEntryError, PromptCacheError
from promptcache.files import atomic_write
from promptcache.model import default_model_path, model_identity

log = logging.getLogger(__name__)


def _resolve_cache(cache: PromptCache | str | None) -> PromptCache | None:
    """The PromptCache `cache` names: itself, "ram", "disk", "tiered" (CacheConfig's tiers) or None."""
    if cache is None or isinstance(cache, PromptCache):
        return cache
    from promptcache.config import build_cache

    return build_cache(cache)


def _splitting_codec() -> StateCodec:
    try:
        from promptcache.codec.llama_state import LlamaStateCodec

        return LlamaStateCodec()
    except ImportError:  # pragma: no cover - the codec ships with the package
        return OpaqueCodec()


def _check_arguments(
    n_ctx: int, n_batch: int, exact: bool, exact_batch: int | None, exact_chunk: int | None
) -> None:
    """LLM's numeric arguments checked before anything is loaded. Raises ValueError."""
    if not isinstance(n_ctx, int) or n_ctx < 16:
        raise ValueError("n_ctx must be an int >= 16")
    if not isinstance(n_batch, int) or n_batch < 64:
        raise ValueError("n_batch must be an int >= 64 (smaller batches are not exact on CPU)")
    if exact_batch is not None and (not isinstance(exact_batch, int) or not 1 <= exact_batch <= 32):
        raise ValueError("exact_batch must be an int in [1, 32] or None (probe it)")
    if exact_chunk is not None and (
        not isinstance(exact_chunk, int) or not 1 <= exact_chunk <= n_batch or not exact
    ):
        raise ValueError(
            "exact_chunk must be an int in [1, n_batch] (exact mode) or None (measure it)"
        )


class LLM(Closing):
    """A llama.cpp model with automatic prefix caching (cyllama-style API).

    model_path: a GGUF file (default: promptcache.default_model_path()). n_ctx: the smallest context
    to create; a call that needs more recreates it larger (up to the model's training context).
    cache: a PromptCache, "ram", "disk", "tiered" (the tiers CacheConfig reads from PROMPTCACHE_*
    variables and $PROMPTCACHE_CONFIG: RAM, disk, Redis) or None. exact: see the module docstring.
    exact_batch: skip the probe and trust this batch size. exact_chunk: use the aligned schedule with
    this chunk C instead of the probe's choice (exact mode; mostly for tests and measurements).
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
    ) -> None:
        _check_arguments(n_ctx, n_batch, exact, exact_batch, exact_chunk)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_threads = n_threads or max(1, min(os.cpu_count() or 1, 8))
        self.exact = exact
        self.flash_attn = flash_attn
        self.verbose = verbose
        self._load_model(model_path)
        self._set_up_caching(cache, whole_states, exact_batch, exact_chunk)
        self._fingerprint: str | None = None
        self._context: Context | None = None
        self._live = LiveSequence()
        self._checkpoints: list[tuple[list[int], bytes]] = []
        self._lock = threading.RLock()
        self._chat_formatter: Any = None
        self.contexts_created = 0
        self.last_stats = RunStats()

    def _load_model(self, model_path: str | os.PathLike[str] | None) -> None:
        """Load the GGUF weights (no context yet). Raises FileNotFoundError when there is no file."""
        llama_cpp = bindings()
        from llama_cpp._internals import LlamaModel

        self.model_path = str(model_path) if model_path is not None else str(default_model_path())
        if not Path(self.model_path).is_file():
            raise FileNotFoundError(f"no model file at {self.model_path}")
        self._model = LlamaModel(
            path_model=self.model_path,
            params=llama_cpp.llama_model_default_params(),
            verbose=self.verbose,
        )
        self._vocab = self._model.vocab
        self.n_vocab = self._model.n_vocab()
        self.n_ctx_train = self._model.n_ctx_train()

    def _set_up_caching(
        self,
        cache: PromptCache | str | None,
        whole_states: bool,
        exact_batch: int | None,
        exact_chunk: int | None,
    ) -> None:
        """The prompt cache, the codec that cuts states into it and the exactness overrides."""
        self.cache = _resolve_cache(cache)
        self.codec: StateCodec = OpaqueCodec() if whole_states else _splitting_codec()
        self._probed: probe.ProbeResult | None = (
            probe.ProbeResult(exact_batch, True) if exact_batch is not None else None
        )
        self._chunk_override = exact_chunk
        # Prompt log-probabilities for echo, next to the KV cache (prompt_logprobs.py says why);
        # a server's workers share one. Unused without a cache: then echo evaluates every prompt.
        self.prompt_logprob_memo = PromptLogprobs()

    # ------------------------------------------------------------ identity and rules

    def _probe(self) -> probe.ProbeResult:
        """(b or 0, layout_ok, C), probed once per model, settings and machine; a layout the codec
        cannot cut switches the LLM to whole states."""
        if self._probed is None:
            key = probe.probe_key(
                self.model_path, flash_attn=self.flash_attn, n_threads=self.n_threads
            )
            self._probed = probe.recorded(key, self._measure, Path(self.model_path).name)
            b, layout_ok, chunk = self._probed
            if b == 0 and self.exact:
                log.info(
                    "%s: no batch size reproduces one batch's floats on this machine; exact mode "
                    "uses the aligned schedule (chunks of %d tokens)",
                    Path(self.model_path).name,
                    self._chunk_override or chunk,
                )
            if not layout_ok and self.codec.splittable:
                log.info(
                    "%s: state layout cannot be cut; caching whole states",
                    Path(self.model_path).name,
                )
                self._use_codec(OpaqueCodec())
        return self._probed

    def _measure(self) -> probe.ProbeResult:
        tokens = self.tokenize(probe.PROBE_TEXT)
        context = self._ensure_context(max(len(tokens), probe.TIMING_TOKENS) + 1)
        self._live.clear()
        result = probe.measure(context, tokens, _splitting_codec())
        log.debug("probe of %s: %s", self.model_path, result)
        return result

    def _use_codec(self, codec: StateCodec) -> None:
        self.codec = codec
        self._fingerprint = None  # the fingerprint names the codec

    @property
    def exact_batch(self) -> int:
        """The smallest batch whose floats match a large batch's (probed once per model, settings and
        machine; the result is kept in the user cache directory). 2 where the probe found none."""
        return self._probe()[0] or 2

    @property
    def exact_chunk(self) -> int:
        """The aligned schedule's chunk C (0 where exact mode reuses at any token, or exact=False):
        the override given, else the probe's measurement (at most n_batch)."""
        if not self.exact:
            return 0
        b, _, chunk = self._probe()
        if self._chunk_override:
            return self._chunk_override
        return min(chunk, self.n_batch) if b == 0 and chunk else 0

    @property
    def exact_strategy(self) -> str:
        """How reuse stays exact here: "token" (restore at any token, evaluate at least exact_batch
        after it), "aligned" (chunks at multiples of exact_chunk), or "fast" (exact=False)."""
        return self.rules.strategy

    @property
    def may_reuse(self) -> bool:
        """Whether restoring a prefix and evaluating the rest is allowed: in fast mode always; in
        exact mode with an exact batch size or on the aligned schedule."""
        return self._probe()[0] > 0 or not self.exact or self.exact_chunk > 0

    @property
    def rules(self) -> ReuseRules:
        """The reuse rules in force (README, "Exactness"): probed batch size, mode, codec, context batch."""
        n_batch = self._context.n_batch if self._context is not None else self.n_batch
        return ReuseRules(
            exact_batch=self.exact_batch,
            exact=self.exact,
            may_reuse=self.may_reuse,
            splittable=self.codec.splittable,
            n_batch=n_batch,
            chunk=min(self.exact_chunk, n_batch),
        )

    @property
    def fingerprint(self) -> str:
        """Hash of the GGUF's identity, the KV layout settings, the kernels and the reuse mode
        (strategy and chunk: a state built on one schedule is never served to another)."""
        if self._fingerprint is None:
            self._probe()  # the probe settles the codec, which the fingerprint names
            llama_cpp = bindings()
            parts = [
                "llama.cpp",
                model_identity(self.model_path),
                f"llama-cpp-python={llama_cpp.__version__}",
                f"flash_attn={self.flash_attn}",
                "kv=f16/f16",
                f"exact={self.exact}",
                f"codec={self.codec.name}",
                f"strategy={self.exact_strategy}",
                f"chunk={self.exact_chunk}",
                llama_cpp.llama_print_system_info().decode(errors="replace"),
            ]
            self._fingerprint = blake2b("\x00".join(parts).encode(), digest_size=16).hexdigest()
        return self._fingerprint

    # ------------------------------------------------------------ context

    def _ensure_context(self, n_needed: int) -> Context:
        """The live context, (re)created with room for n_needed tokens; raises ContextOverflowError."""
        if n_needed > self.n_ctx_train:
            raise ContextOverflowError(
                f"this request needs {n_needed} tokens of context; the model holds {self.n_ctx_train}: "
                "shorten the prompt or lower max_tokens"
            )
        if self._context is not None and self._context.n_ctx >= n_needed:
            return self._context
        n_ctx = self.n_ctx
        while n_ctx < n_needed:
            n_ctx *= 2
        self._free_context()
        self._context = Context(
            self._model,
            n_ctx=min(n_ctx, self.n_ctx_train),
            n_batch=self.n_batch,
            n_threads=self.n_threads,
            flash_attn=self.flash_attn,
            verbose=self.verbose,
        )
        self.contexts_created += 1
        return self._context

    def _free_context(self) -> None:
        if self._context is not None:
            self._context.close()
        self._context = None
        self._live.clear()

    @property
    def context(self) -> Context | None:
        """The live llama.cpp context (None before the first call or after close). Changing its KV
        cache directly desynchronises the LLM's live sequence: call kv_cache_clear() afterwards."""
        return self._context

    def reserve(self, n_ctx: int | None = None) -> None:
        """Create the context now (for n_ctx tokens, default the constructor's) instead of on the
        first call, so that call's latency holds no allocation."""
        with self._lock:
            self._ensure_context(n_ctx or self.n_ctx)

    @property
    def context_size(self) -> int:
        """Tokens the live context holds (0 before the first call or after close)."""
        return self._context.n_ctx if self._context is not None else 0

    def kv_cache_clear(self) -> None:
        """Empty the live context's KV cache, keeping the context."""
        with self._lock:
            if self._context is not None:
                self._context.truncate(0)
            self._live.clear()

    def reset_context(self) -> None:
        """Drop the context; the next call creates a fresh one (the PromptCache is kept)."""
        with self._lock:
            self._free_context()

    def close(self) -> None:
        """Release the context and batch (idempotent). The model stays loaded; a later call re-creates them."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            self._free_context()

    # ------------------------------------------------------------ tokens

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of `text` (a BOS is added when the model wants one and add_bos is True)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        return list(self._model.tokenize(text.encode("utf-8"), add_bos, special))

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """Text of token ids."""
        return self._model.detokenize(list(tokens), special).decode("utf-8", errors="replace")

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character)."""
        return token_piece(self._vocab, token, special)

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends a generation (end of text, end of turn)."""
        return bool(bindings().llama_vocab_is_eog(self._vocab, token))

    @property
    def model(self) -> Any:
        """llama-cpp-python's LlamaModel of the GGUF (metadata, vocabulary); other engines on the
        same model (SequenceEngine) share this handle rather than load the file again."""
        return self._model

    @property
    def vocab(self) -> Any:
        """The model's llama_vocab pointer (for llama.cpp samplers such as grammars)."""
        return self._vocab

    def _check_tokens(self, tokens: Sequence[int]) -> list[int]:
        return check_token_ids(tokens, self.n_vocab)

    # ------------------------------------------------------------ prefill and remember

    def _lookup(self, prompt: list[int], limit: int, have: int, align: int = 0) -> Hit | None:
        """The cache's longest prefix of `prompt` longer than `have` tokens and at most `limit`."""
        assert self.cache is not None
        try:
            hit = self.cache.lookup(
                prompt,
                self.fingerprint,
                max_tokens=limit,
                min_tokens=have,
                codec=self.codec,
                align=align,
                trim=True,  # _restore truncates a longer state to hit.tokens_reused
            )
        except PromptCacheError as exc:
            log.warning("cache lookup failed (%s); evaluating the whole prompt", exc)
            return None
        return hit if hit is not None and hit.tokens_reused > have else None

    def _restore(
        self, context: Context, prompt: list[int], rules: ReuseRules, cap: int | None = None
    ) -> tuple[int, str]:
        """Bring the context to the longest reusable prefix of `prompt` (live or cached), at most
        `cap` tokens (on the aligned schedule, cut to a multiple of its chunk): (tokens, source)."""
        cap = len(prompt) if cap is None else cap
        if rules.chunk:
            cap = cap // rules.chunk * rules.chunk
        reused = min(rules.live_reuse(self._live, prompt), cap)
        if not context.can_truncate(reused):  # sliding-window cells before `reused` are gone
            reused = 0
        limit = min(rules.limit(len(prompt)), cap)
        hit = (
            self._lookup(prompt, limit, reused, rules.chunk)
            if self.cache is not None and limit > reused
            else None
        )
        if hit is not None and rules.align(hit.tokens_reused) != hit.tokens_reused:
            hit = self._aligned_hit(hit, rules.align(hit.tokens_reused), reused)
        if hit is not None:
            if context.load_state(hit.state):
                if hit.trimmed:  # the cells past the prefix are another sequence's: exact to drop
                    context.truncate(hit.tokens_reused)
                self._live.set(prompt[: hit.tokens_reused])
                return hit.tokens_reused, hit.source
            log.warning(
                "llama.cpp refused a cached state of %d tokens; evaluating instead",
                hit.tokens_reused,
            )
            reused = 0
        context.truncate(reused)
        self._live.set(prompt[:reused])
        return reused, "live" if reused else "none"

    def _aligned_hit(self, hit: Hit, n: int, have: int) -> Hit | None:
        """`hit` cut to its first n tokens (a restore point of the aligned schedule), or None when
        that is no more than the `have` tokens the live context holds or the codec cannot cut it."""
        if n <= have or not self.codec.splittable:
            return None
        return hit.cut(n, self.codec)  # cut to n: nothing left to trim

    def _evaluate(
        self,
        context: Context,
        tokens: list[int],
        start: int,
        batches: Sequence[tuple[int, int]],
        checkpoints: Sequence[int],
        rows: list[np.ndarray] | None = None,
    ) -> None:
        """Decode `batches` of `tokens` (from `start`), saving a whole state at each checkpoint.
        With `rows`, every evaluated position's logits are appended to it (one array per batch)."""
        points = set(checkpoints)
        if start in points:
            self._checkpoints.append((tokens[:start], context.state_bytes()))
        for batch in batches:
            context.decode(tokens[batch[0] : batch[1]], batch[0], all_logits=rows is not None)
            if rows is not None:
                rows.append(context.batch_logits(batch[1] - batch[0]))
            if batch[1] in points:
                self._checkpoints.append((tokens[: batch[1]], context.state_bytes()))

    def _prefill(
        self,
        prompt: list[int],
        max_new: int,
        stats: RunStats,
        *,
        cap: int | None = None,
        rows: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Bring the context to exactly `prompt`, reusing at most `cap` tokens; returns the last
        token's logits. With `rows`, every evaluated position's logits are appended to it (one
        array per batch), from the first token not reused on, in the same batches as without."""
        n = len(prompt)
        self._ensure_context(n + max_new)
        self._probe()  # the first probe runs on (and may regrow) the live context
        context = self._ensure_context(n + max_new)
        rules = self.rules
        t0 = time.perf_counter()
        reused, source = self._restore(context, prompt, rules, cap)
        stats.restore_ms = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        plan = rules.prefill(n, reused, caching=self.cache is not None)
        self._checkpoints = []
        self._evaluate(context, prompt, reused, plan.batches, plan.checkpoints, rows)
        stats.prefill_ms = (time.perf_counter() - t1) * 1000
        self._live.set(prompt, plan.n_reusable)
        stats.prompt_tokens, stats.tokens_reused, stats.source = n, reused, source
        stats.strategy, stats.chunk = rules.strategy, rules.chunk
        stats.tokens_evaluated = n - reused
        return context.last_logits()

    def _remember(
        self, prompt: list[int], stats: RunStats, keep_reply: KeepReply = False, reply: str = ""
    ) -> None:
        """Settle the live sequence after a reply (plan.ReuseRules.finish: drop or re-read generated
        tokens, read ahead a chat's turn separator) and cache what this call computed."""
        context = self._context
        if context is None:
            return
        t0 = time.perf_counter()
        rules = self.rules
        target = self._next_turn_prefix(keep_reply, reply) if keep_reply is not True else None
        caching = self.cache is not None
        finish = rules.finish(prompt, self._live, target, bool(keep_reply), caching=caching)
        if finish.keep < len(self._live.tokens):
            context.truncate(finish.keep)
        if finish.batches:
            self._evaluate(context, finish.tokens, finish.keep, finish.batches, finish.checkpoints)
            stats.reply_reread_ms = (time.perf_counter() - t0) * 1000
        self._live.set(finish.tokens, finish.n_reusable)
        if self.cache is not None and rules.may_reuse:
            stats.bytes_cached += self._cache_live(context, rules)
            stats.cache_insert_ms = (time.perf_counter() - t0) * 1000

    def _cache_live(self, context: Context, rules: ReuseRules) -> int:
        """Insert the pending checkpoints and the live sequence (once all of it is reusable, as
        ReuseRules.finish leaves it, and, for a state that cannot be cut on the aligned schedule,
        only where it ends at a restore point); returns the bytes stored."""
        assert self.cache is not None
        stored = 0
        tokens = self._live.tokens
        whole = self.codec.splittable or rules.align(len(tokens)) == len(tokens)
        try:
            pending, self._checkpoints = self._checkpoints, []
            for point_tokens, state in pending:
                if not self.cache.contains(point_tokens, self.fingerprint):
                    stored += self._insert(point_tokens, state)
            fp = self.fingerprint
            # A shared store may hold every chunk already (another process wrote them): then index
            # them without reading and splitting the state again.
            if (
                whole
                and self._live.n_reusable == len(tokens)
                and not (
                    self.cache.contains(tokens, fp)
                    or self.cache.adopt(tokens, fp, codec=self.codec)
                )
            ):
                stored += self._insert(tokens, context.state_bytes())
        except PromptCacheError as exc:
            log.warning("could not cache a %d-token state: %s", len(tokens), exc)
        return stored

    def _next_turn_prefix(self, keep_reply: KeepReply, reply: str) -> list[int] | None:
        """The tokens every next turn of this chat starts with (prompt, reply, turn separator), found by
        rendering the template with two different next user messages; None without a chat's messages."""
        if isinstance(keep_reply, bool) or not reply:
            return None
        history = [*keep_reply, {"role": "assistant", "content": reply}]
        try:
            a = self.chat_tokens([*history, {"role": "user", "content": "A"}])
            b = self.chat_tokens([*history, {"role": "user", "content": "B"}])
        except Exception as exc:  # noqa: BLE001 - a template may refuse the conversation: no read-ahead
            log.debug("no next-turn prefix: %s", exc)
            return None
        return a[: common_prefix(a, b)]

    def _insert(self, tokens: list[int], state: bytes) -> int:
        assert self.cache is not None
        try:
            return self.cache.insert(tokens, state, self.fingerprint, codec=self.codec)
        except CodecError as exc:
            if isinstance(self.codec, OpaqueCodec):
                raise
            log.warning("state layout not understood (%s); caching whole states from now on", exc)
            self._use_codec(OpaqueCodec())
            return 0

    # ------------------------------------------------------------ generation

    def _run(
        self, prompt: list[int], config: GenerationConfig, keep_reply: KeepReply = False
    ) -> Iterator[Event]:
        """Yield (token, new text, finish_reason or None); sets last_stats; caches the prompt at the end."""
        stats = RunStats()
        self.last_stats = stats
        t_start = time.perf_counter()
        max_new = min(config.max_tokens, self.n_ctx_train - len(prompt))
        if max_new < 1:
            raise ContextOverflowError(
                f"the prompt has {len(prompt)} tokens and the model's context holds {self.n_ctx_train}"
            )
        grammar = Grammar(self._vocab, config.grammar) if config.grammar else None
        loop = TokenLoop(
            config, max_new, is_eog=self.is_eog, piece=self.token_to_piece, grammar=grammar
        )
        try:
            logits = self._prefill(prompt, max_new, stats)
            while True:
                token, events = loop.feed(logits)
                if len(loop.generated) <= 1 and not stats.ttft_ms:
                    stats.ttft_ms = (time.perf_counter() - t_start) * 1000
                stats.tokens_generated = len(loop.generated)
                yield from events
                if token is None:
                    break
                logits = self._decode_generated(token)
        finally:
            loop.close()
            stats.tokens_generated = len(loop.generated)
            self._remember(prompt, stats, keep_reply, loop.text.text)
            stats.total_ms = (time.perf_counter() - t_start) * 1000

    def _decode_generated(self, token: int) -> np.ndarray:
        """Decode one generated token; its KV is reusable only in fast mode (README, "Exactness")."""
        assert self._context is not None
        self._context.decode([token], len(self._live.tokens))
        self._live.append(token, reusable=not self.exact)
        return self._context.last_logits()

    def _config(
        self, config: GenerationConfig | None, overrides: dict[str, Any]
    ) -> GenerationConfig:
        if config is not None and not isinstance(config, GenerationConfig):
            raise TypeError("config must be a GenerationConfig")
        try:
            return replace(config or GenerationConfig(), **overrides)
        except TypeError as exc:
            raise TypeError(f"unknown generation option: {exc}") from None

    def _prompt_tokens(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return self.tokenize(prompt)
        return self._check_tokens(prompt)

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
            tokens = self._prompt_tokens(prompt)
            stats = RunStats()
            self.last_stats = stats
            t0 = time.perf_counter()
            memo = self.prompt_logprob_memo if self.cache is not None else None
            keys = position_keys(self.fingerprint, tokens) if memo is not None else []
            known = memo.covered(keys) if memo is not None else []
            rows: list[np.ndarray] = []
            self._prefill(tokens, 1, stats, cap=len(known), rows=rows)
            reused = stats.tokens_reused
            entries = known[:reused]  # tokens 1 .. reused
            logits = np.concatenate(rows) if rows else np.empty((0, self.n_vocab), np.float32)
            for i in range(reused + 1, len(tokens)):  # token i needs the logits at i - 1
                entries.append(token_logprob(logits[i - 1 - reused], tokens[i], TOP_LOGPROBS_MAX))
            if memo is not None:
                memo.put(keys[reused:], entries[reused:])  # entries of tokens reused + 1, ...
            self._remember(tokens, stats)
            stats.ttft_ms = stats.total_ms = (time.perf_counter() - t0) * 1000
            return [None, *(e.head(top_k) for e in entries)]

    # ------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> tuple[str, list[str]]:
        """The prompt text for `messages` (with the assistant turn opened) and the template's stop strings."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        for m in messages:
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise ValueError("each message needs a str 'role' and a str 'content'")
        if self._chat_formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            template = self._model.metadata().get("tokenizer.chat_template")
            if not template:
                raise PromptCacheError("this model has no chat template; use llm(prompt) instead")
            bos = (
                self._model.token_get_text(self._model.token_bos())
                if self._model.token_bos() >= 0
                else ""
            )
            eos = (
                self._model.token_get_text(self._model.token_eos())
                if self._model.token_eos() >= 0
                else ""
            )
            self._chat_formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        formatted = self._chat_formatter(messages=list(messages))
        stop = formatted.stop
        return formatted.prompt, ([stop] if isinstance(stop, str) else list(stop or []))

    def chat_tokens(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """The prompt tokens for `messages` under the model's chat template."""
        prompt, _ = self.apply_chat_template(messages)
        return self.tokenize(prompt, add_bos=False, special=True)

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        config: GenerationConfig | None = None,
        *,
        stream: bool = False,
        **overrides: Any,
    ) -> str | Iterator[str]:
        """The assistant's reply to `messages`, using the model's chat template."""
        tokens = self.chat_tokens(messages)
        if stream:
            return self.stream(tokens, config, keep_reply=list(messages), **overrides)
        return self.complete(tokens, config, keep_reply=list(messages), **overrides).text

    # ------------------------------------------------------------ logits

    def logits(self, prompt: str | Sequence[int]) -> np.ndarray:
        """Next-token logits after `prompt`, computed with the same caching as generation."""
        with self._lock:
            tokens = self._prompt_tokens(prompt)
            stats = RunStats()
            self.last_stats = stats
            out = self._prefill(tokens, 1, stats)
            self._remember(tokens, stats)
            return out

    # ------------------------------------------------------------ sessions

    def session_bytes(self) -> bytes:
        """The live conversation (tokens and state) as a self-checking, model-stamped blob."""
        with self._lock:
            if self._context is None or not self._live.tokens:
                raise PromptCacheError("nothing to save: the context holds no tokens yet")
            state = self._context.state_bytes()
            return session.pack(
                self._live, state, codec_name=self.codec.name, fingerprint=self.fingerprint
            )

    def save_session(self, path: str | os.PathLike[str]) -> int:
        """Write the live conversation to `path` atomically; returns the bytes written."""
        return atomic_write(path, self.session_bytes())

    def load_session_bytes(self, blob: bytes) -> int:
        """Restore a conversation saved by session_bytes(); returns its token count.

        Raises ModelMismatchError for another model or layout and CorruptEntryError for damaged
        bytes; either way the LLM stays usable (its context is emptied only when loading fails late).
        """
        live, state = session.unpack(blob, fingerprint=self.fingerprint)
        with self._lock:
            context = self._ensure_context(len(live.tokens) + 1)
            if not context.load_state(state):
                self._live.clear()
                raise CorruptEntryError("llama.cpp refused the session's state")
            self._live.set(live.tokens, live.n_reusable)
            return len(live.tokens)

    def load_session(self, path: str | os.PathLike[str]) -> int:
        """Restore a conversation saved by save_session(); see load_session_bytes for errors."""
        try:
            blob = Path(path).read_bytes()
        except OSError as exc:
            raise PromptCacheError(f"cannot read session {path}: {exc}") from exc
        return self.load_session_bytes(blob)

    @property
    def tokens(self) -> list[int]:
        """The tokens whose KV the live context holds."""
        return list(self._live.tokens)

    def state_bytes(self) -> bytes:
        """The live sequence's llama.cpp state (what the cache would store for `tokens`)."""
        with self._lock:
            if self._context is None:
                raise PromptCacheError("no context yet: run a prompt first")
            return self._context.state_bytes()


__all__ = ["LLM"]
