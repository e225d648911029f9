"""Generation jobs: what a worker does for one completion or chat request, as an engine job.

A job is a generator (pool.JobRun): it yields the queries it needs (the prompt, with every position's
logits for echo; then each choice's next decode step; at the end a chat's re-read reply), samples from
the logits sent back and emits typed events (events.py). The same request gets the tokens LLM.complete
gets (README, "Exactness"). Never speaks HTTP (routes.py does) and never decodes itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from promptcache.engines.llama_cpp import GenerationConfig, Query, RunStats
from promptcache.engines.llama_cpp.generation import Grammar, TokenLoop
from promptcache.engines.llama_cpp.llm import prompt_entries
from promptcache.engines.llama_cpp.prompt_logprobs import position_keys
from promptcache.server.events import Done, Piece, Started, Usage
from promptcache.server.pool import Ending, Job, JobRun, Worker
from promptcache.server.prompts import context_error, logit_bias, prompt_tokens, response_grammar
from promptcache.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    usage,
)

if TYPE_CHECKING:
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


def choice_config(ask: Ask, index: int, n_new: int, stops: list[str]) -> GenerationConfig:
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
    """Turns one request's token-loop events into Piece events, with OpenAI's logprobs layout."""

    def __init__(self, job: Job, ask: Ask, piece: Callable[[int], bytes]) -> None:
        self.job, self.ask, self.piece = job, ask, piece
        self.offsets = [0] * ask.n  # text offsets of completions' logprobs, per choice
        self.echo_text = ""
        self.echo_logprobs: dict[str, Any] | None = None

    def begin(self, index: int) -> None:
        self.offsets[index] = len(self.echo_text)
        if self.ask.echo:
            self.job.emit(Piece(index, self.echo_text, self.echo_logprobs))

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
        self.job.emit(Piece(index, text, logprobs))


def _echo(worker: Worker, ask: Ask, tokens: list[int], out: _Emitter) -> JobRun:
    """Score the prompt (completions' echo): every position's logits, restoring a prefix only as far
    as the shared prompt log-probabilities cover it (prompt_logprobs.py says why). Returns the
    prompt query's answer, whose logits start the choices."""
    engine, memo = worker.engine, worker.prompt_logprobs
    cached = engine.cache is not None
    keys = position_keys(engine.fingerprint, tokens) if cached else []
    known = memo.covered(keys) if cached else []
    got = yield {0: Query(tokens, rows=True, max_reuse=len(known), insert=False)}
    adv = got[0]
    entries = prompt_entries(tokens, adv, known)
    if cached:
        memo.put(keys[adv.reused :], entries[adv.reused :])
    text = ask.prompt.text
    out.echo_text = text if text is not None else worker.llm.detokenize(tokens)
    if ask.logprobs is not None:
        heads = [None, *(e.head(ask.logprobs) for e in entries)]
        out.echo_logprobs = completion_logprobs(heads, tokens, out.piece, 0)
    return adv


def _decode_choices(
    loops: dict[int, TokenLoop],
    prompt: list[int],
    logits: Any,
    out: _Emitter,
    stats: RunStats,
    placed: dict[int, int],
) -> JobRun:
    """The choices' decode steps: sample each live choice from its logits, then ask for its next
    step (the prompt and its tokens so far, decoded alone), until every choice has finished.
    Returns each choice's finish reason; `placed` learns the sequence of each choice."""
    t0 = time.perf_counter() - stats.ttft_ms / 1000
    finish = {index: "length" for index in loops}
    current = {index: logits for index in loops}
    tokens = {index: list(prompt) for index in loops}
    while current:
        asks: dict[int, Query] = {}
        for index, x in current.items():
            token, events = loops[index].feed(x)
            for _token, text, reason, entries in events:
                if reason is not None:
                    finish[index] = reason
                out.event(index, text, entries)
            if token is not None:
                tokens[index].append(token)
                asks[index] = Query(tokens[index], len(prompt), insert=False)
        if stats.tokens_generated == 0:
            stats.ttft_ms = (time.perf_counter() - t0) * 1000
        stats.tokens_generated = sum(len(loop.generated) for loop in loops.values())
        if not asks:
            break
        got = yield asks
        placed.update((index, adv.seq) for index, adv in got.items() if adv.seq is not None)
        current = {index: got[index].logits for index in asks}
    return finish


def _token_loops(worker: Worker, ask: Ask, n_new: int, stops: list[str]) -> dict[int, TokenLoop]:
    """One token loop per choice (none for an echo with max_tokens 0)."""
    llm, loops = worker.llm, {}
    for index in range(ask.n if n_new > 0 else 0):
        config = choice_config(ask, index, n_new, stops)
        grammar = Grammar(llm.vocab, config.grammar) if config.grammar else None
        loops[index] = TokenLoop(
            config, n_new, is_eog=llm.is_eog, piece=llm.token_to_piece, grammar=grammar
        )
    return loops


def _reread_reply(worker: Worker, ask: Ask, tokens: list[int], reply: str, seq: int) -> JobRun:
    """A chat's reply comes back in its next turn: re-read it as a batch (README, "Exactness"),
    with the template's turn separator read ahead. A reply that continues the final message has no
    next turn to read ahead: the prompt and reply are re-read as they are."""
    engine = worker.engine
    if seq not in engine.sequences:
        return None
    opens = ask.prompt.opens_reply
    target = worker.llm.chat_format.next_turn_prefix(ask.prompt.messages, reply) if opens else None
    reread = engine.finish_query(seq, tokens, target, True)
    if reread is not None:
        yield {0: reread}
    return None


def generation_job(
    limits: Limits, metrics: Metrics, endpoint: str, ask: Ask
) -> Callable[[Worker, Job], JobRun]:
    """The request as an engine job: the prompt (scored for echo) once, then the n choices, each a
    sequence of its own forked from the prompt's; a chat's reply is re-read at the end so the next
    turn reuses it, and the prompt (and reply) go to the shared cache as the job ends."""

    def run(worker: Worker, job: Job) -> JobRun:
        tokens, stops = prompt_tokens(worker.llm, ask.prompt)
        n_new = _new_tokens(limits, ask, len(tokens))
        job.emit(Started(len(tokens)))
        engine = worker.engine
        out = _Emitter(job, ask, worker.llm.token_to_piece)
        stats = RunStats(prompt_tokens=len(tokens), strategy=engine.exact_strategy)
        t0 = time.perf_counter()
        loops = _token_loops(worker, ask, n_new, stops)
        finish = {index: "length" for index in range(ask.n)}
        placed: dict[int, int] = {}
        try:
            if ask.echo:
                first = yield from _echo(worker, ask, tokens, out)
            else:
                first = (yield {0: Query(tokens, insert=False)})[0]
            placed[0] = first.seq  # type: ignore[assignment]
            stats.tokens_reused, stats.source = first.reused, first.source
            stats.tokens_evaluated = len(tokens) - first.reused
            stats.ttft_ms = (time.perf_counter() - t0) * 1000
            for index in range(ask.n):
                out.begin(index)
            if loops:
                finish.update(
                    (yield from _decode_choices(loops, tokens, first.logits, out, stats, placed))
                )
        finally:
            for loop in loops.values():
                loop.close()
            stats.tokens_generated = sum(len(loop.generated) for loop in loops.values())
            stats.total_ms = (time.perf_counter() - t0) * 1000
            metrics.generation(endpoint, stats, job.queue_seconds)
            if job.cancelled:
                metrics.request(endpoint, "cancelled")
        for index in range(ask.n):
            job.emit(Done(index, finish[index]))
        metrics.request(endpoint, "ok")
        job.emit(
            Usage(usage(len(tokens), stats.tokens_generated, stats.tokens_reused, stats.source))
        )
        if ask.prompt.messages is not None and ask.n == 1 and loops:
            yield from _reread_reply(worker, ask, tokens, loops[0].text.text, placed[0])
        return Ending(cache=(0,))

    return run


__all__ = [
    "Ask",
    "COMPLETION_DEFAULT_MAX_TOKENS",
    "Limits",
    "generation_job",
    "sampling",
]
