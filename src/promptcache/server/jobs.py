"""Generation jobs: what a worker does for one completion or chat request, in both worker kinds.

`generation_job` runs a request alone on a worker's LLM (one context, one request at a time);
`batched_job` is the same request as a generator that a BatchPool drives one decode step at a
time, beside the other live requests of its SequenceEngine. Both emit the same events:
("start", prompt_tokens), ("piece", index, text, logprobs), ("done", index, finish_reason) and
("usage", usage). Never speaks HTTP (app.py does) and never decodes itself in batch mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from promptcache.engines.llama_cpp import LLM, GenerationConfig, RunStats
from promptcache.engines.llama_cpp.generation import Grammar, TokenLoop
from promptcache.server.pool import Job
from promptcache.server.prompts import context_error, logit_bias, prompt_tokens, response_grammar
from promptcache.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    usage,
)

if TYPE_CHECKING:
    from promptcache.engines.sequences import Advance
    from promptcache.server.metrics import Metrics

# OpenAI's default max_tokens for /v1/completions; chat defaults to the room left in the context.
COMPLETION_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class Ask:
    """What one generation request asks of a worker."""

    kind: str  # "chat" or "completion"
    prompt: Any  # prompts.Prompt
    max_tokens: int | None
    n: int = 1
    sampling: dict[str, Any] = field(default_factory=dict)  # more GenerationConfig fields
    echo: bool = False
    logprobs: int | None = None  # alternatives reported per token; None: no logprobs


@dataclass(frozen=True)
class Limits:
    """The server's bounds a job checks: context per request and the largest max_tokens."""

    n_ctx: int
    max_tokens: int


def sampling(req: CompletionRequest | ChatCompletionRequest, n_vocab: int) -> dict[str, Any]:
    """The request's sampling fields as GenerationConfig's (400 for a bad logit_bias or response_format)."""
    names = (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
    )
    out = {name: getattr(req, name) for name in names if getattr(req, name) is not None}
    bias = logit_bias(req, n_vocab)
    if bias:
        out["logit_bias"] = bias
    grammar = response_grammar(req.response_format)
    if grammar is not None:
        out["grammar"] = grammar
    return out


def _choice_config(ask: Ask, index: int, n_new: int, stops: list[str]) -> GenerationConfig:
    opts = dict(ask.sampling)
    if index and opts.get("seed") is not None:
        opts["seed"] += index  # a seeded request's choices differ, and each is reproducible
    return GenerationConfig(max_tokens=n_new, stop=stops or None, logprobs=ask.logprobs, **opts)


def _new_tokens(limits: Limits, ask: Ask, n_prompt: int) -> int:
    """How many tokens to generate; raises the 400 of a request that does not fit the context."""
    room = limits.n_ctx - n_prompt
    if ask.max_tokens is not None:
        n_new = ask.max_tokens
    else:
        default = room if ask.prompt.messages is not None else COMPLETION_DEFAULT_MAX_TOKENS
        n_new = min(default, room, limits.max_tokens)
    if n_new > room or (n_new < 1 and not (ask.echo and ask.max_tokens == 0)):
        raise context_error(limits.n_ctx, n_prompt, max(n_new, 1), ask.prompt.param)
    return n_new


class _Emitter:
    """Turns one request's token-loop events into job events, with OpenAI's logprobs layout."""

    def __init__(self, job: Job, ask: Ask, llm: LLM) -> None:
        self.job, self.ask, self.piece = job, ask, llm.token_to_piece
        self.offsets = [0] * ask.n  # text offsets of completions' logprobs, per choice
        self.echo_text = ""
        self.echo_logprobs: dict[str, Any] | None = None

    def echo(self, llm: LLM, tokens: list[int]) -> RunStats:
        """Score the prompt (completions' echo); returns the run's stats."""
        ask = self.ask
        entries = llm.prompt_logprobs(tokens, ask.logprobs or 0)
        text = ask.prompt.text
        self.echo_text = text if text is not None else llm.detokenize(tokens)
        if ask.logprobs is not None:
            self.echo_logprobs = completion_logprobs(entries, tokens, self.piece, 0)
        return llm.last_stats

    def begin(self, index: int) -> None:
        self.offsets[index] = len(self.echo_text)
        if self.ask.echo:
            self.job.emit("piece", index, self.echo_text, self.echo_logprobs)

    def event(self, index: int, text: str, entries: list[Any]) -> None:
        if not text:
            return
        ask, logprobs = self.ask, None
        if ask.logprobs is not None and ask.kind == "chat":
            logprobs = chat_logprobs(entries, self.piece)
        elif ask.logprobs is not None:
            ids = [e.token for e in entries]
            logprobs = completion_logprobs(entries, ids, self.piece, self.offsets[index])
        self.offsets[index] += len(text)
        self.job.emit("piece", index, text, logprobs)


