"""Server benchmark: several users over one shared ~1,000-token system prompt, each conversation
growing turn by turn, streamed through the official openai client, against `python -m llama_cpp.server`
(cache off, cache on) and `promptcache serve`, one after the other in one run.

Measures time to first token (p50/p95) and tokens/s per server; writes bench/results/server.{md,json}
and BENCHMARKS.md. `--quick` is a short smoke run that prints and writes nothing.

    python bench/server_bench.py            # the full run (a few minutes on 2 cores)
    python bench/server_bench.py --quick    # smoke run, about a minute

llama_cpp.server needs its extras: pip install sse-starlette starlette-context
"""

from __future__ import annotations

import argparse
import json
import os
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
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402

from promptcache.demo import system_prompt  # noqa: E402
from promptcache.model import default_model_path  # noqa: E402

QUESTIONS = [
    "How long do refunds take?",
    "And if the item arrived damaged?",
    "Can I get that as a gift card instead?",
    "What reference code should I quote?",
    "Is there anything else I should know?",
]


@dataclass
class Turn:
    server: str
    user: int
    turn: int
    ttft_s: float
    total_s: float
    completion_tokens: int
    decode_tokens_per_s: float | None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_commands(port: int, threads: int) -> dict[str, list[str]]:
    """What each contender runs: llama_cpp.server with its defaults but the same threads as promptcache."""
    model = str(default_model_path())
    llama = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "4096",
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--verbose",
        "false",
    ]
    promptcache = [
        sys.executable,
        "-m",
        "promptcache.server",
        "--port",
        str(port),
        "--workers",
        "1",
        "--threads",
        str(threads),
        "--log-level",
        "warning",
    ]
    return {
        "llama_cpp.server, cache off": [*llama, "--cache", "false"],
        "llama_cpp.server, cache on (LlamaRAMCache)": [
            *llama,
            "--cache",
            "true",
            "--cache_type",
            "ram",
        ],
        "promptcache serve": promptcache,
        "promptcache serve --no-exact": [*promptcache, "--no-exact"],
    }


class Server:
    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _count_tokens(tokenizer: object, text: str) -> int:
    return len(tokenizer.tokenize(text.encode(), add_bos=False, special=False)) if text else 0  # type: ignore[attr-defined]


