"""The long reliability runs: every fault scenario many times, then load and a soak on loopback.

Owns the long runs and their figures (results/reliability.json, tables for RELIABILITY.md); never
judges a verdict itself (tests/scenarios.py does) and never runs past its --duration.

    python3 scripts/reliability.py --runs 1 --duration 20            # what RELIABILITY.md reports
    python3 scripts/reliability.py --only faults --runs 3            # fault scenarios only, 3x longer
    python3 scripts/reliability.py --only load --duration 30 --soak-requests 10000

--runs scales how many times each fault scenario runs; --duration (minutes) bounds the load phases
and the soak (the soak stops at --soak-requests or at its share of the time, whichever comes first).
Exit status 1 when any verdict is wrong, any process that did not fail crashed, any error other than
503 + Retry-After was answered, a cache tier went over its capacity or RSS over its bound.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import scenarios as S  # noqa: E402
from redis_fixture import RedisServer  # noqa: E402

log = logging.getLogger("reliability")
KEY = "soak-key"
PREFIXES = [
    "You are a terse assistant for the Northwind depot. Answer in a few words. ",
    "System: the following is a log of questions about boats, tides and harbours. ",
    "Context: a short list of colours, fruits and animals follows; reply with one word. ",
]
WORDS = "red blue green apple pear fox owl boat tide harbour north south east west".split()


def _run(results: dict[str, Any], name: str, scenario: Callable[[], Any]) -> None:
    """Run one fault scenario, timed, into results["scenarios"][name]. `scenario` returns its tally,
    or its tally and figures to record next to it."""
    t0 = time.monotonic()
    outcome = scenario()
    tally, figures = outcome if isinstance(outcome, tuple) else (outcome, {})
    verdicts = {k: v for k, v in tally.items() if k != "detected"}
    results["scenarios"][name] = {
        "runs": sum(verdicts.values()),
        "verdicts": dict(sorted(verdicts.items())),
        "passed": S.passed(tally),
        "seconds": round(time.monotonic() - t0, 1),
        "command": "--only faults",
        **({"corrupt_detected": tally["detected"]} if "detected" in tally else {}),
        **figures,
    }
    log.info("%s: %s", name, results["scenarios"][name])


def run_faults(results: dict[str, Any], work: Path, runs: int) -> None:
    redis = RedisServer(work / "redis")
    (work / "redis").mkdir(parents=True)
    redis.start()
    try:
        for tier in ("disk", "redis", "tiered"):
            _run(
                results,
                f"stored bytes damaged, {tier} tier (cache layer)",
                partial(S.corruption, tier, 25 * runs, work / "c", redis_url=redis.url, seed=11),
            )
        _run(
            results,
            "3 disk writers killed -9 at random points",
            partial(S.killed_writers, 8 * runs, work / "k", seed=12),
        )
        if _can_mount():
            _run(
                results,
                "disk full (2 MiB tmpfs), ENOTDIR writes, EISDIR/ENOENT reads",
                partial(S.disk_faults, 3 * runs, work / "f", seed=13),
            )
        _run(
            results,
            "Redis delayed, dropped, cut, killed, restarted, flushed",
            partial(S.redis_chaos, 600 * runs, redis, seed=14),
        )

        from promptcache import LLM

        oracle = S.Oracle()
        llm = LLM(n_ctx=512, cache=None)
        for tier in ("disk", "redis", "tiered"):
            _run(
                results,
                f"model states damaged, {tier} tier (SmolLM2, logits + greedy)",
                partial(
                    S.llm_corruption,
                    llm,
                    oracle,
                    tier,
                    3 * runs,
                    work / "lc",
                    redis_url=redis.url,
                    seed=15,
                ),
            )
        _run(
            results,
            "long model states damaged, disk tier (whole states and segments read as mapped views)",
            partial(S.llm_long_state_corruption, llm, oracle, 6 * runs, work / "ll", seed=18),
        )
        if _can_mount():
            _run(
                results,
                "model caching onto a full disk (1 MiB tmpfs)",
                partial(S.llm_disk_full, llm, oracle, 2 * runs, work / "lf"),
            )
        _run(
            results,
            "sessions: byte flipped or cut",
            partial(S.session_corruption, llm, oracle, 100 * runs, seed=16),
        )
        llm.close()
        _run(
            results,
            "server killed -9 mid-stream, restarted on its disk cache",
            partial(S.server_killed_mid_stream, 4 * runs, work / "sk", oracle, seed=17),
        )
        _run(
            results,
            "batching server (--parallel 3) killed -9 with 3 streams open, restarted on its disk cache",
            partial(
                S.server_killed_mid_stream, 4 * runs, work / "skb", oracle, seed=19, parallel=3
            ),
        )
    finally:
        redis.stop()


def _can_mount() -> bool:
    import faults

    return faults.can_mount()


# ------------------------------------------------------------------ load and soak


class Sampler(threading.Thread):
    """Every second: the server's RSS and every cache tier's bytes against its capacity."""

    def __init__(self, server: S.ServerProcess) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(server.proc.pid)
        self.url = server.url
        self.rss: list[int] = []
        self.over_capacity: list[dict[str, Any]] = []
        self.max_tier_fill: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        while not self.stop.wait(1.0):
            try:
                self.rss.append(self.proc.memory_info().rss)
                stats = httpx.get(
                    f"{self.url}/v1/cache/stats",
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=10,
                ).json()
            except Exception as exc:  # noqa: BLE001 - a sample lost under load is not a verdict
                log.debug("sample failed: %s", exc)
                continue
            for tier in stats.get("tiers", []):
                fill = tier["bytes"] / tier["capacity_bytes"]
                self.max_tier_fill[tier["tier"]] = max(
                    self.max_tier_fill.get(tier["tier"], 0.0), fill
                )
                if tier["bytes"] > tier["capacity_bytes"]:
                    self.over_capacity.append(tier)


def _prompt(rng: random.Random) -> str:
    return rng.choice(PREFIXES) + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 6)))


def _one_request(client: Any, rng: random.Random) -> tuple[str, float | None]:
    """One tiny streamed request: ("ok" | "503" | "error:<what>", time to first token in s)."""
    import httpx

    t0 = time.monotonic()
    body = {
        "model": "default",
        "prompt": _prompt(rng),
        "max_tokens": rng.randrange(1, 5),
        "temperature": 0,
        "stream": True,
    }
    try:
        with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code == 503:
                r.read()
                return (
                    "503" if r.headers.get("retry-after") else "error:503 without Retry-After"
                ), None
            if r.status_code != 200:
                r.read()
                return f"error:{r.status_code}", None
            ttft = None
            for line in r.iter_lines():
                if ttft is None and line.startswith("data: {"):
                    ttft = time.monotonic() - t0
            return "ok", ttft
    except httpx.HTTPError as exc:
        return f"error:{type(exc).__name__}", None


def _clients(
    url: str, n: int, deadline: float, max_requests: int, seed: int
) -> tuple[Counter[str], list[float]]:
    import httpx

    outcomes: Counter[str] = Counter()
    ttfts: list[float] = []
    lock = threading.Lock()
    issued = [0]

    def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600
        ) as client:
            while time.monotonic() < deadline:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                outcome, ttft = _one_request(client, rng)
                with lock:
                    outcomes[outcome] += 1
                    if ttft is not None:
                        ttfts.append(ttft)
                if outcome == "503":
                    time.sleep(0.2)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, ttfts


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1)


def _spot_checks(url: str, n: int, seed: int, parallel: int = 1) -> Counter[str]:
    """n prompts answered by the loaded server (greedy, from its warm cache) and by an uncached LLM
    (the server's answer whatever its --parallel: README, "Exactness")."""
    import openai

    from promptcache import LLM

    rng = random.Random(seed)
    tally: Counter[str] = Counter()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=3, timeout=600)
    with LLM(n_ctx=512, cache=None) as oracle:
        for _ in range(n):
            prompt = _prompt(rng)
            want = oracle.complete(prompt, max_tokens=4, temperature=0).text
            out = client.completions.create(
                model="default", prompt=prompt, max_tokens=4, temperature=0
            )
            cached = out.usage.prompt_tokens_details.cached_tokens or 0
            ok = out.choices[0].text == want
            tally[("cache" if cached else "recompute") if ok else "wrong"] += 1
    return tally


