"""Benchmark of the dataset cache: reopening a cached tokenized dataset vs tokenizing again, and
stream_dataset with and without prefetch. Writes bench/results/artefacts.{json,md}.

Run: PYTHONPATH=src python3 bench/artefacts_bench.py [--rows 100000] [--stream-rows 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, machine, median  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven cats sing about rain in old Paris".split()


def texts(n: int, salt: int = 0) -> list[str]:
    w = len(WORDS)
    return [
        f"{i}: " + " ".join(WORDS[(i * 7 + j * (3 + salt)) % w] for j in range(8)) for i in range(n)
    ]


REOPEN = """
import json, sys, time
t0 = time.perf_counter()
import datasets
from promptcache.artefacts import DatasetCache
t1 = time.perf_counter()
ds = DatasetCache(sys.argv[1]).get_dataset(sys.argv[2])
first, last = ds[0]["input_ids"], ds[-1]["input_ids"]
t2 = time.perf_counter()
n = 0
for start in range(0, ds.num_rows, 4096):
    n += len(ds[start:start + 4096]["input_ids"])
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "open": t2 - t1, "read_all": t3 - t2, "rows": n}))
"""


def bench_reopen(rows: int, workdir: Path) -> dict:
    from datasets import Dataset

    from promptcache.artefacts import DatasetCache, GGUFTokenizer
    from promptcache.artefacts.dataset import _quiet

    source = Dataset.from_dict({"text": texts(rows)})
    tok = GGUFTokenizer()
    with _quiet():
        t0 = time.perf_counter()
        source.map(tok, batched=True, keep_in_memory=True, new_fingerprint="bench")
        tokenize_s = time.perf_counter() - t0
    cache = DatasetCache(workdir / "datasets", capacity_bytes=4 << 30)
    t0 = time.perf_counter()
    key = cache.cache_dataset(source, tok, batched=True)
    cold_s = time.perf_counter() - t0
    size = sum(
        f.stat().st_size for f in (workdir / "datasets" / "entries" / key).rglob("*") if f.is_file()
    )
    t0 = time.perf_counter()
    cache.cache_dataset(source, tok, batched=True)
    hit_s = time.perf_counter() - t0
    runs = []
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", REOPEN, str(workdir / "datasets"), key],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(out.stdout))
    tok.close()
    open_s = median([r["open"] for r in runs])
    read_s = median([r["read_all"] for r in runs])
    return {
        "rows": rows,
        "artefact_bytes": size,
        "tokenize_s": tokenize_s,
        "cache_dataset_cold_s": cold_s,
        "cache_dataset_hit_s": hit_s,
        "fresh_process_open_s": open_s,
        "fresh_process_read_all_s": read_s,
        "speedup_open": tokenize_s / open_s,
        "speedup_open_and_read_all": tokenize_s / (open_s + read_s),
        "runs": runs,
    }


def consume(stream, step_s: float) -> dict:  # noqa: ANN001
    t0 = time.perf_counter()
    rows = 0
    for batch in stream:
        rows += len(batch["text"])
        if step_s:
            time.sleep(step_s)  # a training step on an accelerator: the CPU is free meanwhile
    total = time.perf_counter() - t0
    return {
        "rows": rows,
        "seconds": total,
        "rows_per_s": rows / total,
        "batches": stream.batches,
        "stalls": stream.stalls,
        "stalls_after_warmup": stream.stalls_after(stream.prefetch + 1),
        "wait_s": stream.wait_seconds,
    }


def bench_stream(rows: int, batch_size: int, workdir: Path) -> dict:
    from datasets import Dataset

    from promptcache.artefacts import DatasetCache, GGUFTokenizer

    source = Dataset.from_dict({"text": texts(rows, salt=1)})
    tok = GGUFTokenizer()
    # Production alone (no consumer work, no prefetch): the time a batch takes to make.
    cache = DatasetCache(workdir / "produce", capacity_bytes=4 << 30)
    with cache.stream_dataset(source, batch_size, tok, prefetch=0, batched=True) as s:
        produce = consume(s, 0.0)
    step = produce["seconds"] / produce["batches"]
    result = {
        "rows": rows,
        "batch_size": batch_size,
        "production": produce,
        "consumer_step_s": step,
    }
    for name, prefetch in (("no_prefetch", 0), ("prefetch_4", 4)):
        cache = DatasetCache(workdir / f"miss-{name}", capacity_bytes=4 << 30)
        with cache.stream_dataset(source, batch_size, tok, prefetch=prefetch, batched=True) as s:
            assert not s.from_cache
            result[f"miss_{name}"] = consume(s, step)
        with cache.stream_dataset(source, batch_size, tok, prefetch=prefetch, batched=True) as s:
            assert s.from_cache
            result[f"hit_{name}"] = consume(s, step)
    tok.close()
    result["speedup_miss"] = (
        result["miss_prefetch_4"]["rows_per_s"] / result["miss_no_prefetch"]["rows_per_s"]
    )
    result["speedup_hit"] = (
        result["hit_prefetch_4"]["rows_per_s"] / result["hit_no_prefetch"]["rows_per_s"]
    )
    return result


def markdown(reopen: dict, stream: dict) -> str:
    r, s = reopen, stream
    lines = [
        "## Artefacts: a cached tokenized dataset, and streaming with prefetch",
        "",
        f"`python bench/artefacts_bench.py` — {r['rows']:,} generated short sentences tokenized with the default "
        "model's tokenizer (SmolLM2 GGUF, llama.cpp vocab only, `GGUFTokenizer`), stored by `DatasetCache` "
        f"as Arrow ({r['artefact_bytes'] / 1e6:.1f} MB). Fresh-process figures are medians of 5 processes; "
        "the artefact's files are in the OS page cache.",
        "",
        "| operation | time | vs tokenizing again |",
        "| --- | ---: | ---: |",
        f"| tokenize again (`Dataset.map`, in memory) | {r['tokenize_s']:.2f} s | 1x |",
        f"| `cache_dataset`, cold (tokenize + write + fsync) | {r['cache_dataset_cold_s']:.2f} s | |",
        f"| `cache_dataset`, hit (key + index lookup) | {r['cache_dataset_hit_s'] * 1e3:.1f} ms | |",
        f"| fresh process: `get_dataset` (memory-mapped) + first and last row | {r['fresh_process_open_s'] * 1e3:.1f} ms "
        f"| {r['speedup_open']:.0f}x faster |",
        f"| fresh process: open + read every row in batches of 4,096 | "
        f"{(r['fresh_process_open_s'] + r['fresh_process_read_all_s']):.2f} s | {r['speedup_open_and_read_all']:.1f}x faster |",
        "",
        f"Streaming {s['rows']:,} rows in batches of {s['batch_size']} through `stream_dataset`; the consumer sleeps "
        f"{s['consumer_step_s'] * 1e3:.1f} ms per batch (a simulated accelerator step, as long as producing one "
        "batch alone takes). Miss: tokenized, yielded and cached on the way; hit: read from the cached artefact.",
        "",
        "| path | prefetch | rows/s | stalls (after warm-up) | consumer waited | throughput vs no prefetch |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path in ("miss", "hit"):
        base = s[f"{path}_no_prefetch"]["rows_per_s"]
        for name, prefetch in (("no_prefetch", 0), ("prefetch_4", 4)):
            m = s[f"{path}_{name}"]
            stalls = (
                f"{m['stalls']} ({m['stalls_after_warmup']})" if prefetch else "n/a (synchronous)"
            )
            lines.append(
                f"| {path} | {prefetch} | {m['rows_per_s']:,.0f} | {stalls} | {m['wait_s']:.2f} s | {m['rows_per_s'] / base:.2f}x |"
            )
    lines += [
        "",
        f"Targets: reopening at least 20x faster than tokenizing again (measured {r['speedup_open']:.0f}x to open, "
        f"{r['speedup_open_and_read_all']:.1f}x to open and read every row); prefetch at least 1.8x the throughput "
        f"without it (measured {s['speedup_miss']:.2f}x on the miss path, {s['speedup_hit']:.2f}x on the hit path).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--stream-rows", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="artefacts-bench-") as tmp:
        work = Path(tmp)
        reopen = bench_reopen(args.rows, work)
        stream = bench_stream(args.stream_rows, args.batch_size, work)
    load = os.getloadavg()
    data = {"reopen": reopen, "stream": stream, "loadavg": load, "machine": machine()}
    md = markdown(reopen, stream)
    md += f"\n\nLoad average during the run: {load[0]:.1f} (other jobs shared the 2 cores)."
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (RESULTS / "artefacts.md").write_text(f"{md}\n\n_Measured {stamp} on {machine()}._\n")
    (RESULTS / "artefacts.json").write_text(json.dumps(data, indent=2, default=str))
    print(md)


if __name__ == "__main__":
    main()
