"""Exactness: what an engine's model, settings and machine allow (the probe's record), the reuse rules
that follow, and the fingerprint naming them; with the engine's Settings.

Owns reading the probe (probe.py measures), choosing the codec (a layout that does not cut means whole
states) and the fingerprint every cached state carries; never touches a context of the engine's own
nor a cache (engine.py does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from hashlib import blake2b

from promptcache.codec import OpaqueCodec, StateCodec
from promptcache.engines.llama_cpp import probe
from promptcache.engines.llama_cpp.context import Context, bindings
from promptcache.engines.llama_cpp.model import Model
from promptcache.engines.llama_cpp.plan import ReuseRules

log = logging.getLogger(__name__)

MAX_SEQ = 255  # llama.cpp's LLAMA_MAX_SEQ is 256


@dataclass(frozen=True)
class Settings:
    """How an engine runs (LLM's constructor arguments): see Engine."""

    n_seq: int = 1
    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int = 0
    exact: bool = True
    exact_batch: int | None = None
    exact_chunk: int | None = None
    flash_attn: bool = False
    whole_states: bool = False
    min_restore: int = 1
    verbose: bool = False

    def context(self, model: Model, *, n_seq: int, n_ctx_seq: int, split_streams: bool) -> Context:
        """A llama.cpp context over `model` with these settings' batch, threads and attention."""
        return Context(
            model,
            n_seq=n_seq,
            n_ctx_seq=n_ctx_seq,
            n_batch=self.n_batch,
            n_threads=self.n_threads,
            flash_attn=self.flash_attn,
            split_streams=split_streams,
            verbose=self.verbose,
        )


def check_settings(s: Settings) -> None:
    """Settings checked before anything is loaded. Raises ValueError."""
    if not isinstance(s.n_seq, int) or not 1 <= s.n_seq <= MAX_SEQ:
        raise ValueError(f"n_seq must be an int in [1, {MAX_SEQ}]")
    if not isinstance(s.n_ctx, int) or s.n_ctx < 16:
        raise ValueError("n_ctx must be an int >= 16")
    if not isinstance(s.n_batch, int) or s.n_batch < 64:
        raise ValueError("n_batch must be an int >= 64 (smaller batches are not exact on CPU)")
    if s.exact_batch is not None and (
        not isinstance(s.exact_batch, int) or not 1 <= s.exact_batch <= 32
    ):
        raise ValueError("exact_batch must be an int in [1, 32] or None (probe it)")
    if s.exact_chunk is not None and (
        not isinstance(s.exact_chunk, int) or not 1 <= s.exact_chunk <= s.n_batch or not s.exact
    ):
        raise ValueError(
            "exact_chunk must be an int in [1, n_batch] (exact mode) or None (measure it)"
        )


class Exactness:
    """How reuse stays exact for `model` under `settings` on this machine (README, "Exactness")."""

    def __init__(self, model: Model, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self.codec: StateCodec = OpaqueCodec() if settings.whole_states else splitting_codec()
        self._probed: probe.ProbeResult | None = (
            probe.ProbeResult(settings.exact_batch, True, 0, 1, 0)
            if settings.exact_batch is not None
            else None
        )
        self._fingerprint: str | None = None

    def probe(self) -> probe.ProbeResult:
        """The probe result for this model, settings and machine (measured once, kept on disk)."""
        if self._probed is None:
            s = self.settings
            key = probe.probe_key(self.model.path, flash_attn=s.flash_attn, n_threads=s.n_threads)
            kernels = {"flash_attn": s.flash_attn, "threads": s.n_threads}
            self._probed = probe.recorded(key, self._measure, self.model.name, kernels)
            b, layout_ok, chunk = self._probed[:3]
            if b == 0 and self.settings.exact:
                log.info(
                    "%s: no batch size reproduces one batch's floats on this machine; exact mode "
                    "uses the aligned schedule (chunks of %d tokens)",
                    self.model.name,
                    s.exact_chunk or chunk,
                )
            if not layout_ok and self.codec.splittable:
                log.info("%s: state layout cannot be cut; caching whole states", self.model.name)
                self._use_codec(OpaqueCodec())
        return self._probed

    def _measure(self) -> probe.ProbeResult:
        context = self.settings.context(
            self.model,
            n_seq=probe.PROBE_SEQUENCES,
            n_ctx_seq=probe.PROBE_CELLS,
            split_streams=True,
        )
        try:
            result = probe.measure(
                context, self.model.tokenize(probe.PROBE_TEXT), splitting_codec()
            )
        finally:
            context.close()
        log.debug("probe of %s: %s", self.model.path, result)
        return result

    def _use_codec(self, codec: StateCodec) -> None:
        self.codec = codec
        self._fingerprint = None  # the fingerprint names the codec

    def use_whole_states(self) -> None:
        """Cache states uncut from now on (a layout the codec could not cut)."""
        self._use_codec(OpaqueCodec())

    @property
    def exact_batch(self) -> int:
        """The smallest batch whose floats match a large batch's (probed once per model, settings and
        machine; kept in the user cache directory). 2 where the probe found none; 1 in fast mode,
        which promises no match (a step reads its new token only)."""
        if not self.settings.exact:
            return 1
        return self.probe().exact_batch or 2

    @property
    def exact_chunk(self) -> int:
        """The aligned schedule's chunk C (0 where exact mode reuses at any token, or exact=False)."""
        if not self.settings.exact:
            return 0
        result = self.probe()
        if self.settings.exact_chunk:
            return self.settings.exact_chunk
        return min(result.chunk, self.settings.n_batch) if not result.exact_batch else 0

    @property
    def may_reuse(self) -> bool:
        """Whether restoring a prefix and evaluating the rest is allowed: in fast mode always; in
        exact mode with an exact batch size or on the aligned schedule."""
        return self.probe().exact_batch > 0 or not self.settings.exact or self.exact_chunk > 0

    @property
    def decode_group(self) -> int:
        """One-row steps of this many sequences share a llama_decode (probe.measure_decode_group)."""
        return self.probe().decode_group if self.settings.exact else self.settings.n_batch

    @property
    def group_rows(self) -> int:
        """Sequences' batches of m rows share a llama_decode where this divides m (0: never)."""
        return self.probe().group_rows

    def rules(self, n_batch: int) -> ReuseRules:
        """The reuse rules in force for a context taking `n_batch` rows (README, "Exactness")."""
        return ReuseRules(
            exact_batch=self.exact_batch,
            exact=self.settings.exact,
            may_reuse=self.may_reuse,
            splittable=self.codec.splittable,
            n_batch=n_batch,
            chunk=min(self.exact_chunk, n_batch),
        )

    @property
    def exact_strategy(self) -> str:
        """How reuse stays exact: "token", "aligned", "fast" (exact=False) or "none"."""
        return self.rules(self.settings.n_batch).strategy

    @property
    def fingerprint(self) -> str:
        """Hash of the GGUF's identity, the KV layout settings, the kernels and the reuse mode
        (strategy and chunk: a state built on one schedule is never served to another)."""
        if self._fingerprint is None:
            self.probe()  # the probe settles the codec, which the fingerprint names
            llama_cpp = bindings()
            parts = [
                "llama.cpp",
                self.model.identity,
                f"llama-cpp-python={llama_cpp.__version__}",
                f"flash_attn={self.settings.flash_attn}",
                "kv=f16/f16",
                f"exact={self.settings.exact}",
                f"codec={self.codec.name}",
                f"strategy={self.exact_strategy}",
                f"chunk={self.exact_chunk}",
                llama_cpp.llama_print_system_info().decode(errors="replace"),
            ]
            self._fingerprint = blake2b("\x00".join(parts).encode(), digest_size=16).hexdigest()
        return self._fingerprint


def splitting_codec() -> StateCodec:
    from promptcache.codec.llama_state import LlamaStateCodec

    return LlamaStateCodec()


__all__ = ["MAX_SEQ", "Exactness", "Settings", "check_settings", "splitting_codec"]
