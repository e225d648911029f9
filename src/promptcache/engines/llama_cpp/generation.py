"""Generation types, sampling and stop strings: GenerationConfig, RunStats, Completion, TextStream;
log-probabilities (TokenLogprob), penalties, logit bias and llama.cpp grammars (Sampler, Grammar).

Owns how logits become a token, a log-probability and streamed text; never touches a context or a
cache (engine.py decodes, plan.py decides reuse).
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

KeepReply = bool | Sequence[dict[str, Any]]  # True, or a chat's messages (see LLM.complete)

# The most alternatives reported per position (OpenAI's limit for chat's top_logprobs); prompt
# log-probabilities are computed and remembered with this many, and sliced per request.
TOP_LOGPROBS_MAX = 20


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
    # OpenAI's penalties over the tokens generated so far: logit -= presence * (count > 0) + frequency * count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit
    grammar: str | None = None  # GBNF text (llama.cpp grammar); see Grammar
    logprobs: int | None = None  # report each generated token's logprob and this many alternatives
    # The context a call needs (cyllama's GenerationConfig.n_ctx): the context grows to it; None:
    # what the prompt and max_tokens need.
    n_ctx: int | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.max_tokens, int)
            or isinstance(self.max_tokens, bool)
            or self.max_tokens < 1
        ):
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or abs(value) > 2:
                raise ValueError(f"{name} must be a number in [-2, 2]")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= TOP_LOGPROBS_MAX
        ):
            raise ValueError(f"logprobs must be None or an int in [0, {TOP_LOGPROBS_MAX}]")
        if self.n_ctx is not None and (
            not isinstance(self.n_ctx, int) or isinstance(self.n_ctx, bool) or self.n_ctx < 16
        ):
            raise ValueError("n_ctx must be None or an int >= 16")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or not isinstance(bias, (int, float)) or abs(bias) > 100:
                raise ValueError("logit_bias maps int token ids to numbers in [-100, 100]")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


@dataclass
class RunStats:
    """What one call reused and computed. `source`: live, memory, disk, redis or none. `strategy`
    and `chunk`: how reuse stayed exact (LLM.exact_strategy, LLM.exact_chunk)."""

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
    strategy: str = ""
    chunk: int = 0


@dataclass
class Completion:
    """The result of one generation."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    stats: RunStats = field(default_factory=RunStats)


def sample(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
    """The next token: argmax at temperature 0, else top-k, then top-p, then min-p, then a draw."""
    if config.temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64)
    order = np.argsort(-x, kind="stable")
    if 0 < config.top_k < len(order):
        order = order[: config.top_k]
    # Shift before scaling: logits / 1e-300 overflow to inf and inf - inf is NaN; shifted logits are
    # <= 0, so a tiny temperature gives -inf (probability 0) to all but the top token.
    with np.errstate(over="ignore"):
        probs = np.exp((x[order] - x[order[0]]) / config.temperature)
    probs /= probs.sum()
    n_kept = len(probs)
    if config.top_p < 1.0:
        n_kept = min(n_kept, int(np.searchsorted(np.cumsum(probs), config.top_p) + 1))
    if config.min_p > 0:
        n_kept = min(n_kept, max(1, int(np.sum(probs >= config.min_p * probs[0]))))
    probs = probs[:n_kept] / probs[:n_kept].sum()
    return int(order[rng.choice(n_kept, p=probs)])


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of the raw logits, before penalties,
    bias, grammar and temperature) and the `top` alternatives, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def head(self, k: int) -> TokenLogprob:
        """The same entry with only the first k alternatives."""
        return self if len(self.top) <= k else TokenLogprob(self.token, self.logprob, self.top[:k])


class Step(NamedTuple):
    """One piece of a generation: new text, the finish reason (on the last step only) and the
    log-probabilities of the tokens whose text this piece completes (with GenerationConfig.logprobs)."""

    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob]


def token_logprob(logits: np.ndarray, token: int, top_k: int) -> TokenLogprob:
    """`token`'s log-probability under `logits` and the top_k most likely tokens (ties by token id).

    Computed in float64 from the float32 logits the same way on every path (cached or not), so
    equal logits give equal numbers."""
    x = logits.astype(np.float64)
    peak = x.max()
    lse = peak + np.log(np.exp(x - peak).sum())
    top: tuple[tuple[int, float], ...] = ()
    if top_k > 0:
        k = min(top_k, len(x))
        candidates = np.argpartition(-x, k - 1)[:k]
        order = candidates[np.lexsort((candidates, -x[candidates]))]
        top = tuple((int(t), float(x[t] - lse)) for t in order)
    return TokenLogprob(int(token), float(x[token] - lse), top)


class Grammar:
    """A llama.cpp grammar (GBNF) constraining generation: `mask` sets the logits of tokens it
    forbids to -inf, `accept` advances it past a chosen token. Raises ValueError for a grammar
    llama.cpp cannot parse."""

    def __init__(self, vocab: Any, gbnf: str, root: str = "root") -> None:
        import llama_cpp

        self._llama = llama_cpp
        self._sampler = llama_cpp.llama_sampler_init_grammar(
            vocab, gbnf.encode("utf-8"), root.encode("utf-8")
        )
        if not self._sampler:
            raise ValueError("llama.cpp could not parse the grammar")
        self._cells: np.ndarray | None = None

    def mask(self, logits: np.ndarray) -> np.ndarray:
        llama_cpp = self._llama
        n = len(logits)
        if self._cells is None or len(self._cells) != n:
            dtype = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
            self._cells = np.zeros(n, dtype=dtype)
        cells = self._cells
        cells["id"] = np.arange(n, dtype=np.int32)
        cells["logit"] = logits
        cells["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=cells.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
            size=n,
            selected=-1,
            sorted=False,
        )
        llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(array))
        out = np.empty(n, dtype=np.float32)
        out[cells["id"][: array.size]] = cells["logit"][: array.size]
        return out

    def accept(self, token: int) -> None:
        self._llama.llama_sampler_accept(self._sampler, token)

    def close(self) -> None:
        if self._sampler:
            self._llama.llama_sampler_free(self._sampler)
            self._sampler = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter exit: the bindings may be gone already
            pass


