"""The exactness probe and its per-machine record (README, "Exactness").

Owns measuring the smallest batch whose logits match one large batch and, where there is none, the
aligned schedule's chunk C, and keeping the result per model, settings and machine in the user
cache directory; never decides reuse (plan.py does).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from hashlib import blake2b
from pathlib import Path
from typing import NamedTuple

import numpy as np

from promptcache.codec import StateCodec
from promptcache.engines.llama_cpp.context import Context, bindings
from promptcache.errors import CodecError
from promptcache.files import atomic_write, user_cache_dir
from promptcache.model import model_identity

log = logging.getLogger(__name__)

PROBE_TEXT = (  # varied text: repetitive probes can agree by accident where real prompts do not
    "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days; "
    "returns of damaged items are free within thirty days, and gift cards never expire. "
    "Question: how long do refunds take? Answer: five business days, counted from the day the "
    "parcel reaches the warehouse in Leeds; card payments may need two more days to appear."
)
PROBE_VERSION = 3
CANDIDATES = (32, 16, 8, 4, 2)  # a 1-token batch is never trusted: DESIGN.md measured it inexact
# The aligned schedule's chunk: the smallest candidate whose cold prefill of TIMING_TOKENS costs at
# most CHUNK_TOLERANCE x one plain batch (DESIGN.md: 1,024 tokens on gemma3-270m, C = 64 costs
# 1.13x, 32 costs 1.39x; SmolLM2 is flat from 16). A few hundred tokens keep the probe near a second.
CHUNKS = (16, 32, 64, 128, 256)
CHUNK_TOLERANCE = 1.15
TIMING_TOKENS = 320


class ProbeResult(NamedTuple):
    """What the probe found for one model, settings and machine."""

    exact_batch: int  # the smallest batch matching one large batch, 0 if none
    layout_ok: bool  # whether the codec can cut this model's states
    chunk: int = 0  # the aligned schedule's C (measured only where exact_batch is 0)


_memo: dict[str, ProbeResult] = {}  # per process, over the file


def record_file() -> Path:
    return user_cache_dir("exact-batch-probes.json")


def probe_key(model_path: str, *, flash_attn: bool, n_threads: int) -> str:
    """What a probe result depends on: the GGUF, the kernels' settings, llama.cpp and the CPU."""
    llama_cpp = bindings()
    parts = [
        model_identity(model_path),
        f"flash_attn={flash_attn}",
        f"threads={n_threads}",
        llama_cpp.__version__,
        llama_cpp.llama_print_system_info().decode(errors="replace"),
        f"probe={PROBE_VERSION}",
    ]
    return blake2b("\x00".join(parts).encode(), digest_size=16).hexdigest()


def records() -> dict[str, dict]:
    """Every probe result kept on this machine, by probe key (an empty dict when there is none)."""
    try:
        known = json.loads(record_file().read_text())
    except (OSError, ValueError):
        return {}
    return (
        {k: v for k, v in known.items() if isinstance(v, dict)} if isinstance(known, dict) else {}
    )


def _load(key: str) -> ProbeResult | None:
    value = records().get(key)
    try:
        if value is None:
            return None
        return ProbeResult(int(value["exact_batch"]), bool(value["layout_ok"]), int(value["chunk"]))
    except (KeyError, ValueError, TypeError):
        return None


def _save(key: str, value: ProbeResult, model: str = "") -> ProbeResult:
    """Record a probe result for this machine (best effort: a read-only cache dir just re-probes)."""
    path = record_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        if not isinstance(known, dict):
            known = {}
        known[key] = {**value._asdict(), "model": model, "strategy": strategy(value)}
        atomic_write(path, json.dumps(known))
    except OSError as exc:
        log.debug("could not keep the probe result: %s", exc)
    return value


def strategy(result: ProbeResult) -> str:
    """The exact strategy a probe result selects: "token" (reuse at any token), else "aligned"."""
    return "token" if result.exact_batch else "aligned"


