"""The exact-batch probe and its per-machine record (README, "Exactness").

Owns measuring the smallest batch whose logits match one large batch, and keeping the result per
model, settings and machine in the user cache directory; never decides reuse (plan.py does).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from hashlib import blake2b
from pathlib import Path

import numpy as np

from promptcache.codec import StateCodec
from promptcache.engines.llama_cpp.context import Context, bindings
from promptcache.errors import CodecError
from promptcache.files import atomic_write, user_cache_dir
from promptcache.model import file_identity

log = logging.getLogger(__name__)

PROBE_TEXT = (  # varied text: repetitive probes can agree by accident where real prompts do not
    "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days; "
    "returns of damaged items are free within thirty days, and gift cards never expire. "
    "Question: how long do refunds take? Answer: five business days, counted from the day the "
    "parcel reaches the warehouse in Leeds; card payments may need two more days to appear."
)
PROBE_VERSION = 2
CANDIDATES = (32, 16, 8, 4, 2)  # a 1-token batch is never trusted: DESIGN.md measured it inexact

ProbeResult = tuple[int, bool]  # (exact batch, or 0 if none; whether the codec can cut states)
_memo: dict[str, ProbeResult] = {}  # per process, over the file


def record_file() -> Path:
    return user_cache_dir("exact-batch-probes.json")


def probe_key(model_path: str, *, flash_attn: bool, n_threads: int) -> str:
    """What a probe result depends on: the GGUF, the kernels' settings, llama.cpp and the CPU."""
    llama_cpp = bindings()
    parts = [
        file_identity(model_path),
        f"flash_attn={flash_attn}",
        f"threads={n_threads}",
        llama_cpp.__version__,
        llama_cpp.llama_print_system_info().decode(errors="replace"),
        f"probe={PROBE_VERSION}",
    ]
    return blake2b("\x00".join(parts).encode(), digest_size=16).hexdigest()


def _load(key: str) -> ProbeResult | None:
    try:
        value = json.loads(record_file().read_text()).get(key)
        return (int(value[0]), bool(value[1])) if value else None
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return None


def _save(key: str, value: ProbeResult) -> ProbeResult:
    """Record a probe result for this machine (best effort: a read-only cache dir just re-probes)."""
    path = record_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        known[key] = list(value)
        atomic_write(path, json.dumps(known))
    except OSError as exc:
        log.debug("could not keep the probe result: %s", exc)
    return value


def recorded(key: str, measure: Callable[[], ProbeResult]) -> ProbeResult:
    """The probe result for `key`: from this process, else the record file, else measured and recorded."""
    if key not in _memo:
        _memo[key] = _load(key) or _save(key, measure())
    return _memo[key]


def measure(context: Context, tokens: list[int], codec: StateCodec) -> ProbeResult:
    """(b, layout_ok): the smallest b in CANDIDATES such that, for it and every larger candidate c,
    a prompt split into [0, L - c) + [L - c, L) and into [0, c) + [c, L) gives the last logits of
    one batch over [0, L) (0 if none); and whether `codec` can cut this model's states. gemma3-270m
    matched some splits and not others here, hence both split points and every larger size.
    Leaves the context's KV cache empty."""
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
    return exact, layout_ok


__all__ = [
    "PROBE_TEXT",
    "PROBE_VERSION",
    "ProbeResult",
    "measure",
    "probe_key",
    "recorded",
    "record_file",
]
