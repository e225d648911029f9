"""The exactness probe and its per-machine record (README, "Exactness").

Owns measuring the smallest batch whose logits match one large batch and, where there is none, the
aligned schedule's chunk C; which shapes of several sequences in one llama_decode keep every
sequence's logits (decode_group, group_rows); and keeping the result per model, settings and machine
in the user cache directory. Never decides reuse (plan.py does) nor schedules rows (engine.py does).
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
PROBE_VERSION = 5
CANDIDATES = (32, 16, 8, 4, 2)  # a 1-token batch is never trusted: DESIGN.md measured it inexact
# The aligned schedule's chunk: the smallest candidate whose cold prefill of TIMING_TOKENS costs at
# most CHUNK_TOLERANCE x one plain batch (DESIGN.md: 1,024 tokens on gemma3-270m, C = 64 costs
# 1.13x, 32 costs 1.39x; SmolLM2 is flat from 16). A few hundred tokens keep the probe near a second.
CHUNKS = (16, 32, 64, 128, 256)
CHUNK_TOLERANCE = 1.15
TIMING_TOKENS = 320
# Sequences of one llama_decode measured for the one-row steps of generation (DESIGN.md, "Many
# sequences in one batch": on gemma3 rows of a batch of 4 and more took other kernels than alone).
MAX_DECODE_GROUP = 16
# Whether a shape keeps the bits depends on the content too (on gemma3, 4 rows matched 1 row at some
# prompt lengths and not at others): each shape is tried after several prefixes, for several steps.
DECODE_GROUPS = (2, 3, 4, 6, 8, 12, 16)  # tried in order; the first that differs ends the search
PROBE_PREFIXES = (24, 40, 56)
PROBE_STEPS = 3
GROUP_ROWS = (1, 2, 4, 8)  # candidate row counts q: sequences' batches of m rows, m a multiple of q
PROBE_SEQUENCES = MAX_DECODE_GROUP + 1
PROBE_CELLS = 512  # per probe sequence: TIMING_TOKENS and the probe text fit


class ProbeResult(NamedTuple):
    """What the probe found for one model, settings and machine."""

    exact_batch: int  # the smallest batch matching one large batch, 0 if none
    layout_ok: bool  # whether the codec can cut this model's states
    chunk: int = 0  # the aligned schedule's C (measured only where exact_batch is 0)
    decode_group: int = 1  # one-row steps of this many sequences share a llama_decode exactly
    group_rows: int = 0  # sequences' batches of m rows share one if q divides m (0: never)


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
        return ProbeResult(
            int(value["exact_batch"]),
            bool(value["layout_ok"]),
            int(value["chunk"]),
            int(value["decode_group"]),
            int(value["group_rows"]),
        )
    except (KeyError, ValueError, TypeError):
        return None


def _save(
    key: str, value: ProbeResult, model: str = "", settings: dict | None = None
) -> ProbeResult:
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
        known[key] = {
            **value._asdict(),
            "model": model,
            "strategy": strategy(value),
            **(settings or {}),
        }
        atomic_write(path, json.dumps(known))
    except OSError as exc:
        log.debug("could not keep the probe result: %s", exc)
    return value


def strategy(result: ProbeResult) -> str:
    """The exact strategy a probe result selects: "token" (reuse at any token), else "aligned"."""
    return "token" if result.exact_batch else "aligned"


def recorded(
    key: str, measure: Callable[[], ProbeResult], model: str = "", settings: dict | None = None
) -> ProbeResult:
    """The probe result for `key`: from this process, else the record file, else measured and
    recorded (with `model` and the kernels' `settings`, for people reading the record, e.g.
    `promptcache stats`: one model has a record per setting of flash_attn and threads)."""
    if key not in _memo:
        _memo[key] = _load(key) or _save(key, measure(), model, settings)
    return _memo[key]


def cold_prefill_s(context: Context, tokens: list[int], chunk: int, repeats: int = 2) -> float:
    """Best wall time of `repeats` cold prefills of `tokens` in chunks [0, C), [C, 2C), ..."""
    best = float("inf")
    for _ in range(repeats):
        context.drop(0)
        t0 = time.perf_counter()
        for start in range(0, len(tokens), chunk):
            context.decode_tokens(tokens[start : start + chunk], start)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_chunk(context: Context, tokens: list[int]) -> int:
    """The smallest C in CHUNKS whose cold prefill costs at most CHUNK_TOLERANCE x plain batches of
    the context's n_batch, timed on TIMING_TOKENS tokens (`tokens` repeated); the largest candidate
    if none is. Leaves the context's KV cache empty."""
    timing = (tokens * (TIMING_TOKENS // max(1, len(tokens)) + 1))[
        : min(TIMING_TOKENS, context.n_ctx_seq)
    ]
    plain = max(context.n_batch, 1)
    cold_prefill_s(context, timing, plain, repeats=1)  # warm up: the first decode pays allocations
    baseline = cold_prefill_s(context, timing, plain)
    chosen = CHUNKS[-1]
    for chunk in CHUNKS:
        if chunk >= plain or cold_prefill_s(context, timing, chunk) <= CHUNK_TOLERANCE * baseline:
            chosen = min(chunk, plain)
            break
    context.drop(0)
    log.debug(
        "aligned chunk %d (plain prefill of %d tokens: %.3f s)", chosen, len(timing), baseline
    )
    return chosen


def measure(context: Context, tokens: list[int], codec: StateCodec) -> ProbeResult:
    """(b, layout_ok, C, G, q): the smallest b in CANDIDATES such that, for it and every larger
    candidate c, a prompt split into [0, L - c) + [L - c, L) and into [0, c) + [c, L) gives the last
    logits of one batch over [0, L) (0 if none); whether `codec` can cut this model's states; where b
    is 0, the aligned schedule's chunk (measure_chunk); and the groups of sequences one llama_decode
    may hold (measure_decode_group, measure_group_rows). gemma3-270m matched some splits and not
    others here, hence both split points and every larger size. `context` needs PROBE_SEQUENCES
    sequences in their own KV streams; leaves it empty."""
    context.clear()
    context.decode_tokens(tokens, 0)
    try:
        layout_ok = codec.splittable and codec.n_tokens(context.state_bytes(0)) == len(tokens)
    except CodecError as exc:
        log.debug("state layout not understood: %s", exc)
        layout_ok = False
    exact = 0
    for b in CANDIDATES:
        window = tokens[: min(len(tokens), max(3 * b, 24))]
        context.drop(0)
        context.decode_tokens(window, 0)
        reference = context.logits(-1)
        same = True
        for cut in (len(window) - b, b):
            context.drop(0)
            context.decode_tokens(window[:cut], 0)
            context.decode_tokens(window[cut:], cut)
            same = same and np.array_equal(context.logits(-1), reference)
        if not same:
            break
        exact = b
    context.clear()
    chunk = 0 if exact else measure_chunk(context, tokens)
    return ProbeResult(
        exact,
        layout_ok,
        chunk,
        measure_decode_group(context, tokens),
        measure_group_rows(context, tokens),
    )


def measure_decode_group(context: Context, tokens: list[int]) -> int:
    """The largest G <= MAX_DECODE_GROUP such that one-row steps of each size in DECODE_GROUPS up to
    G (sequences in their own KV streams, all holding the same tokens) in one llama_decode give, after
    each of PROBE_PREFIXES and for PROBE_STEPS greedy steps, the logits of those steps alone. Identical
    sequences make any difference the kernels' choice, never the content. Leaves the context empty."""
    sizes = [s for s in DECODE_GROUPS if s <= min(MAX_DECODE_GROUP, context.n_seq)]
    group = sizes[-1] if sizes else 1
    for n in (n for n in PROBE_PREFIXES if n + PROBE_STEPS < len(tokens)):
        context.clear()
        context.decode_tokens(tokens[:n], 0)
        steps, alone, token = [], [], tokens[n]
        for i in range(PROBE_STEPS):  # the chain alone
            context.decode([(token, n + i, 0, True)])
            steps.append(token)
            alone.append(context.logits(0))
            token = int(np.argmax(alone[-1]))
        context.drop(0, n)
        for size in (s for s in sizes if s <= group):
            for seq in range(1, size):
                context.copy(0, seq, n)
            same = True
            for i, token in enumerate(steps):
                context.decode([(token, n + i, seq, True) for seq in range(size)])
                same = same and all(
                    np.array_equal(context.logits(j), alone[i]) for j in range(size)
                )
            context.drop(0, n)
            if not same:
                group = max([1, *(s for s in sizes if s < size)])
                break
    context.clear()
    return group


def _grouped_batches_exact(context: Context, tokens: list[int], n: int, m: int, k: int) -> bool:
    """Whether k sequences holding tokens[:n] (sequence 0 holds them), each evaluating the next m
    tokens, in one llama_decode of k x m rows, get the last logits those m tokens get alone."""
    rows = tokens[n : n + m]
    context.decode_tokens(rows, n)
    alone = context.logits(-1)
    context.drop(0, n)
    for seq in range(1, k):
        context.copy(0, seq, n)
    last = n + m - 1
    context.decode([(t, p, s, p == last) for s in range(k) for p, t in enumerate(rows, n)])
    same = all(np.array_equal(context.logits((s + 1) * m - 1), alone) for s in range(k))
    context.drop(0, n)
    return same


def measure_group_rows(context: Context, tokens: list[int]) -> int:
    """The smallest q in GROUP_ROWS such that batches of m rows (m = q, 2q, 3q) of 2 and of 3
    sequences share a llama_decode exactly after each of PROBE_PREFIXES (_grouped_batches_exact); 0
    if none does. On gemma3 here q = 8 (a 4-row matmul kernel: batches of other sizes changed with
    their neighbours' rows, and 4-row ones did after some prompts). Leaves the context empty."""
    for q in GROUP_ROWS:
        if all(_group_rows_hold(context, tokens, n, q) for n in PROBE_PREFIXES):
            context.clear()
            return q
    context.clear()
    return 0


def _group_rows_hold(context: Context, tokens: list[int], n: int, q: int) -> bool:
    context.clear()
    context.decode_tokens(tokens[:n], 0)
    shapes = [(m, k) for m in (q, 2 * q, 3 * q) for k in (2, 3)]
    return all(
        _grouped_batches_exact(context, tokens, n, m, k)
        for m, k in shapes
        if n + m <= len(tokens) and k <= context.n_seq
    )


__all__ = [
    "CHUNKS",
    "DECODE_GROUPS",
    "MAX_DECODE_GROUP",
    "PROBE_CELLS",
    "PROBE_SEQUENCES",
    "measure_decode_group",
    "measure_group_rows",
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
