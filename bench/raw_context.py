"""A llama.cpp context through the raw low-level bindings, for the exactness measurements that the
engine's schedule rests on (bench/batch_invariance.py, bench/multiseq_exactness.py): nothing of
promptcache's engine between the measurement and llama_decode."""

from __future__ import annotations

import llama_cpp
import numpy as np

TEXT = (  # the prompts' text: every measured sequence reads (part of) it
    "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days; "
    "returns of damaged items are free within thirty days, and gift cards never expire. "
) * 12


class RawContext:
    """n_seq sequences in n_ctx cells (one KV for all when unified, else a stream per sequence),
    batches of up to 512 rows, 2 threads, no flash attention."""

    def __init__(self, model, n_seq: int, n_ctx: int, unified: bool) -> None:
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, 512, 512
        p.n_seq_max, p.kv_unified = n_seq, unified
        p.n_threads = p.n_threads_batch = 2
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model, p)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(512, 0, n_seq)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

    def decode(self, rows: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """rows: (token, pos, seq, want_logits); returns logits of the rows that want them, in order."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        b.n_tokens = len(rows)
        rc = llama_cpp.llama_decode(self.ctx, b)
        assert rc == 0, rc
        out = []
        for i, r in enumerate(rows):
            if r[3]:
                ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
                out.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return out

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