def recorded(key: str, measure: Callable[[], ProbeResult], model: str = "") -> ProbeResult:
    """The probe result for `key`: from this process, else the record file, else measured and
    recorded (with `model`, a name for people reading the record, e.g. `promptcache stats`)."""
    if key not in _memo:
        _memo[key] = _load(key) or _save(key, measure(), model)
    return _memo[key]


def cold_prefill_s(context: Context, tokens: list[int], chunk: int, repeats: int = 2) -> float:
    """Best wall time of `repeats` cold prefills of `tokens` in chunks [0, C), [C, 2C), ..."""
    best = float("inf")
    for _ in range(repeats):
        context.truncate(0)
        t0 = time.perf_counter()
        context.evaluate(
            tokens, ((s, min(s + chunk, len(tokens))) for s in range(0, len(tokens), chunk))
        )
        best = min(best, time.perf_counter() - t0)
    return best


def measure_chunk(context: Context, tokens: list[int]) -> int:
    """The smallest C in CHUNKS whose cold prefill costs at most CHUNK_TOLERANCE x plain batches of
    the context's n_batch, timed on TIMING_TOKENS tokens (`tokens` repeated); the largest candidate
    if none is. Leaves the context's KV cache empty."""
    timing = (tokens * (TIMING_TOKENS // max(1, len(tokens)) + 1))[
        : min(TIMING_TOKENS, context.n_ctx)
    ]
    plain = max(context.n_batch, 1)
    cold_prefill_s(context, timing, plain, repeats=1)  # warm up: the first decode pays allocations
    baseline = cold_prefill_s(context, timing, plain)
    chosen = CHUNKS[-1]
    for chunk in CHUNKS:
        if chunk >= plain or cold_prefill_s(context, timing, chunk) <= CHUNK_TOLERANCE * baseline:
            chosen = min(chunk, plain)
            break
    context.truncate(0)
    log.debug(
        "aligned chunk %d (plain prefill of %d tokens: %.3f s)", chosen, len(timing), baseline
    )
    return chosen


def measure(context: Context, tokens: list[int], codec: StateCodec) -> ProbeResult:
    """(b, layout_ok, C): the smallest b in CANDIDATES such that, for it and every larger candidate c,
    a prompt split into [0, L - c) + [L - c, L) and into [0, c) + [c, L) gives the last logits of
    one batch over [0, L) (0 if none); whether `codec` can cut this model's states; and where b is 0,
    the aligned schedule's chunk (measure_chunk). gemma3-270m matched some splits and not others
    here, hence both split points and every larger size. Leaves the context's KV cache empty."""
    context.truncate(0)
    context.decode(tokens, 0)
    try:
        layout_ok = codec.splittable and codec.n_tokens(context.state_bytes()) == len(tokens)
    except CodecError as exc:
        log.debug("state layout not understood: %s", exc)
        layout_ok = False
    exact = 0
    for b in CANDIDATES:
        window = tokens[: min(len(tokens), max(3 * b, 24))]
        context.truncate(0)
        context.decode(window, 0)
        reference = context.last_logits()
        same = True
        for cut in (len(window) - b, b):
            context.truncate(0)
            context.evaluate(window, ((0, cut), (cut, len(window))))
            same = same and np.array_equal(context.last_logits(), reference)
        if not same:
            break
        exact = b
    context.truncate(0)
    return ProbeResult(exact, layout_ok, 0 if exact else measure_chunk(context, tokens))


__all__ = [
    "CHUNKS",
    "CHUNK_TOLERANCE",
    "TIMING_TOKENS",
    "measure_chunk",
    "cold_prefill_s",
    "records",
    "strategy",
    "PROBE_TEXT",
    "PROBE_VERSION",
    "ProbeResult",
    "measure",
    "probe_key",
    "recorded",
    "record_file",
]
