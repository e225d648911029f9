"""Measures whether llama.cpp's multi-sequence batches give the logits of single-sequence prefills.

Run: PYTHONPATH=src python3 bench/multiseq_exactness.py  (prints a markdown table; writes nothing).
Raw low-level bindings on purpose: this checks DESIGN.md's claim before the engine builds on it.
"""

from __future__ import annotations

import sys

import llama_cpp
import llama_cpp._logger
import numpy as np
from raw_context import TEXT, RawContext

from promptcache.model import default_model_path

llama_cpp._logger.set_verbose(False)


class Ctx(RawContext):
    def __init__(self, model, n_seq: int, unified: bool, n_ctx: int = 4096) -> None:
        super().__init__(model, n_seq, n_ctx, unified)

    def prefill(self, tokens: list[int], seq: int, start: int = 0) -> np.ndarray:
        pos, last = start, None
        while pos < len(tokens):
            end = min(len(tokens), pos + 512)
            if len(tokens) - end and len(tokens) - end < 2:
                end = len(tokens) - 2
            rows = [
                (t, p, seq, p == end - 1)
                for p, t in zip(range(pos, end), tokens[pos:end], strict=True)
            ]
            last = self.decode(rows)[-1]
            pos = end
        return last


def particles(model, prompt: list[int], fresh, unified: bool, pair: bool, steps: int = 8) -> float:
    """4 particles stepping together, a clone at step 3 and a stop at step 5; max |diff| to fresh prefills.
    pair: each particle's previous token is re-read with its new one (2 rows per sequence)."""
    rng = np.random.default_rng(0)
    ctx = Ctx(model, 5, unified, n_ctx=512 * 5)
    first = ctx.prefill(prompt, 0)
    seqs = {0: list(prompt)}
    for s in range(1, 4):
        llama_cpp.llama_memory_seq_cp(ctx.mem, 0, s, -1, -1)
        seqs[s] = list(prompt)
    logits = {s: first for s in seqs}
    worst = 0.0
    for step in range(steps):
        if step == 3:  # a resample: particle 3 dies, particle 0 is cloned into it
            llama_cpp.llama_memory_seq_rm(ctx.mem, 3, -1, -1)
            llama_cpp.llama_memory_seq_cp(ctx.mem, 0, 3, -1, -1)
            seqs[3] = list(seqs[0])
            logits[3] = logits[0]
        if step == 5:  # particle 2 stops: sequences of different lengths from here
            seqs.pop(2)
            logits.pop(2)
        rows = []
        for s, toks in seqs.items():
            tok = int(np.argsort(-logits[s])[rng.integers(8)])
            if pair:
                llama_cpp.llama_memory_seq_rm(ctx.mem, s, len(toks) - 1, -1)
                rows.append((toks[-1], len(toks) - 1, s, False))
            rows.append((tok, len(toks), s, True))
            toks.append(tok)
        for s, lg in zip(list(seqs), ctx.decode(rows), strict=True):
            logits[s] = lg
            worst = max(worst, float(np.abs(lg - fresh(seqs[s])).max()))
    ctx.close()
    return worst


def main() -> None:
    mp = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(default_model_path()).encode(), mp)
    vocab = llama_cpp.llama_model_get_vocab(model)
    buf = (llama_cpp.llama_token * 4096)()
    raw = TEXT.encode()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, 4096, True, True)
    ref = Ctx(model, 1, True, n_ctx=512)

    def fresh(tokens: list[int]) -> np.ndarray:
        llama_cpp.llama_memory_clear(ref.mem, True)
        return ref.prefill(tokens, 0)

    print("max |logit difference| to an uncached single-sequence prefill, 4 particles x 8 steps")
    print("| prompt | layout | 1 row per sequence | previous token re-read (2 rows) |")
    print("| --- | --- | --- | --- |")
    for length in (60, 300):
        prompt = list(buf[:n])[:length]
        for unified in (True, False):
            one = particles(model, prompt, fresh, unified, pair=False)
            two = particles(model, prompt, fresh, unified, pair=True)
            layout = "unified KV" if unified else "a stream per sequence"
            print(f"| {length} | {layout} | {one:.3g} | {two:.3g} |", flush=True)
    ref.close()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