def generation_job(
    limits: Limits, metrics: Metrics, endpoint: str, ask: Ask
) -> Callable[[LLM, Job], None]:
    """The request alone on a worker's LLM: prompt tokens, the echo (prompt logprobs), then each of
    the n choices in turn. The prompt is evaluated once, by the first choice (or the echo); the
    others restore it from the live context, evaluating only the last exact_batch tokens again."""

    def run(llm: LLM, job: Job) -> None:
        tokens, stops = prompt_tokens(llm, ask.prompt)
        n_new = _new_tokens(limits, ask, len(tokens))
        job.emit("start", len(tokens))
        out = _Emitter(job, ask, llm)
        first: RunStats | None = None
        if ask.echo:
            first = out.echo(llm, tokens)
            metrics.generation(endpoint, first, job.queue_seconds)
        completion_tokens = 0
        # A chat's reply comes back in its next turn: keep the reply's KV reusable (one reply only).
        keep = (
            list(ask.prompt.messages) if ask.prompt.messages is not None and ask.n == 1 else False
        )
        for index in range(ask.n):
            out.begin(index)
            finish = "length"
            if n_new > 0 and not job.cancelled:
                config = _choice_config(ask, index, n_new, stops)
                steps = llm.stream_steps(tokens, config, keep_reply=keep)
                try:
                    for step in steps:
                        if job.cancelled:
                            break
                        if step.finish_reason is not None:
                            finish = step.finish_reason
                        out.event(index, step.text, step.logprobs)
                finally:
                    steps.close()  # the engine's clean-up: the prompt's state goes into the shared cache
                stats = llm.last_stats
                first = first or stats
                completion_tokens += stats.tokens_generated
                metrics.generation(endpoint, stats, job.queue_seconds)
            job.emit("done", index, finish)
        metrics.request(endpoint, "cancelled" if job.cancelled else "ok")
        cached = first.tokens_reused if first is not None else 0
        job.emit("usage", usage(len(tokens), completion_tokens, cached))

    return run


# What a batched job yields: the token lists it needs next-token logits for, by key (choice index);
# it is sent back each key's Advance. It returns the key whose sequence should be cached (a chat's
# reply, read again in the next turn) or None.
BatchedRun = Generator[list[tuple[int, list[int]]], dict[int, "Advance"], int | None]


def _token_loops(llm: LLM, ask: Ask, n_new: int, stops: list[str]) -> dict[int, TokenLoop]:
    """One token loop per choice (none for an echo with max_tokens 0)."""
    loops: dict[int, TokenLoop] = {}
    for index in range(ask.n if n_new > 0 else 0):
        config = _choice_config(ask, index, n_new, stops)
        grammar = Grammar(llm.vocab, config.grammar) if config.grammar else None
        loops[index] = TokenLoop(
            config, n_new, is_eog=llm.is_eog, piece=llm.token_to_piece, grammar=grammar
        )
    return loops


def _decode_choices(
    loops: dict[int, TokenLoop],
    prompt: list[int],
    out: _Emitter,
    finish: dict[int, str],
    stats: RunStats,
    t0: float,
) -> BatchedRun:
    """The choices' decode steps: ask for the prompt's logits once, then for each live choice's
    tokens so far, sampling from what comes back until every choice has finished."""
    got = yield [(0, prompt)]
    if not stats.tokens_reused:
        stats.tokens_reused, stats.source = got[0].reused, got[0].source
        stats.tokens_evaluated = len(prompt) - got[0].reused
    logits = {index: got[0].logits for index in loops}
    seqs = {index: list(prompt) for index in loops}
    while logits:
        asks: list[tuple[int, list[int]]] = []
        for index, x in logits.items():
            token, events = loops[index].feed(x)
            for _token, text, reason, entries in events:
                if reason is not None:
                    finish[index] = reason
                out.event(index, text, entries)
            if token is not None:
                seqs[index].append(token)
                asks.append((index, seqs[index]))
        if not stats.ttft_ms:
            stats.ttft_ms = (time.perf_counter() - t0) * 1000
        if not asks:
            return None
        got = yield asks
        stats.tokens_evaluated += len(asks)
        logits = {index: got[index].logits for index, _ in asks}
    return None


def batched_job(
    limits: Limits, metrics: Metrics, endpoint: str, ask: Ask
) -> Callable[[LLM, Job], BatchedRun]:
    """The request as a generator a BatchPool drives: it yields the token lists whose logits it needs
    (the prompt once; then each live choice's prompt and tokens so far) and samples from what comes
    back. The n choices fork the prompt's sequence, so the prompt is evaluated once."""

    def run(llm: LLM, job: Job) -> BatchedRun:
        tokens, stops = prompt_tokens(llm, ask.prompt)
        n_new = _new_tokens(limits, ask, len(tokens))
        job.emit("start", len(tokens))
        out = _Emitter(job, ask, llm)
        stats = RunStats(prompt_tokens=len(tokens), strategy=llm.exact_strategy)
        t0 = time.perf_counter()
        if ask.echo:
            echo_stats = out.echo(llm, tokens)
            stats.tokens_reused, stats.source = echo_stats.tokens_reused, echo_stats.source
            stats.tokens_evaluated = echo_stats.tokens_evaluated
        for index in range(ask.n):
            out.begin(index)
        loops = _token_loops(llm, ask, n_new, stops)
        finish = {index: "length" for index in range(ask.n)}
        try:
            if loops:
                yield from _decode_choices(loops, tokens, out, finish, stats, t0)
        except GeneratorExit:  # the pool closed it: the client left or the server stops
            metrics.request(endpoint, "cancelled")
            raise
        finally:
            for loop in loops.values():
                loop.close()
            stats.tokens_generated = sum(len(loop.generated) for loop in loops.values())
            stats.total_ms = (time.perf_counter() - t0) * 1000
            metrics.generation(endpoint, stats, job.queue_seconds)
        for index in range(ask.n):
            job.emit("done", index, finish[index])
        metrics.request(endpoint, "ok")
        job.emit("usage", usage(len(tokens), stats.tokens_generated, stats.tokens_reused))
        return 0 if ask.prompt.messages is not None and ask.n == 1 and loops else None

    return run


__all__ = [
    "Ask",
    "Limits",
    "BatchedRun",
    "COMPLETION_DEFAULT_MAX_TOKENS",
    "batched_job",
    "generation_job",
    "sampling",
]
