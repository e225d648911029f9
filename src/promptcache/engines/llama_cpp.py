"""LLM: llama.cpp generation with automatic prefix caching, context reuse and sessions.

Owns one llama.cpp model and context and decides what to restore and what to evaluate;
it hands states to PromptCache and never lays out bytes on disk itself.

Exactness (DESIGN.md): llama.cpp's CPU kernels give a token evaluated alone other floats than
the same token inside a batch. A probe at load finds the smallest batch `exact_batch` that
matches a large one; every prompt is then evaluated in batches of at least that size (the
uncached run too), and after a restore at least the last `exact_batch` tokens are evaluated.
Generated tokens are decoded one at a time, so in the default exact mode their KV is not reused
as it is: a chat re-reads its reply as one batch right after generating it (keep_reply; about the
cost of pair decoding, but off the token stream and the next turn's first token). `exact=False` reuses them as llama-server does
(logits may drift). States whose layout cannot be cut (sliding-window or recurrent models, or
`whole_states=True`) are cached whole, with a checkpoint at n - exact_batch so repeats hit.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from hashlib import blake2b
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.cache import PromptCache
from promptcache.codec import OpaqueCodec, StateCodec
from promptcache.errors import (
    CodecError,
    ContextOverflowError,
    CorruptEntryError,
    ModelMismatchError,
    PromptCacheError,
)
from promptcache.model import default_model_path, file_identity
from promptcache.store import envelope

log = logging.getLogger(__name__)

_SESSION_KEY = "session"
_SESSION_FORMAT = "promptcache-session"
_SESSION_VERSION = 1
_PROBE_TEXT = (  # varied text: repetitive probes can agree by accident where real prompts do not
    "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days; "
    "returns of damaged items are free within thirty days, and gift cards never expire. "
    "Question: how long do refunds take? Answer: five business days, counted from the day the "
    "parcel reaches the warehouse in Leeds; card payments may need two more days to appear."
)
_PROBE_VERSION = 2


def _probe_file() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("promptcache")) / "exact-batch-probes.json"


def _load_probe(key: str) -> tuple[int, bool] | None:
    try:
        value = json.loads(_probe_file().read_text()).get(key)
        return (int(value[0]), bool(value[1])) if value else None
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return None


def _save_probe(key: str, value: tuple[int, bool]) -> tuple[int, bool]:
    """Remember a probe result for this machine (best effort: a read-only cache dir just re-probes)."""
    path = _probe_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        known[key] = list(value)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("could not keep the probe result: %s", exc)
    return value
KeepReply = bool | Sequence[dict[str, Any]]  # True, or a chat's messages (see LLM.complete)
_exact_batch_memo: dict[str, tuple[int, bool]] = {}  # per process, over the file


def _llama() -> Any:
    """The llama_cpp bindings, imported on first use and with their stderr logging silenced."""
    import llama_cpp
    import llama_cpp._logger

    if llama_cpp._logger.logger.level == 0:
        llama_cpp._logger.set_verbose(False)
    return llama_cpp


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate: llama-cpp-python's defaults; temperature 0 is greedy."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    stop: str | list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError("max_tokens must be an int >= 1")
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0")
        if self.top_p > 1 or self.min_p > 1:
            raise ValueError("top_p and min_p must be at most 1")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError("top_k must be an int >= 0 (0 keeps every token)")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError("seed must be an int or None")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of them")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


@dataclass
class RunStats:
    """What one call reused and computed. `source`: live, memory, disk, redis or none."""

    prompt_tokens: int = 0
    tokens_reused: int = 0
    tokens_evaluated: int = 0
    tokens_generated: int = 0
    source: str = "none"
    restore_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    cache_insert_ms: float = 0.0
    reply_reread_ms: float = 0.0
    bytes_cached: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Completion:
    """The result of one generation."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    stats: RunStats = field(default_factory=RunStats)


