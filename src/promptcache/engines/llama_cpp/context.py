"""Context: one llama.cpp context of many sequences and its batch; decode, logits, sequence cells and states.

Owns every call into llama.cpp's context API (the one place batches are built and decoded); never
decides what to reuse (plan.py does), which sequence serves what (engine.py does), or touches a cache.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from promptcache.codec.kv_streams import single_stream, stream_state
from promptcache.errors import ContextOverflowError, PromptCacheError

log = logging.getLogger(__name__)

_C = TypeVar("_C", bound="Closing")


class Closing:
    """close() on leaving a `with` block and on garbage collection, for objects that own llama.cpp memory."""

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


class KVFullError(PromptCacheError):
    """llama_decode found no free KV cells for a batch (unified KV: evicting a sequence may help)."""


Row = tuple[int, int, int, bool]  # token, position, sequence, logits wanted


class Context(Closing):
    """A llama.cpp context over `model` (an engines.llama_cpp.Model) of `n_seq` sequences.

    split_streams (exact mode): one KV stream of n_ctx_seq cells per sequence (`kv_unified` off), so a
    sequence's cells sit where a lone prefill puts them (DESIGN.md, "Many sequences in one batch");
    otherwise one unified KV of n_seq x n_ctx_seq cells that sequences share (a fork costs no copy).
    n_batch: the most rows one decode takes (llama.cpp caps it at the context's size: `n_batch` says
    what it really takes). Raises whatever llama-cpp-python raises when the context cannot be made.
    """

    def __init__(
        self,
        model: Any,
        *,
        n_seq: int,
        n_ctx_seq: int,
        n_batch: int,
        n_threads: int,
        flash_attn: bool,
        split_streams: bool,
        verbose: bool = False,
    ) -> None:
        llama_cpp = bindings()
        from llama_cpp._internals import LlamaBatch, LlamaContext

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_seq * n_seq
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.kv_unified = not split_streams
        params.n_threads = params.n_threads_batch = n_threads
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.no_perf = True
        self.n_seq = n_seq
        self.split_streams = split_streams and n_seq > 1
        self.n_vocab = model.n_vocab
        self._n_swa = model.n_swa
        self._ctx = LlamaContext(model=model.handle, params=params, verbose=verbose)
        raw_ctx = self._ctx.ctx
        self.n_batch = min(n_batch, int(llama_cpp.llama_n_batch(raw_ctx)))
        # llama.cpp pads each sequence's cells up to a multiple of 256 (unified: the whole cache).
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx(raw_ctx)) // (n_seq if self.split_streams else 1)
        self._memory = llama_cpp.llama_get_memory(raw_ctx)
        self._batch = LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=verbose)
        raw = self._batch.batch
        n = self.n_batch
        self._token = np.ctypeslib.as_array(raw.token, shape=(n,))
        self._pos = np.ctypeslib.as_array(raw.pos, shape=(n,))
        self._logits = np.ctypeslib.as_array(raw.logits, shape=(n,))
        self._seq = [np.ctypeslib.as_array(raw.seq_id[i], shape=(1,)) for i in range(n)]
        np.ctypeslib.as_array(raw.n_seq_id, shape=(n,))[:] = 1
        log.debug("llama.cpp context: %d sequence(s) x %d cells", n_seq, self.n_ctx_seq)

    @property
    def n_ctx(self) -> int:
        """Cells one sequence may hold."""
        return self.n_ctx_seq

    # ------------------------------------------------------------ decoding

    def decode(self, rows: Sequence[Row]) -> None:
        """Evaluate `rows` as one llama_decode. Raises KVFullError when the KV has no free cells
        for them and PromptCacheError for any other failure (the batch's cells are then unknown)."""
        n = len(rows)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"a batch holds 1 to {self.n_batch} rows, not {n}")
        arr = np.asarray(rows, dtype=np.int64)
        self._token[:n] = arr[:, 0]
        self._pos[:n] = arr[:, 1]
        self._logits[:n] = arr[:, 3]
        for i, seq in enumerate(arr[:, 2].tolist()):
            self._seq[i][0] = seq
        self._batch.batch.n_tokens = n
        rc = bindings().llama_decode(self._ctx.ctx, self._batch.batch)
        if rc == 1:
            raise KVFullError("no free KV cells for this batch")
        if rc != 0:
            raise PromptCacheError(f"llama_decode failed with code {rc}")

    def decode_tokens(
        self, tokens: Sequence[int], start: int, seq: int = 0, *, all_logits: bool = False
    ) -> None:
        """Evaluate one sequence's `tokens` at positions start, start + 1, ... as one batch (logits
        for the last only, or with all_logits for every row)."""
        last = start + len(tokens) - 1
        self.decode([(t, p, seq, all_logits or p == last) for p, t in enumerate(tokens, start)])

    def logits(self, i: int) -> np.ndarray:
        """A copy of the logits of row i of the last batch (-1: its last row; float32, n_vocab)."""
        ptr = bindings().llama_get_logits_ith(self._ctx.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def batch_logits(self, n: int) -> np.ndarray:
        """A copy of the logits of the last batch's n rows (float32, n x n_vocab), every row wanted."""
        ptr = bindings().llama_get_logits(self._ctx.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).copy()

    # ------------------------------------------------------------ sequences

    def drop(self, seq: int, start: int = 0) -> None:
        """Drop the sequence's cells from position `start` on (0: all of them)."""
        bindings().llama_memory_seq_rm(self._memory, seq, start, -1)

    def copy(self, src: int, dst: int, n: int) -> None:
        """Make `dst` hold the first n cells of `src` (anything it held is dropped). Across KV streams
        llama.cpp copies whole sequences only (the stream is copied at the next decode): copy all,
        then cut; in a unified KV the cells are shared, not copied."""
        llama_cpp = bindings()
        llama_cpp.llama_memory_seq_rm(self._memory, dst, -1, -1)
        if not n:
            return
        if self.split_streams:
            llama_cpp.llama_memory_seq_cp(self._memory, src, dst, -1, -1)
            llama_cpp.llama_memory_seq_rm(self._memory, dst, n, -1)
        else:
            llama_cpp.llama_memory_seq_cp(self._memory, src, dst, 0, n)

    def clear(self, *, data: bool = False) -> None:
        """Drop every sequence's cells; with data, also zero the KV buffers (llama_memory_clear)."""
        bindings().llama_memory_clear(self._memory, data)

    def can_truncate(self, seq: int, n: int) -> bool:
        """Whether the cells a token at position n attends to are all still held after drop(seq, n):
        a sliding-window cache may have dropped old cells (llama-server checks the same, with
        llama_memory_seq_pos_min, before it reuses a slot's prefix)."""
        if n == 0 or self._n_swa <= 0:
            return True
        pos_min = bindings().llama_memory_seq_pos_min(self._memory, seq)
        return pos_min <= max(0, n - self._n_swa)

    def state_bytes(self, seq: int) -> bytes:
        """The sequence's state in the one-stream layout an LLM's context writes (DESIGN.md, the
        seq-state layout), whatever the context's streams: one format for the prefix cache."""
        llama_cpp = bindings()
        size = llama_cpp.llama_state_seq_get_size(self._ctx.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx.ctx, buf, size, seq)
        state = bytes(memoryview(buf)[:written])
        return bytes(single_stream(state)) if self.split_streams else state

    def load_state(self, seq: int, state: bytes | memoryview) -> bool:
        """Replace the sequence's cells with `state` (any contiguous buffer: bytes, or a read-only
        view of a mapped file); False (and an empty sequence) when llama.cpp refuses it. Raises
        CodecError when a state cannot be laid out for this context's KV streams."""
        llama_cpp = bindings()
        # Metadata only: llama.cpp zeroes the buffers when it creates them and set_data overwrites
        # every cell it loads; a cell left over is masked out of attention (as after drop()).
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        if self.split_streams:
            state = stream_state(state, self.n_seq)
        # The buffer's own memory, never a copy of a state that can be tens of MB (a mapped file's
        # view is read-only, which ctypes.from_buffer refuses and numpy does not).
        view = np.frombuffer(state, dtype=np.uint8)
        src = view.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        ok = llama_cpp.llama_state_seq_set_data(self._ctx.ctx, src, view.size, seq)
        if not ok:
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        return bool(ok)

    def close(self) -> None:
        """Free the batch and the context (idempotent)."""
        if getattr(self, "_batch", None) is not None:
            self._batch.close()
        if getattr(self, "_ctx", None) is not None:
            self._ctx.close()
        self._batch = self._ctx = None


def check_room(n_needed: int, n_ctx_train: int) -> None:
    """Raises ContextOverflowError when a request needs more tokens than the model holds."""
    if n_needed > n_ctx_train:
        raise ContextOverflowError(
            f"this request needs {n_needed} tokens of context; the model holds {n_ctx_train}: "
            "shorten the prompt or lower max_tokens"
        )


__all__ = ["Closing", "Context", "KVFullError", "Row", "bindings", "check_room", "token_piece"]