def run_load(
    results: dict[str, Any],
    work: Path,
    minutes: float,
    soak_requests: int,
    workers: int,
    parallel: int = 1,
) -> None:
    import psutil  # noqa: F401 - fail early when missing

    from promptcache.model import default_model_path

    memory_size, disk_size, n_ctx = 64 << 20, 128 << 20, 512
    config = work / "promptcache.toml"
    config.write_text(
        f'[cache]\nmemory_size = {memory_size}\ndisk_size = {disk_size}\ndisk_path = "{work / "kv"}"\n'
    )
    server = S.ServerProcess(
        work / "load-server.log", "--workers", str(workers), "--max-queue", str(4 * workers), "--n-ctx", str(n_ctx),
        "--max-tokens", "4", "--api-key", KEY, "--cache", "tiered", "--config", str(config), "--log-level", "warning",
        "--parallel", str(parallel),
    )  # fmt: skip
    server.wait_ready()
    sampler = Sampler(server)
    sampler.start()
    load: dict[str, Any] = {"workers": workers, "parallel": parallel, "phases": []}
    try:
        phase_s = minutes * 60 / 4
        for mult in (2, 8):
            n = mult * workers
            t0 = time.monotonic()
            outcomes, ttfts = _clients(server.url, n, t0 + phase_s, 10**9, seed=mult)
            load["phases"].append({
                "clients": n, "seconds": round(time.monotonic() - t0, 1), "requests": sum(outcomes.values()),
                "outcomes": dict(outcomes), "ttft_p50_ms": _pct(ttfts, 0.5), "ttft_p99_ms": _pct(ttfts, 0.99),
            })  # fmt: skip
            log.info("load %s", load["phases"][-1])
        t0 = time.monotonic()
        outcomes, ttfts = _clients(
            server.url, 2 * workers, t0 + minutes * 60 / 2, soak_requests, seed=99
        )
        load["soak"] = {
            "clients": 2 * workers, "seconds": round(time.monotonic() - t0, 1), "requests": sum(outcomes.values()),
            "outcomes": dict(outcomes), "ttft_p50_ms": _pct(ttfts, 0.5), "ttft_p99_ms": _pct(ttfts, 0.99),
        }  # fmt: skip
        log.info("soak %s", load["soak"])
        spot = _spot_checks(server.url, 20, seed=5, parallel=parallel)
        load["spot_checks"] = dict(spot)
    finally:
        sampler.stop.set()
        sampler.join()
        alive = server.alive()
        server.stop()
    model_bytes = os.path.getsize(default_model_path())
    # about 23 KB of f16 KV a token (DESIGN.md); a batching worker holds parallel sequences of n_ctx
    # (rounded up to 256 cells) and its LLM keeps a context for session and echo jobs
    context_bytes = workers * ((parallel + 1) * n_ctx if parallel > 1 else n_ctx) * 23_100
    memo = min(256 << 20, memory_size // 4)
    margin = (
        400 << 20
    )  # Python, FastAPI, llama.cpp compute buffers, allocator slack (stated, measured below)
    bound = model_bytes + context_bytes + memory_size + memo + margin
    load["rss"] = {
        "max_mb": round(max(sampler.rss, default=0) / 2**20, 1),
        "first_mb": round(sampler.rss[0] / 2**20, 1) if sampler.rss else None,
        "samples": len(sampler.rss),
        "bound_mb": round(bound / 2**20, 1),
        "bound": "model file + workers x (parallel + 1) x n_ctx x 23 KB + RAM tier + memo + 400 MiB margin",
    }
    load["cache_over_capacity_samples"] = len(sampler.over_capacity)
    load["max_tier_fill"] = {k: round(v, 3) for k, v in sampler.max_tier_fill.items()}
    bad = [
        k for ph in [*load["phases"], load["soak"]] for k in ph["outcomes"] if k.startswith("error")
    ]
    load["passed"] = (
        alive
        and not bad
        and not sampler.over_capacity
        and max(sampler.rss, default=0) <= bound
        and S.passed(spot)
        and load["soak"]["requests"] > 0
    )
    results["load"] = load


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="scale of every fault scenario's run count"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="minutes for load + soak")
    parser.add_argument("--soak-requests", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--parallel", type=int, default=1, help="requests each worker batches (serve --parallel)"
    )
    parser.add_argument("--only", choices=["faults", "load"], default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "reliability.json")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("promptcache").setLevel(
        logging.ERROR
    )  # the faults' own warnings are expected
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        work = Path(tmp)
        if args.only in (None, "faults"):
            run_faults(results, work / "faults", args.runs)
        if args.only in (None, "load"):
            (work / "load").mkdir()
            run_load(
                results,
                work / "load",
                args.duration,
                args.soak_requests,
                args.workers,
                args.parallel,
            )
    results["load_average_end"] = os.getloadavg()
    ok = all(s["passed"] for s in results["scenarios"].values()) and results.get("load", {}).get(
        "passed", True
    )
    results["passed"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