def _resolve_cache(cache: PromptCache | str | None) -> PromptCache | None:
    if cache is None or isinstance(cache, PromptCache):
        return cache
    if cache == "ram":
        return PromptCache()
    if cache == "disk":
        from promptcache.store.disk import DiskStore

        return PromptCache(DiskStore())
    if cache == "tiered":
        from promptcache.config import default_cache

        return default_cache()
    raise ValueError(f"cache must be a PromptCache, 'ram', 'disk', 'tiered' or None, not {cache!r}")


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that may be the start of a stop string: only that much
    is held back from streaming (holding a stop's full length delays every first token)."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    return int(np.argmax(x)) if x.any() else n


class LLM:
    """A llama.cpp model with automatic prefix caching (cyllama-style API).

    model_path: a GGUF file (default: promptcache.default_model_path()). n_ctx: the smallest context
    to create; a call that needs more recreates it larger (up to the model's training context).
    cache: a PromptCache, "ram", "disk", "tiered" (the tiers CacheConfig reads from PROMPTCACHE_*
    variables and $PROMPTCACHE_CONFIG: RAM, disk, Redis) or None. exact: see the module docstring.
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
        flash_attn: bool = False,
        whole_states: bool = False,
        verbose: bool = False,
    ) -> None:
        if not isinstance(n_ctx, int) or n_ctx < 16:
            raise ValueError("n_ctx must be an int >= 16")
        if not isinstance(n_batch, int) or n_batch < 64:
            raise ValueError("n_batch must be an int >= 64 (smaller batches are not exact on CPU)")
        llama_cpp = _llama()
        from llama_cpp._internals import LlamaModel

        self.model_path = str(model_path) if model_path is not None else str(default_model_path())
        if not Path(self.model_path).is_file():
            raise FileNotFoundError(f"no model file at {self.model_path}")
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_threads = n_threads or max(1, min(os.cpu_count() or 1, 8))
        self.exact = exact
        self.flash_attn = flash_attn
        self.verbose = verbose
        params = llama_cpp.llama_model_default_params()
        self._model = LlamaModel(path_model=self.model_path, params=params, verbose=verbose)
        self._vocab = self._model.vocab
        self.n_vocab = self._model.n_vocab()
        self.n_ctx_train = self._model.n_ctx_train()
        self.cache = _resolve_cache(cache)
        self.codec: StateCodec = OpaqueCodec() if whole_states else self._make_codec()
        self._checkpoint: tuple[list[int], bytes] | None = None
        self._ctx: Any = None
        self._batch: Any = None
        self._tokens: list[int] = []  # tokens whose KV is in sequence 0, in order
        self._n_exact = 0  # how many of them may be reused without changing results
        self._lock = threading.RLock()
        self._chat_formatter: Any = None
        self.contexts_created = 0
        self.last_stats = RunStats()
        self._exact_batch = exact_batch
        self.exact_reuse = exact_batch is not None
        self._fingerprint: str | None = None
        self._ctx_batch = n_batch

    # ------------------------------------------------------------ identity

    def _make_codec(self) -> StateCodec:
        try:
            from promptcache.codec.llama_state import LlamaStateCodec

            return LlamaStateCodec()
        except ImportError:  # pragma: no cover - the codec ships with the package
            return OpaqueCodec()

    @property
    def exact_batch(self) -> int:
        """The smallest batch whose floats match a large batch's (probed once per model, settings and
        machine; the result is kept in the user cache directory)."""
        if self._exact_batch is None:
            llama_cpp = _llama()
            key = blake2b(
                "\x00".join([
                    file_identity(self.model_path), f"flash_attn={self.flash_attn}", f"threads={self.n_threads}",
                    llama_cpp.__version__, llama_cpp.llama_print_system_info().decode(errors="replace"),
                    f"probe={_PROBE_VERSION}",
                ]).encode(),
                digest_size=16,
            ).hexdigest()
            if key not in _exact_batch_memo:
                _exact_batch_memo[key] = _load_probe(key) or _save_probe(key, self._probe_exact_batch())
            b, layout_ok = _exact_batch_memo[key]
            self.exact_reuse = b > 0
            self._exact_batch = b if b > 0 else 2
            if not self.exact_reuse and self.exact:
                log.warning(
                    "%s: on this machine no split of a prompt into batches gives the floats of one batch, "
                    "so exact mode reuses nothing; pass exact=False to reuse states anyway",
                    Path(self.model_path).name,
                )
            if not layout_ok and self.codec.splittable:
                log.info("%s: state layout cannot be cut; caching whole states", Path(self.model_path).name)
                self.codec = OpaqueCodec()
                self._fingerprint = None
        return self._exact_batch

    @property
    def may_reuse(self) -> bool:
        """Whether restoring a prefix and evaluating the rest is allowed: always in fast mode; in
        exact mode where the probe found an exact batch size."""
        _ = self.exact_batch
        return self.exact_reuse or not self.exact

    @property
    def fingerprint(self) -> str:
        """Hash of the GGUF's identity, the KV layout settings, the kernels and the reuse mode."""
        if self._fingerprint is None:
            _ = self.exact_batch  # the probe settles the codec, which the fingerprint names
            llama_cpp = _llama()
            parts = [
                "llama.cpp",
                file_identity(self.model_path),
                f"llama-cpp-python={llama_cpp.__version__}",
                f"flash_attn={self.flash_attn}",
                "kv=f16/f16",
                f"exact={self.exact}",
                f"codec={self.codec.name}",
                llama_cpp.llama_print_system_info().decode(errors="replace"),
            ]
            self._fingerprint = blake2b("\x00".join(parts).encode(), digest_size=16).hexdigest()
        return self._fingerprint

    # ------------------------------------------------------------ context

    def _ensure_context(self, n_needed: int) -> None:
        if n_needed > self.n_ctx_train:
            raise ContextOverflowError(
                f"this request needs {n_needed} tokens of context; the model holds {self.n_ctx_train}: "
                "shorten the prompt or lower max_tokens"
            )
        if self._ctx is not None and self._ctx.n_ctx() >= n_needed:
            return
        llama_cpp = _llama()
        from llama_cpp._internals import LlamaBatch, LlamaContext

        n_ctx = self.n_ctx
        while n_ctx < n_needed:
            n_ctx *= 2
        n_ctx = min(n_ctx, self.n_ctx_train)
        self._free_context()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.no_perf = True
        self._ctx = LlamaContext(model=self._model, params=params, verbose=self.verbose)
        # llama.cpp caps n_batch at the requested n_ctx: schedule by what the context really takes.
        self._ctx_batch = min(self.n_batch, int(llama_cpp.llama_n_batch(self._ctx.ctx)))
        self._batch = LlamaBatch(n_tokens=self._ctx_batch, embd=0, n_seq_max=1, verbose=self.verbose)
        self._tokens, self._n_exact = [], 0
        self.contexts_created += 1
        log.debug("created a llama.cpp context of %d tokens", n_ctx)

    def _free_context(self) -> None:
        if self._batch is not None:
            self._batch.close()
        if self._ctx is not None:
            self._ctx.close()
        self._ctx = self._batch = None
        self._tokens, self._n_exact = [], 0

    def reserve(self, n_ctx: int | None = None) -> None:
        """Create the context now (for n_ctx tokens, default the constructor's) instead of on the
        first call, so that call's latency holds no allocation."""
        with self._lock:
            self._ensure_context(n_ctx or self.n_ctx)

    @property
    def context_size(self) -> int:
        """Tokens the live context holds (0 before the first call or after close)."""
        return self._ctx.n_ctx() if self._ctx is not None else 0

    def kv_cache_clear(self) -> None:
        """Empty the live context's KV cache, keeping the context."""
        with self._lock:
            if self._ctx is not None:
                self._ctx.kv_cache_clear()
            self._tokens, self._n_exact = [], 0

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

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter exit: the bindings may be gone already
            pass

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
        llama_cpp = _llama()
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def _is_eog(self, token: int) -> bool:
        return bool(_llama().llama_vocab_is_eog(self._vocab, token))

    def _check_tokens(self, tokens: Sequence[int]) -> list[int]:
        if isinstance(tokens, (str, bytes)):
            raise TypeError("tokens must be a sequence of int token ids")
        out = [int(t) for t in tokens]
        if not out:
            raise ValueError("the prompt is empty: give at least one token")
        if min(out) < 0 or max(out) >= self.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.n_vocab})")
        return out

    # ------------------------------------------------------------ evaluation

    def _decode(self, tokens: Sequence[int], pos: int) -> None:
        self._batch.set_batch(tokens, n_past=pos, logits_all=False)
        self._ctx.decode(self._batch)

    def _schedule(self, m: int) -> list[int]:
        """Batch sizes for m prompt tokens: at most n_batch each, and none smaller than exact_batch."""
        n_batch = self._ctx_batch
        sizes = [n_batch] * (m // n_batch)
        if m % n_batch:
            sizes.append(m % n_batch)
        b = self.exact_batch
        if len(sizes) > 1 and sizes[-1] < b:
            sizes[-2] -= b - sizes[-1]
            sizes[-1] = b
        return sizes

    def _evaluate(self, tokens: list[int], start: int) -> None:
        pos = start
        for size in self._schedule(len(tokens) - start):
            self._decode(tokens[pos : pos + size], pos)
            pos += size

    def _last_logits(self) -> np.ndarray:
        ptr = _llama().llama_get_logits_ith(self._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _probe_exact_batch(self) -> tuple[int, bool]:
        """(b, layout_ok): the smallest b in 2..32 such that, for it and every larger candidate c,
        a prompt split into [0, L - c) + [L - c, L) and into [0, c) + [c, L) gives the last logits of
        one batch over [0, L) (0 if none); and whether the codec can cut this model's states.
        A 1-token batch is never trusted (DESIGN.md measured it inexact); gemma3-270m here
        matched some splits and not others, hence both split points and every larger size."""
        tokens = self.tokenize(_PROBE_TEXT)
        self._ensure_context(len(tokens) + 1)
        self._ctx.kv_cache_clear()
        self._decode(tokens, 0)
        try:
            probe_codec = self._make_codec()
            layout_ok = probe_codec.splittable and probe_codec.n_tokens(self._get_state()) == len(tokens)
        except CodecError as exc:
            log.debug("state layout not understood: %s", exc)
            layout_ok = False
        exact = 0
        for b in (32, 16, 8, 4, 2):
            window = tokens[: min(len(tokens), max(3 * b, 24))]
            self._ctx.kv_cache_clear()
            self._decode(window, 0)
            reference = self._last_logits()
            same = True
            for cut in (len(window) - b, b):
                self._ctx.kv_cache_clear()
                self._decode(window[:cut], 0)
                self._decode(window[cut:], cut)
                same = same and np.array_equal(self._last_logits(), reference)
            if not same:
                break
            exact = b
        self._ctx.kv_cache_clear()
        self._tokens, self._n_exact = [], 0
        log.debug("exact batch for %s: %d (layout %s)", self.model_path, exact, layout_ok)
        return exact, layout_ok

    @property
    def reuses_generated(self) -> bool:
        """Whether generated tokens' KV (decoded one token at a time) is reused as it is: only with
        exact=False. In exact mode a chat re-reads its reply as a batch instead (keep_reply)."""
        return not self.exact

    def _get_state(self) -> bytes:
        llama_cpp = _llama()
        n = llama_cpp.llama_state_seq_get_size(self._ctx.ctx, 0)
        buf = (ctypes.c_uint8 * n)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx.ctx, buf, n, 0)
        return bytes(memoryview(buf)[:written])

    def _set_state(self, state: bytes) -> bool:
        llama_cpp = _llama()
        self._ctx.kv_cache_clear()
        # Pass the bytes' own buffer: no copy of a state that can be tens of MB.
        src = ctypes.cast(ctypes.c_char_p(bytes(state)), ctypes.POINTER(ctypes.c_uint8))
        ok = llama_cpp.llama_state_seq_set_data(self._ctx.ctx, src, len(state), 0)
        if not ok:
            self._ctx.kv_cache_clear()
        return bool(ok)

    def _prefill(self, prompt: list[int], max_new: int, stats: RunStats) -> np.ndarray:
        """Bring the context to exactly `prompt`, reusing what it can; returns the last token's logits."""
        n = len(prompt)
        self._ensure_context(n + max_new)
        limit = max(0, n - self.exact_batch) if self.may_reuse else 0
        t0 = time.perf_counter()
        reused = min(_common_prefix(self._tokens[: self._n_exact], prompt), limit)
        source = "live" if reused else "none"
        if self.cache is not None and limit > reused:
            try:
                hit = self.cache.lookup(
                    prompt, self.fingerprint, max_tokens=limit, min_tokens=reused, codec=self.codec
                )
            except PromptCacheError as exc:
                log.warning("cache lookup failed (%s); evaluating the whole prompt", exc)
                hit = None
            if hit is not None and hit.tokens_reused > reused:
                if self._set_state(hit.state):
                    reused, source = hit.tokens_reused, hit.source
                else:
                    log.warning("llama.cpp refused a cached state of %d tokens; evaluating instead", hit.tokens_reused)
                    reused, source = 0, "none"
                    self._tokens, self._n_exact = [], 0
        if source in ("live", "none"):
            if reused:
                self._ctx.kv_cache_seq_rm(0, reused, -1)
            else:
                self._ctx.kv_cache_clear()
        stats.restore_ms = (time.perf_counter() - t0) * 1000
        self._tokens, self._n_exact = prompt[:reused], reused
        t1 = time.perf_counter()
        self._checkpoint = None
        b = self.exact_batch
        if self.cache is not None and not self.codec.splittable and (limit - reused >= b or limit == reused > 0):
            # A whole state cannot be cut to n - b later: keep one at n - b now (as llama-server's
            # context checkpoints do), so a repeat of this prompt restores it. Both parts are >= b tokens.
            self._evaluate(prompt[:limit], reused)
            self._checkpoint = (prompt[:limit], self._get_state())
            reused_eval = limit
        else:
            reused_eval = reused
        self._evaluate(prompt, reused_eval)
        stats.prefill_ms = (time.perf_counter() - t1) * 1000
        self._tokens, self._n_exact = list(prompt), n
        stats.prompt_tokens, stats.tokens_reused, stats.source = n, reused, source
        stats.tokens_evaluated = n - reused
        return self._last_logits()

    def _remember(
        self, prompt: list[int], stats: RunStats, keep_reply: KeepReply = False, reply: str = ""
    ) -> None:
        """Cache what this call computed. Generated tokens' KV (decoded one at a time) is not exact:
        it is dropped, or with keep_reply re-read as one batch now, off the next turn's critical path,
        so a chat's next turn reuses its reply. Given the chat's messages, what is re-read is what the
        next turn's prompt will hold: the reply as the template renders it, and the turn separator."""
        if self._ctx is None:
            return
        t0 = time.perf_counter()
        tokens = list(self._tokens)
        target = self._next_turn_prefix(keep_reply, reply, prompt) if keep_reply is not True else None
        if target is not None and self.may_reuse and (self.exact or len(tokens) > len(prompt)):
            self._ctx.kv_cache_seq_rm(0, len(prompt), -1)
            self._evaluate(target, len(prompt))
            stats.reply_reread_ms = (time.perf_counter() - t0) * 1000
            tokens = target
            self._tokens, self._n_exact = tokens, len(tokens)
        elif not self.reuses_generated and len(tokens) > len(prompt):
            self._ctx.kv_cache_seq_rm(0, len(prompt), -1)
            if keep_reply and self.may_reuse and len(tokens) - len(prompt) >= self.exact_batch:
                self._evaluate(tokens, len(prompt))
                stats.reply_reread_ms = (time.perf_counter() - t0) * 1000
            else:
                tokens = tokens[: len(prompt)]
            self._tokens, self._n_exact = tokens, len(tokens)
        if self.cache is None or not self.may_reuse:
            return
        try:
            if self._checkpoint is not None and not self.cache.contains(self._checkpoint[0], self.fingerprint):
                stats.bytes_cached += self._insert(*self._checkpoint)
            self._checkpoint = None
            fp = self.fingerprint
            # A shared store may hold every chunk already (another process wrote them): then index
            # them without reading and splitting the state again.
            if not (self.cache.contains(tokens, fp) or self.cache.adopt(tokens, fp, codec=self.codec)):
                stats.bytes_cached += self._insert(tokens, self._get_state())
        except PromptCacheError as exc:
            log.warning("could not cache a %d-token state: %s", len(tokens), exc)
        stats.cache_insert_ms = (time.perf_counter() - t0) * 1000

    def _next_turn_prefix(self, keep_reply: KeepReply, reply: str, prompt: list[int]) -> list[int] | None:
        """The tokens every next turn of this chat starts with (prompt, reply, turn separator), found by
        rendering the template with two different next user messages; None when they do not extend
        the prompt by at least exact_batch tokens (then the plain reply is re-read instead)."""
        if isinstance(keep_reply, bool) or not reply:
            return None
        history = [*keep_reply, {"role": "assistant", "content": reply}]
        try:
            a = self.chat_tokens([*history, {"role": "user", "content": "A"}])
            b = self.chat_tokens([*history, {"role": "user", "content": "B"}])
        except Exception as exc:  # noqa: BLE001 - a template may refuse the conversation: no read-ahead
            log.debug("no next-turn prefix: %s", exc)
            return None
        common = a[: _common_prefix(a, b)]
        if len(common) - len(prompt) < self.exact_batch or common[: len(prompt)] != prompt:
            return None
        return common

    def _insert(self, tokens: list[int], state: bytes) -> int:
        assert self.cache is not None
        try:
            return self.cache.insert(tokens, state, self.fingerprint, codec=self.codec)
        except CodecError as exc:
            if isinstance(self.codec, OpaqueCodec):
                raise
            log.warning("state layout not understood (%s); caching whole states from now on", exc)
            self.codec = OpaqueCodec()
            self._fingerprint = None
            return 0

    def _sample(self, logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
        if config.temperature <= 0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / config.temperature
        order = np.argsort(-x, kind="stable")
        if 0 < config.top_k < len(order):
            order = order[: config.top_k]
        probs = np.exp(x[order] - x[order[0]])
        probs /= probs.sum()
        keep = len(probs)
        if config.top_p < 1.0:
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), config.top_p) + 1))
        if config.min_p > 0:
            keep = min(keep, max(1, int(np.sum(probs >= config.min_p * probs[0]))))
        probs = probs[:keep] / probs[:keep].sum()
        return int(order[rng.choice(keep, p=probs)])

    def _run(
        self, prompt: list[int], config: GenerationConfig, keep_reply: KeepReply = False
    ) -> Iterator[tuple[int, str, str | None]]:
        """Yield (token, new text, finish_reason or None); sets last_stats; caches the prompt at the end."""
        stats = RunStats()
        self.last_stats = stats
        t_start = time.perf_counter()
        max_new = min(config.max_tokens, self.n_ctx_train - len(prompt))
        if max_new < 1:
            raise ContextOverflowError(
                f"the prompt has {len(prompt)} tokens and the model's context holds {self.n_ctx_train}"
            )
        logits = self._prefill(prompt, max_new, stats)
        rng = np.random.default_rng(config.seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = config.stops
        text, emitted = "", 0
        generated: list[int] = []
        finish = "length"
        try:
            while len(generated) < max_new:
                token = self._sample(logits, config, rng)
                if not generated:
                    stats.ttft_ms = (time.perf_counter() - t_start) * 1000
                if self._is_eog(token):
                    finish = "stop"
                    break
                generated.append(token)
                text += decoder.decode(self.token_to_piece(token))
                cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    if len(text) > emitted:
                        yield token, text[emitted:], None
                        emitted = len(text)
                    break
                safe = len(text) - _stop_prefix_len(text, stops)
                if safe > emitted:
                    yield token, text[emitted:safe], None
                    emitted = safe
                if len(generated) >= max_new:
                    break
                pos = len(self._tokens)
                self._decode([token], pos)
                self._tokens.append(token)
                if self.reuses_generated:
                    self._n_exact = len(self._tokens)
                logits = self._last_logits()
            if finish == "length":
                text += decoder.decode(b"", final=True)
            if len(text) > emitted:
                yield (generated[-1] if generated else -1), text[emitted:], None
            stats.tokens_generated = len(generated)
            yield -1, "", finish
        finally:
            stats.tokens_generated = len(generated)
            self._remember(prompt, stats, keep_reply, text)
            stats.total_ms = (time.perf_counter() - t_start) * 1000

    # ------------------------------------------------------------ public generation

    def _config(self, config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
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
            for token, piece, reason in self._run(prompt_tokens, cfg, keep_reply):
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
        for piece, _reason in self.stream_events(prompt, config, keep_reply=keep_reply, **overrides):
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
        cfg = self._config(config, overrides)
        with self._lock:
            prompt_tokens = self._prompt_tokens(prompt)
            for _token, piece, reason in self._run(prompt_tokens, cfg, keep_reply):
                yield piece, reason

    # ------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> tuple[str, list[str]]:
        """The prompt text for `messages` (with the assistant turn opened) and the template's stop strings."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("each message needs a str 'role' and a str 'content'")
        if self._chat_formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            meta = self._model.metadata()
            template = meta.get("tokenizer.chat_template")
            if not template:
                raise PromptCacheError("this model has no chat template; use llm(prompt) instead")
            bos = self._model.token_get_text(self._model.token_bos()) if self._model.token_bos() >= 0 else ""
            eos = self._model.token_get_text(self._model.token_eos()) if self._model.token_eos() >= 0 else ""
            self._chat_formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        formatted = self._chat_formatter(messages=list(messages))
        stop = formatted.stop
        return formatted.prompt, ([stop] if isinstance(stop, str) else list(stop or []))

    def chat_tokens(self, messages: Sequence[dict[str, Any]]) -> list[int]:
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
            if self._ctx is None or not self._tokens:
                raise PromptCacheError("nothing to save: the context holds no tokens yet")
            state = self._get_state()
            header = json.dumps(
                {
                    "format": _SESSION_FORMAT,
                    "version": _SESSION_VERSION,
                    "n_tokens": len(self._tokens),
                    "n_exact": self._n_exact,
                    "codec": self.codec.name,
                }
            ).encode()
            tokens = np.asarray(self._tokens, dtype="<u4").tobytes()
            payload = struct.pack("<I", len(header)) + header + tokens + state
            return envelope.pack(_SESSION_KEY, payload, self.fingerprint)

    def save_session(self, path: str | os.PathLike[str]) -> int:
        """Write the live conversation to `path` atomically; returns the bytes written."""
        blob = self.session_bytes()
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(blob)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return len(blob)

    def load_session_bytes(self, blob: bytes) -> int:
        """Restore a conversation saved by session_bytes(); returns its token count.

        Raises ModelMismatchError for another model or layout and CorruptEntryError for damaged
        bytes; either way the LLM stays usable (its context is emptied only when loading fails late).
        """
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError("a session is bytes")
        payload, _flags, fingerprint = envelope.unpack(blob, key=_SESSION_KEY)
        if fingerprint != self.fingerprint:
            raise ModelMismatchError(
                "this session was saved with another model, KV layout or reuse mode; load it with that model"
            )
        try:
            (n_header,) = struct.unpack_from("<I", payload)
            header = json.loads(payload[4 : 4 + n_header])
            n = int(header["n_tokens"])
            off = 4 + n_header
            tokens = np.frombuffer(payload, dtype="<u4", count=n, offset=off).tolist()
            state = payload[off + 4 * n :]
            if header.get("format") != _SESSION_FORMAT or header.get("version") != _SESSION_VERSION:
                raise CorruptEntryError("not a promptcache session of this version")
        except (ValueError, KeyError, struct.error, json.JSONDecodeError) as exc:
            raise CorruptEntryError(f"session header unreadable: {exc}") from None
        with self._lock:
            self._ensure_context(n + 1)
            if not self._set_state(state):
                self._tokens, self._n_exact = [], 0
                raise CorruptEntryError("llama.cpp refused the session's state")
            self._tokens = tokens
            self._n_exact = min(int(header.get("n_exact", n)), n)
            return n

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
        return list(self._tokens)