class Sampler:
    """The tokens of one generation: penalties and logit bias, then the grammar, then `sample`.
    Call it with the model's logits for each position; it remembers what it chose."""

    def __init__(
        self, config: GenerationConfig, rng: np.random.Generator, grammar: Grammar | None = None
    ) -> None:
        self.config = config
        self.rng = rng
        self.grammar = grammar
        self.counts: dict[int, int] = {}

    def __call__(self, logits: np.ndarray) -> int:
        cfg = self.config
        x = logits
        if self.counts and (cfg.presence_penalty or cfg.frequency_penalty):
            x = x.copy()
            ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
            counts = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            x[ids] -= np.float32(cfg.presence_penalty) + np.float32(cfg.frequency_penalty) * counts
        if cfg.logit_bias:
            x = x.copy() if x is logits else x
            for token, bias in cfg.logit_bias.items():
                x[token] += np.float32(bias)
        if self.grammar is not None:
            x = self.grammar.mask(x)
        token = sample(x, cfg, self.rng)
        self.counts[token] = self.counts.get(token, 0) + 1
        # llama.cpp aborts the process on a token its grammar forbids; one is drawn only where the
        # grammar forbids every token, and then the generation ends anyway (length or end of text).
        if self.grammar is not None and np.isfinite(x[token]):
            self.grammar.accept(token)
        return token


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that may be the start of a stop string: only that much
    is held back from streaming (holding a stop's full length delays every first token)."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


class TextStream:
    """The text of generated tokens, released as soon as it cannot be part of a stop string.

    push() takes one token's bytes (possibly part of a UTF-8 character) and returns the text that
    may be shown now; after a stop string appears, `stopped` is True and the text ends before it.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.text = ""
        self.stopped = False
        self._emitted = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, piece: bytes) -> str:
        self.text += self._decoder.decode(piece)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._release(len(self.text))
        return self._release(len(self.text) - stop_prefix_len(self.text, self.stops))

    def flush(self, *, final: bool) -> str:
        """What is held back (with final=True, also an unfinished UTF-8 character, as U+FFFD)."""
        if final:
            self.text += self._decoder.decode(b"", final=True)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        out, self._emitted = self.text[self._emitted : upto], upto
        return out


Event = tuple[
    int, str, str | None, list[TokenLogprob]
]  # (token or -1, text, finish_reason, logprobs)


class TokenLoop:
    """The token loop of one generation, fed the logits after each position: sampling, end of
    generation, stop strings, max_tokens and log-probabilities. Knows nothing of how logits are
    computed, so a single context (LLM) and a batch of many sequences (the server) share it.

    feed(logits) returns the token to evaluate next (None once finished) and the events it completes:
    (token, text, None, logprobs of the tokens the text completes), and last (-1, "", finish_reason, [])."""

    def __init__(
        self,
        config: GenerationConfig,
        max_new: int,
        *,
        is_eog: Any,
        piece: Any,
        grammar: Grammar | None = None,
    ) -> None:
        self.config = config
        self.max_new = max_new
        # Any int is a seed (OpenAI's API allows negative ones); numpy's generator takes 0..2^64-1.
        seed = None if config.seed is None else config.seed % (1 << 64)
        self.sampler = Sampler(config, np.random.default_rng(seed), grammar)
        self.text = TextStream(config.stops)
        self.generated: list[int] = []
        self.finish: str | None = None
        self._is_eog = is_eog
        self._piece = piece
        self._pending: list[TokenLogprob] = []  # logprobs of tokens whose text is held back

    def feed(self, logits: np.ndarray) -> tuple[int | None, list[Event]]:
        if self.finish is not None:
            raise RuntimeError("the generation has finished")
        token = self.sampler(logits)
        if self._is_eog(token):
            return None, self._end("stop")
        self.generated.append(token)
        if self.config.logprobs is not None:
            self._pending.append(token_logprob(logits, token, self.config.logprobs))
        events: list[Event] = []
        piece = self.text.push(self._piece(token))
        if piece:
            events.append((token, piece, None, self._pending))
            self._pending = []
        if self.text.stopped:
            return None, events + self._end("stop")
        if len(self.generated) >= self.max_new:
            return None, events + self._end("length")
        return token, events

    def _end(self, finish: str) -> list[Event]:
        self.finish = finish
        events: list[Event] = []
        rest = self.text.flush(final=finish == "length")
        if rest:
            events.append((self.generated[-1] if self.generated else -1, rest, None, self._pending))
        self._pending = []
        events.append((-1, "", finish, []))
        return events

    def close(self) -> None:
        """Free the grammar (idempotent)."""
        if self.sampler.grammar is not None:
            self.sampler.grammar.close()


__all__ = [
    "Event",
    "TokenLoop",
    "GenerationConfig",
    "Grammar",
    "RunStats",
    "Sampler",
    "Step",
    "TOP_LOGPROBS_MAX",
    "TokenLogprob",
    "token_logprob",
    "Completion",
    "KeepReply",
    "TextStream",
    "sample",
    "stop_prefix_len",
]
