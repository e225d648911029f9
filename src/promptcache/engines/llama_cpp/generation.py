"""Generation types, sampling and stop strings: GenerationConfig, RunStats, Completion, TextStream.

Owns how logits become a token and how tokens become streamed text; never touches a context or a
cache (llm.py decodes, plan.py decides reuse).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KeepReply = bool | Sequence[dict[str, Any]]  # True, or a chat's messages (see LLM.complete)


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


__all__ = [
    "GenerationConfig",
    "RunStats",
    "Completion",
    "KeepReply",
    "TextStream",
    "sample",
    "stop_prefix_len",
]
