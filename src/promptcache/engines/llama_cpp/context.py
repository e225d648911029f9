"""Context: one llama.cpp context and its batch; decode, logits, truncation and sequence state.

Owns every call into llama.cpp's context API (the one place batches are built and decoded); never
decides what to reuse (plan.py does) and never touches a cache.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)

_SEQ = 0  # the one sequence this context holds

_C = TypeVar("_C", bound="Closing")


class Closing:
    """close() on leaving a `with` block and on garbage collection, for engines that own llama.cpp memory."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter exit: the bindings may be gone already
            pass


def bindings() -> Any:
    """The llama_cpp bindings, imported on first use and with their stderr logging silenced."""
    import llama_cpp
    import llama_cpp._logger

    if llama_cpp._logger.logger.level == 0:
        llama_cpp._logger.set_verbose(False)
    return llama_cpp


def token_piece(vocab: Any, token: int, special: bool = False) -> bytes:
    """The bytes of one token under a llama_vocab (may be part of a UTF-8 character)."""
    llama_cpp = bindings()
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
        if n >= 0:
            return buf.raw[:n]
        size = -n


class Context:
    """A llama.cpp context of `n_ctx` tokens over `model` (a llama_cpp._internals.LlamaModel).

    n_batch: the largest batch asked for; llama.cpp caps it at n_ctx, and `n_batch` says what the
    context really takes. Raises whatever llama-cpp-python raises when the context cannot be made.
    """

    def __init__(
        self,
        model: Any,
        *,
        n_ctx: int,
        n_batch: int,
        n_threads: int,
        flash_attn: bool,
        verbose: bool = False,
    ) -> None:
        llama_cpp = bindings()
        from llama_cpp._internals import LlamaBatch, LlamaContext

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = n_threads
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.no_perf = True
        self.n_vocab = model.n_vocab()
        self._n_swa = int(llama_cpp.llama_model_n_swa(model.model))
        self._ctx = LlamaContext(model=model, params=params, verbose=verbose)
        self.n_batch = min(n_batch, int(llama_cpp.llama_n_batch(self._ctx.ctx)))
        self._batch = LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=verbose)
        log.debug("created a llama.cpp context of %d tokens", n_ctx)

    @property
    def n_ctx(self) -> int:
        """Tokens the context holds (llama.cpp pads the requested size up)."""
        return self._ctx.n_ctx()

    def decode(self, tokens: Sequence[int], pos: int, *, all_logits: bool = False) -> None:
        """Evaluate `tokens` at positions pos, pos + 1, ... as one batch (logits for the last only,
        or with all_logits for every row: see batch_logits)."""
        self._batch.set_batch(tokens, n_past=pos, logits_all=all_logits)
        self._ctx.decode(self._batch)

    def batch_logits(self, n: int) -> np.ndarray:
        """A copy of the logits of the last batch's n rows (float32, n x n_vocab), decoded with all_logits."""
        ptr = bindings().llama_get_logits(self._ctx.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).copy()

    def evaluate(self, tokens: Sequence[int], batches: Iterable[tuple[int, int]]) -> None:
        """Decode tokens[start:stop] at `start` for each (start, stop), in order."""
        for start, stop in batches:
            self.decode(tokens[start:stop], start)

    def last_logits(self) -> np.ndarray:
        """A copy of the last decoded token's logits (float32, n_vocab)."""
        ptr = bindings().llama_get_logits_ith(self._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def truncate(self, n: int) -> None:
        """Drop every cell from position n on (n = 0 empties the KV cache)."""
        if n:
            self._ctx.kv_cache_seq_rm(_SEQ, n, -1)
        else:
            self._ctx.kv_cache_clear()

    def can_truncate(self, n: int) -> bool:
        """Whether the cells a token at position n attends to are all still held after truncate(n):
        a sliding-window cache may have dropped old cells (llama-server checks the same, with
        llama_memory_seq_pos_min, before it reuses a slot's prefix)."""
        if n == 0:
            return True
        llama_cpp = bindings()
        memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        pos_min = llama_cpp.llama_memory_seq_pos_min(memory, _SEQ)
        n_swa = self._n_swa
        return pos_min <= (max(0, n - n_swa) if n_swa > 0 else 0)

    def state_bytes(self) -> bytes:
        """The sequence's state as llama_state_seq_get_data writes it (DESIGN.md, the seq-state layout)."""
        llama_cpp = bindings()
        n = llama_cpp.llama_state_seq_get_size(self._ctx.ctx, _SEQ)
        buf = (ctypes.c_uint8 * n)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx.ctx, buf, n, _SEQ)
        return bytes(memoryview(buf)[:written])

    def load_state(self, state: bytes | memoryview) -> bool:
        """Replace the KV cache with `state` (any contiguous buffer: bytes, or a read-only view of
        a mapped file); False (and an empty cache) when llama.cpp refuses it."""
        llama_cpp = bindings()
        # Metadata only: llama.cpp zeroes the buffers when it creates them and set_data overwrites
        # every cell it loads; a cell left over is masked out of attention (as after truncate()).
        # Clearing the data too would write the whole KV buffer (94 MB at n_ctx 4096) per load.
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx.ctx), False)
        # The buffer's own memory, never a copy of a state that can be tens of MB (a mapped file's
        # view is read-only, which ctypes.from_buffer refuses and numpy does not).
        view = np.frombuffer(state, dtype=np.uint8)
        src = view.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        ok = llama_cpp.llama_state_seq_set_data(self._ctx.ctx, src, view.size, _SEQ)
        if not ok:
            self._ctx.kv_cache_clear()
        return bool(ok)

    def close(self) -> None:
        """Free the batch and the context (idempotent)."""
        if self._batch is not None:
            self._batch.close()
        if self._ctx is not None:
            self._ctx.close()
        self._batch = self._ctx = None


__all__ = ["Context", "bindings", "token_piece"]
