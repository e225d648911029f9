"""Fleet benchmark (issue 22): two promptcache servers (one thread each) behind the real vllm-router,
by policy (round_robin, cache_aware, kv_aware, consistent_hash with an x-session-id per
conversation), without and with a shared Redis tier.

U users share one system prompt; each has a 4-turn conversation and all of them talk at once (each
sends its next turn when its reply is in). Measures time to first token (p50, p95; all turns and
turns 2+), prompt tokens reused by source summed over the servers (live, memory, disk, redis), and
how often a turn 2+ landed where its conversation was live (it reused at least the previous turn's
prompt from a live sequence: `usage.prompt_tokens_details.cached_tokens_source`). Every
configuration starts fresh servers (and a fresh Redis). Writes bench/results/fleet.{md,json},
bench/fleet.png and BENCHMARKS.md; `--quick` is a smoke run that writes nothing.

    python bench/fleet_bench.py                   # the full run: tens of minutes on 2 cores, a quiet machine
    python bench/fleet_bench.py --quick           # smoke run (2 users, 2 turns, short prompts): minutes
    python bench/fleet_bench.py --document 400    # each user's first turn also pastes its own document
                                                  # (400 words): section "fleet, a document per user"

Needs vllm-router (pip install -e '.[bench]') and redis-server on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402
from server_bench import Server  # noqa: E402

from promptcache.demo import system_prompt  # noqa: E402
from promptcache.server.router import Worker, router_command  # noqa: E402

HERE = Path(__file__).resolve().parent
POLICIES = ("round_robin", "cache_aware", "kv_aware", "consistent_hash")
BLOCK = 16
QUESTIONS = [
    "How long do refunds take?",
    "And if the item arrived damaged?",
    "Can I get that as a gift card instead?",
    "What reference code should I quote?",
]


@dataclass
class Turn:
    user: int
    turn: int
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    source: str | None


def user_document(user: int, n_words: int) -> str:
    """A deterministic text of about n_words words that is this user's alone (an order history)."""
    rng = random.Random(user)
    items = ["tent", "stove", "boots", "lantern", "backpack", "sleeping bag", "filter", "compass"]
    states = ["delivered", "returned", "refunded", "in transit", "exchanged", "on hold"]
    lines, words = [], 0
    while words < n_words:
        line = (
            f"Order {user + 1}-{len(lines) + 1:03d}: {rng.randint(1, 4)} x {rng.choice(items)}, "
            f"{rng.randint(5, 300)} EUR, placed on day {rng.randint(1, 365)}, {rng.choice(states)}."
        )
        lines.append(line)
        words += len(line.split())
    return "\n".join(lines)


_issued: set[int] = set()