def ask(
    client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int
) -> tuple[str, float, float, float | None]:
    """Stream one chat completion: (reply, time to first content, total time, time of the last content)."""
    t0 = time.perf_counter()
    first = last = None
    pieces = []
    stream = client.chat.completions.create(
        model="default", messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            pieces.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    return (
        "".join(pieces),
        (first or end) - t0,
        end - t0,
        (last - first) if first and last else None,
    )


def run_workload(
    name: str,
    url: str,
    *,
    users: int,
    turns: int,
    max_tokens: int,
    system: str,
    concurrent: bool,
    tokenizer: object,
) -> tuple[list[Turn], float]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
    # Warm-up, sharing nothing with the workload.
    ask(client, [{"role": "user", "content": "Hello!"}], 4)
    conversations = [[{"role": "system", "content": system}] for _ in range(users)]
    results: list[Turn] = []
    lock = threading.Lock()

    def one_turn(user: int, turn: int) -> None:
        messages = conversations[user]
        messages.append(
            {
                "role": "user",
                "content": f"I am customer {user + 1}. {QUESTIONS[turn % len(QUESTIONS)]}",
            }
        )
        reply, ttft, total, decode_s = ask(client, messages, max_tokens)
        messages.append({"role": "assistant", "content": reply})
        n = _count_tokens(tokenizer, reply)
        rate = (n - 1) / decode_s if decode_s and n > 1 else None
        with lock:
            results.append(Turn(name, user, turn, ttft, total, n, rate))

    t0 = time.perf_counter()
    if concurrent:  # every user at once, each waiting for its own reply before its next turn

        def converse(user: int) -> None:
            for turn in range(turns):
                one_turn(user, turn)

        threads = [threading.Thread(target=converse, args=(u,)) for u in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:  # round robin: each user's next turn comes after every other user's, as on a shared server
        for turn in range(turns):
            for user in range(users):
                one_turn(user, turn)
    return results, time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def summarize(name: str, turns: list[Turn], wall_s: float) -> dict[str, object]:
    ttft = [t.ttft_s for t in turns]
    later = [t.ttft_s for t in turns if t.turn > 0]
    rates = [t.decode_tokens_per_s for t in turns if t.decode_tokens_per_s]
    tokens = sum(t.completion_tokens for t in turns)
    return {
        "server": name,
        "requests": len(turns),
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p95_ms": 1000 * _pct(ttft, 95),
        "ttft_p50_later_turns_ms": 1000 * statistics.median(later) if later else None,
        "decode_tokens_per_s_p50": statistics.median(rates) if rates else None,
        "completion_tokens": tokens,
        "end_to_end_tokens_per_s": tokens / wall_s,
        "wall_s": wall_s,
    }


def _ms(x: object) -> str:
    return f"{x:,.0f} ms" if isinstance(x, (int, float)) else "-"


def markdown(rows: list[dict], setup: dict, commands: dict[str, list[str]]) -> str:
    lines = [
        "## server",
        "",
        f"`bench/server_bench.py`: {setup['users']} users share one system prompt of {setup['system_tokens']:,} tokens; "
        f"each has a {setup['turns']}-turn conversation that the client resends whole every turn "
        f"(streamed chat completions, max_tokens {setup['max_tokens']}, temperature 0, "
        + (
            "users concurrent"
            if setup["concurrent"]
            else "one request at a time, users interleaved turn by turn"
        )
        + f"). Every server runs {setup['threads']} threads on the default model.",
        "",
        "| server | TTFT p50 | TTFT p95 | TTFT p50, turns 2+ | decode tokens/s (p50) | end-to-end tokens/s | wall |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        rate = r["decode_tokens_per_s_p50"]
        lines.append(
            f"| {r['server']} | {_ms(r['ttft_p50_ms'])} | {_ms(r['ttft_p95_ms'])} | {_ms(r['ttft_p50_later_turns_ms'])} | "
            f"{rate:,.1f} | {r['end_to_end_tokens_per_s']:,.1f} | {r['wall_s']:,.1f} s |"
            if rate
            else f"| {r['server']} | {_ms(r['ttft_p50_ms'])} | {_ms(r['ttft_p95_ms'])} | {_ms(r['ttft_p50_later_turns_ms'])} | "
            f"- | {r['end_to_end_tokens_per_s']:,.1f} | {r['wall_s']:,.1f} s |"
        )
    by = {r["server"]: r for r in rows}
    baselines = [
        n
        for n in ("llama_cpp.server, cache on (LlamaRAMCache)", "llama_cpp.server, cache off")
        if n in by
    ]
    for ours in (r for r in rows if r["server"].startswith("promptcache")):
        lines.append("")
        for name in baselines:
            ratio = by[name]["ttft_p50_ms"] / ours["ttft_p50_ms"]
            target = " (target: at least 5x)" if "cache on" in name else ""
            lines.append(
                f"- p50 time to first token: {ours['server']} is **{ratio:,.1f}x** faster than {name}{target}."
            )
        if ours.get("cache"):
            c = ours["cache"]
            lines.append(
                f"- {ours['server']}: {c['tokens_reused']:,} of {c['prompt_tokens']:,} prompt tokens reused, "
                f"{c['tokens_evaluated']:,} evaluated; the cache holds {c['cache_bytes'] / 2**20:,.1f} MB."
            )
    lines += [
        "",
        "The default (exact) mode re-reads each reply, with the chat template's turn separator, as one batch right "
        "after sending it, so the next turn reuses both and a cached answer equals an uncached one bit for bit; "
        "`--no-exact` reuses the reply's KV as decoded, as llama_cpp.server and llama-server do. Either way each turn "
        "evaluates its new message (about 20 tokens here): that, not the restore, is the floor of time to first token.",
    ]
    lines += ["", "Commands (MODEL: promptcache.default_model_path(); port elided):", ""]
    for name, cmd in commands.items():
        shown = ["python"]
        for prev, arg in zip(cmd, cmd[1:]):
            if prev == "--model":
                shown.append("MODEL")
            elif arg != "--port" and prev != "--port":
                shown.append(arg)
        lines.append(f"- {name}: `{' '.join(shown)}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Smoke run: 2 users, 2 turns, a short prompt; writes nothing.",
    )
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--rules",
        type=int,
        default=20,
        help="Policy lines in the system prompt (20: about 1,000 tokens).",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--concurrent", action="store_true", help="Users talk at the same time instead of in turn."
    )
    parser.add_argument(
        "--servers",
        default="off,on,promptcache,fast",
        help="Which to run: off, on, promptcache, fast (--no-exact).",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="Print the section only; leave bench/results alone."
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.turns, args.max_tokens, args.rules = 2, 2, 8, 6
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as exc:
        print(
            f"llama_cpp.server cannot start ({exc}): pip install sse-starlette starlette-context",
            file=sys.stderr,
        )
        return 2
    import llama_cpp

    tokenizer = llama_cpp.Llama(str(default_model_path()), vocab_only=True, verbose=False)
    system = system_prompt(args.rules)
    setup = {
        "users": args.users,
        "turns": args.turns,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "concurrent": args.concurrent,
        "system_tokens": len(tokenizer.tokenize(system.encode(), add_bos=False)),
    }
    wanted = {
        "off": "llama_cpp.server, cache off",
        "on": "llama_cpp.server, cache on (LlamaRAMCache)",
        "promptcache": "promptcache serve",
        "fast": "promptcache serve --no-exact",
    }
    picks = {wanted[s.strip()] for s in args.servers.split(",") if s.strip() in wanted}
    rows, turns_all = [], []
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        commands = {n: c for n, c in server_commands(port, args.threads).items() if n in picks}
        for name, command in commands.items():
            print(f"--- {name}", file=sys.stderr, flush=True)
            server = Server(command, port, Path(tmp) / f"{len(rows)}.log")
            try:
                server.wait_ready()
                turns, wall = run_workload(
                    name,
                    server.url,
                    users=args.users,
                    turns=args.turns,
                    max_tokens=args.max_tokens,
                    system=system,
                    concurrent=args.concurrent,
                    tokenizer=tokenizer,
                )
                row = summarize(name, turns, wall)
                if name.startswith("promptcache"):
                    stats = httpx.get(f"{server.url}/v1/cache/stats", timeout=30).json()
                    row["cache"] = {**stats["tokens"], "cache_bytes": stats["cache"]["bytes"]}
            finally:
                server.stop()
            rows.append(row)
            turns_all += turns
            print(json.dumps(row), file=sys.stderr, flush=True)
    md = markdown(rows, setup, commands)
    print(md)
    if not (args.quick or args.no_write):
        write_section(
            "server", md, {"setup": setup, "summary": rows, "turns": [asdict(t) for t in turns_all]}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