def _free_port() -> int:
    """A port free now and not handed out before in this run (the kernel may offer a port again
    once its socket closes, and the servers, event sockets, Redis and router bind theirs later)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _issued:
            _issued.add(port)
            return port


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server without persistence on a free port, answering PING."""
    import redis

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = _free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([binary, *args, "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.RedisError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def start_fleet(args: argparse.Namespace, tmp: Path, redis_url: str | None) -> list[Server]:
    """Two servers, each publishing KV events (with a replay socket); a RAM cache, or RAM and the
    shared Redis tier."""
    cache = ["--cache", "ram"]
    if redis_url:
        config = tmp / "fleet.toml"
        config.write_text(
            f'[cache]\nmemory_size = "512MB"\ndisk_size = 0\nredis_url = "{redis_url}"\n'
            'redis_size = "1GB"\n'
        )
        cache = ["--cache", "tiered", "--config", str(config)]
    servers = []
    for i in range(2):
        port = _free_port()
        events, replay = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
        cmd = [sys.executable, "-m", "promptcache.server", "--port", str(port), *cache]
        cmd += ["--threads", "1", "--parallel", str(args.parallel), "--n-ctx", str(args.n_ctx)]
        cmd += ["--kv-events", events, "--kv-events-replay", replay, "--log-level", "warning"]
        server = Server(cmd, port, tmp / f"server{i}.log")
        server.worker = Worker(server.url, events, replay)  # type: ignore[attr-defined]
        servers.append(server)
    try:
        for server in servers:
            server.wait_ready()
    except BaseException:  # one did not start: stop the others, which the caller never sees
        for server in servers:
            server.stop()
        raise
    return servers


def chat(url: str, messages: list[dict], max_tokens: int, session: str) -> tuple[str, Turn]:
    """One streamed chat turn through the router: (reply, its measures; user and turn unset)."""
    body = {
        "model": "default",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, pieces, usage = None, [], {}
    headers = {"x-session-id": session}  # what consistent_hash keys on; the others ignore it
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=900
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    first = first or time.perf_counter()
                    pieces.append(text)
    end = time.perf_counter()
    details = usage.get("prompt_tokens_details") or {}
    turn = Turn(
        -1,
        -1,
        (first or end) - t0,
        usage.get("prompt_tokens", 0),
        details.get("cached_tokens", 0),
        details.get("cached_tokens_source"),
    )
    return "".join(pieces), turn


def run_users(
    url: str, args: argparse.Namespace, system: str, tag: str
) -> tuple[list[Turn], float]:
    """Every user at once, each sending its next turn when its reply is in."""
    turns: list[Turn] = []
    lock = threading.Lock()
    start = threading.Barrier(args.users)

    def converse(user: int) -> None:
        messages = [{"role": "system", "content": system}]
        start.wait()
        for t in range(args.turns):
            question = f"I am customer {user + 1}. {QUESTIONS[t % len(QUESTIONS)]}"
            if t == 0 and args.document:
                question = f"My orders:\n{user_document(user, args.document)}\n\n{question}"
            messages.append({"role": "user", "content": question})
            reply, measured = chat(url, messages, args.max_tokens, f"{tag}-user-{user}")
            messages.append({"role": "assistant", "content": reply})
            measured.user, measured.turn = user, t
            with lock:
                turns.append(measured)

    errors: list[BaseException] = []

    def guarded(user: int) -> None:
        try:
            converse(user)
        except BaseException as exc:  # noqa: BLE001 - reported below, after every user stopped
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=guarded, args=(u,)) for u in range(args.users)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} user(s) failed; the first: {errors[0]!r}")
    return turns, time.perf_counter() - t0


def _pct(xs: list[float], q: int) -> float:
    xs = sorted(xs)
    return xs[0] if len(xs) == 1 else statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def summarize(turns: list[Turn], stats: list[dict], wall_s: float) -> dict:
    """TTFT percentiles, reuse by source over both servers, and turns 2+ that found their
    conversation live (reused at least the previous turn's prompt from a live sequence)."""
    previous = {(t.user, t.turn): t.prompt_tokens for t in turns}
    later = [t for t in turns if t.turn > 0]
    live = [
        t for t in later if t.source == "live" and t.cached_tokens >= previous[(t.user, t.turn - 1)]
    ]
    reused: dict[str, int] = {}
    for s in stats:
        for source, n in s["tokens_reused_by_source"].items():
            reused[source] = reused.get(source, 0) + n
    ttft = [t.ttft_s * 1000 for t in turns]
    later_ttft = [t.ttft_s * 1000 for t in later]
    return {
        "requests": len(turns),
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p95_ms": _pct(ttft, 95),
        "ttft_p50_later_ms": statistics.median(later_ttft) if later_ttft else None,
        "ttft_p95_later_ms": _pct(later_ttft, 95) if later_ttft else None,
        "landed_live": len(live) / len(later) if later else None,
        "reused": reused,
        "prompt_tokens": sum(s["tokens"]["prompt_tokens"] for s in stats),
        "tokens_evaluated": sum(s["tokens"]["tokens_evaluated"] for s in stats),
        "kv_event_batches": sum((s.get("kv_events") or {}).get("batches", 0) for s in stats),
        "wall_s": wall_s,
    }


def run_config(args: argparse.Namespace, system: str, policy: str, shared: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as name:
        tmp = Path(name)
        redis, url = start_redis(tmp) if shared else (None, None)
        servers: list[Server] = []
        router = None
        try:
            servers = start_fleet(args, tmp, url)
            for s in servers:  # warm-up, sharing nothing with the workload
                w = s.worker  # type: ignore[attr-defined]
                warm = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 2}
                httpx.post(f"{w.url}/v1/chat/completions", json=warm, timeout=300)
            first = servers[0].worker.url  # type: ignore[attr-defined]
            system_only = {"messages": [{"role": "system", "content": system}]}
            n_system = httpx.post(f"{first}/tokenize", json=system_only, timeout=60).json()["count"]
            port = _free_port()
            cmd = router_command(
                [s.worker for s in servers],  # type: ignore[attr-defined]
                policy=policy,
                port=port,
                prometheus_port=_free_port(),
                block_size=BLOCK,
                health_check_secs=5,
            )
            router = Server(cmd, port, tmp / "router.log")
            router.wait_ready(60)
            time.sleep(1.0)  # the router's SUB sockets connect (the replay socket covers the rest)
            before = [_stats(s) for s in servers]
            turns, wall = run_users(f"http://127.0.0.1:{port}", args, system, policy)
            after = [_stats(s) for s in servers]
            row = summarize(turns, [_delta(a, b) for a, b in zip(after, before)], wall)
            return {
                "policy": policy,
                "redis": shared,
                "system_tokens": n_system,
                **row,
                "turns": [asdict(t) for t in turns],
            }
        finally:
            for p in [router, *servers]:
                if p is not None:
                    p.stop()
            if redis is not None:
                redis.terminate()
                redis.wait()


def _stats(server: Server) -> dict:
    w = server.worker  # type: ignore[attr-defined]
    return httpx.get(f"{w.url}/v1/cache/stats", timeout=30).json()


def _delta(after: dict, before: dict) -> dict:
    """The workload's share of a server's counters (the warm-up left some)."""
    by = before["tokens_reused_by_source"]
    return {
        "tokens": {k: v - before["tokens"][k] for k, v in after["tokens"].items()},
        "tokens_reused_by_source": {
            k: v - by.get(k, 0) for k, v in after["tokens_reused_by_source"].items()
        },
        "kv_events": {
            "batches": (after.get("kv_events") or {}).get("batches", 0)
            - (before.get("kv_events") or {}).get("batches", 0)
        },
    }


def _ms(x: object) -> str:
    return f"{x:,.0f} ms" if isinstance(x, (int, float)) else "-"


def markdown(rows: list[dict], setup: dict) -> str:
    document = setup.get("document") or 0
    lines = [
        "## fleet, a document per user" if document else "## fleet",
        "",
        f"`bench/fleet_bench.py{f' --document {document}' if document else ''}`: two `promptcache serve --threads 1 --parallel {setup['parallel']}` "
        f"behind vllm-router {setup['router']} (KV events on, blocks of {BLOCK}); {setup['users']} "
        f"users at once, each a {setup['turns']}-turn chat over one {setup['system_tokens']:,}-token "
        f"system prompt (max_tokens {setup['max_tokens']}, streamed)"
        + (
            f", each user's first message pasting its own {document}-word order history"
            if document
            else ""
        )
        + "; consistent_hash keys on one "
        "x-session-id per conversation. Redis: a shared Redis tier beside each server's RAM tier. "
        "'live, turns 2+': turns that reused at least their previous turn's prompt from a live "
        f"sequence. Load average at the start: {setup['load']}.",
        "",
        "| policy | Redis | TTFT p50 | TTFT p95 | p50 turns 2+ | p95 turns 2+ | live, turns 2+ "
        "| reused live | memory | redis | evaluated |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        reused = r["reused"]
        landed = r["landed_live"]
        lines.append(
            f"| {r['policy']} | {'yes' if r['redis'] else 'no'} | {_ms(r['ttft_p50_ms'])} "
            f"| {_ms(r['ttft_p95_ms'])} | {_ms(r['ttft_p50_later_ms'])} "
            f"| {_ms(r['ttft_p95_later_ms'])} | {f'{landed:.0%}' if landed is not None else '-'} "
            f"| {reused.get('live', 0):,} | {reused.get('memory', 0):,} "
            f"| {reused.get('redis', 0):,} | {r['tokens_evaluated']:,} |"
        )
    base = {(r["policy"], r["redis"]): r for r in rows}
    kv, rr = base.get(("kv_aware", False)), base.get(("round_robin", False))
    if kv and rr:
        ratio = kv["ttft_p50_ms"] / rr["ttft_p50_ms"]
        lines += [
            "",
            f"kv_aware's TTFT p50 is {ratio:.2f}x round_robin's without Redis (target: at most "
            f"0.5x), and {kv['landed_live']:.0%} of its turns 2+ found their conversation live "
            "(target: at least 90%).",
        ]
    shared = base.get(("round_robin", True))
    if rr and shared:
        lines += [
            "",
            f"The shared Redis tier gives round_robin a TTFT p50 of {_ms(shared['ttft_p50_ms'])} "
            f"against {_ms(rr['ttft_p50_ms'])} without it (turns 2+: "
            f"{_ms(shared['ttft_p50_later_ms'])} against {_ms(rr['ttft_p50_later_ms'])}), "
            f"{shared['reused'].get('redis', 0):,} prompt tokens restored from Redis.",
        ]
    lines += ["", f"![fleet time to first token](bench/{_name(setup)}.png)"]
    return "\n".join(lines)


def _name(setup: dict) -> str:
    return "fleet_document" if setup.get("document") else "fleet"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [f"{r['policy']}\n{'+ Redis' if r['redis'] else 'no Redis'}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["ttft_p50_ms"] for r in rows], 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [r["ttft_p95_ms"] for r in rows], 0.4, label="p95")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("time to first token, ms")
    ax.set_title("two servers behind vllm-router, all users at once")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _router_version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm-router")
    except Exception:  # noqa: BLE001 - a version is only a label
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--rules", type=int, default=16, help="system prompt size (policies)")
    parser.add_argument("--parallel", type=int, default=None, help="sequences per server (users)")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--redis", choices=("both", "no", "yes"), default="both")
    parser.add_argument("--quick", action="store_true", help="smoke run; writes nothing")
    parser.add_argument(
        "--document", type=int, default=0, help="words of each user's own document (turn 1)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.turns, args.max_tokens, args.rules = 2, 2, 4, 2
    args.parallel = args.parallel or max(4, args.users)
    system = system_prompt(args.rules)
    shared = {"both": (False, True), "no": (False,), "yes": (True,)}[args.redis]
    setup = {
        "users": args.users,
        "turns": args.turns,
        "max_tokens": args.max_tokens,
        "document": args.document,
        "parallel": args.parallel,
        "router": _router_version(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    rows = []
    for redis in shared:
        for policy in args.policies:
            print(f"{policy}, Redis {'on' if redis else 'off'} ...", flush=True)
            row = run_config(args, system, policy, redis)
            setup["system_tokens"] = row["system_tokens"]
            rows.append(row)
            shown = {k: v for k, v in row.items() if k != "turns"}
            print(json.dumps(shown, default=str), flush=True)
    md = markdown(rows, setup)
    print(md)
    if not args.quick:
        plot(rows, HERE / f"{_name(setup)}.png")
        write_section(_name(setup), md, {"setup": setup, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
