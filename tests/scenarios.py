"""Reliability scenarios: real stores, Redis, the model and the server under faults, one verdict per run.

Owns the scenarios and their verdicts (shared by tests/test_reliability_*.py and scripts/reliability.py);
never injects a fault itself (tests/faults.py does) and never counts a wrong answer as anything but wrong.

A verdict is one of: "cache" (answered exactly from cache), "recompute" (a miss, answered by
recomputing), "error" (a clear PromptCacheError), "wrong" (an answer that differs from the uncached
one) or "crash" (any other exception, or a process that did not fail dying). Only the first three pass.
"""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from promptcache import FixedWidthCodec, PromptCache, PromptCacheError
from promptcache.store.disk import DiskStore
from promptcache.store.memory import MemoryStore
from promptcache.store.redis import RedisStore
from promptcache.store.tiered import TieredStore

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import faults  # noqa: E402
from server_process import ServerProcess, env_with_src  # noqa: E402
from synthetic import WIDTH, synthetic_state  # noqa: E402

log = logging.getLogger(__name__)

PASSING = ("cache", "recompute", "error")
FAILING = ("wrong", "crash")
GEN = 2  # greedy tokens compared per answer (the machines are small and shared)
FP = "reliability-fp"


def passed(tally: Counter[str]) -> bool:
    """Whether every run of a tally had a passing verdict."""
    return not any(tally[v] for v in FAILING) and sum(tally.values()) > 0


def sequences(seed: int, count: int, vocab: int = 50) -> list[list[int]]:
    """`count` token sequences (20 to 80 tokens) sharing a few prefixes, reproducible from `seed`."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(vocab) for _ in range(rng.randrange(8, 40))] for _ in range(3)]
    return [
        rng.choice(prefixes) + [rng.randrange(vocab) for _ in range(rng.randrange(4, 40))]
        for _ in range(count)
    ]


def judge_lookup(cache: PromptCache, tokens: list[int]) -> str:
    """The verdict of looking `tokens` (+ one more token) up: the hit must be the true state prefix."""
    prompt = [*tokens, 7]
    try:
        hit = cache.lookup(prompt, FP)
    except PromptCacheError:
        return "error"
    except Exception:
        log.exception("lookup crashed")
        return "crash"
    if hit is None or hit.tokens_reused == 0:
        return "recompute"
    if hit.state == synthetic_state(prompt[: hit.tokens_reused]):
        return "cache"
    log.error("WRONG: a hit of %d tokens is not the true state", hit.tokens_reused)
    return "wrong"


def judge_insert(cache: PromptCache, tokens: list[int]) -> str:
    try:
        cache.insert(tokens, synthetic_state(tokens), FP)
        return "cache"
    except PromptCacheError:
        return "error"
    except Exception:
        log.exception("insert crashed")
        return "crash"


def _cache(store: Any) -> PromptCache:
    return PromptCache(store, codec=FixedWidthCodec(WIDTH), shared=True)


# ------------------------------------------------------------------ 1. stored bytes damaged


def _redis_damage(url: str, rng: random.Random, namespace: str) -> str:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = [k for k in client.keys(f"{namespace}*") if client.type(k) == b"string"]
        if not keys:
            return "none"
        key = rng.choice(sorted(keys))
        kind, blob = faults.damage(client.get(key) or b"", rng)
        client.set(key, blob)
        return kind
    finally:
        client.close()


def corruption(
    tier: str, runs: int, workdir: Path, *, redis_url: str | None = None, seed: int = 0
) -> Counter[str]:
    """Fill a `tier` ("disk", "redis" or "tiered": RAM, disk, Redis), damage one stored thing
    (a random byte flipped or a random cut; on disk the sqlite index too), then look every
    sequence up from a fresh cache (another process's view). One verdict per lookup."""
    tally: Counter[str] = Counter()
    rng = random.Random(seed)
    for run in range(runs):
        root = workdir / f"{tier}-{run}"
        seqs = sequences(seed * 1000 + run, 6)

        def store(root: Path = root, run: int = run) -> Any:
            tiers: list[Any] = []
            if tier == "tiered":
                tiers.append(MemoryStore(1 << 20))
            if tier in ("disk", "tiered"):
                tiers.append(DiskStore(root, capacity_bytes=1 << 20))
            if tier in ("redis", "tiered"):
                assert redis_url is not None
                tiers.append(RedisStore(redis_url, 1 << 20, namespace=f"r{run}"))
            return tiers[0] if len(tiers) == 1 else TieredStore(tiers)

        writer = store()
        cache = _cache(writer)
        for s in seqs:
            cache.insert(s, synthetic_state(s), FP)
        writer.close()
        targets: list[Callable[[], str]] = []
        if tier in ("disk", "tiered"):
            for f in faults.files_under(root):
                targets.append(lambda f=f: faults.damage_file(f, rng))
        if tier in ("redis", "tiered"):
            targets.append(lambda run=run: _redis_damage(redis_url or "", rng, f"r{run}"))
        for _ in range(3):
            rng.choice(targets)()
        reader_store = store()
        reader = _cache(reader_store)
        for s in seqs:
            tally[judge_lookup(reader, s)] += 1
        tally["detected"] += int(reader_store.stats().get("corrupt", 0))
        # the damaged store keeps working: a new insert and its lookup are exact
        fresh = sequences(seed * 1000 + run + 500, 1)[0]
        verdict = judge_insert(reader, fresh)
        tally[verdict if verdict in FAILING else judge_lookup(_cache(reader_store), fresh)] += 1
        reader_store.close()
    return tally


# ------------------------------------------------------------------ 2. writers killed (-9) on one directory

WRITER = """
import sys, time
sys.path.insert(0, {here!r})
from scenarios import _cache, sequences, synthetic_state, FP
from promptcache.store.disk import DiskStore
store = DiskStore({root!r}, capacity_bytes={cap})
cache = _cache(store)
print("ready", flush=True)
for i in range(100000):
    for s in sequences({seed} + i, 4):
        cache.insert(s, synthetic_state(s), FP)
        cache.lookup(s + [1], FP)
    print(i, flush=True)  # round i is written: the reader looks up the last ones
"""


def killed_writers(runs: int, workdir: Path, *, writers: int = 3, seed: int = 0) -> Counter[str]:
    """`writers` processes insert into one disk directory (small capacity, so they evict each
    other's entries too) and are killed with SIGKILL at random points; a fresh reader then looks up
    everything they may have written, and the directory's gc() and capacity still hold."""
    tally: Counter[str] = Counter()
    rng = random.Random(seed)
    cap = 256 << 10
    for run in range(runs):
        root = workdir / f"kill-{run}"
        procs = []
        for w in range(writers):
            code = WRITER.format(
                here=str(HERE), root=str(root), cap=cap, seed=(run * 10 + w) * 100000
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env_with_src(),
                )
            )
        for p in procs:
            p.stdout.readline()  # "ready": the store is open; kill inside the write loop
        time.sleep(rng.uniform(0.05, 1.0))
        for p in procs:
            time.sleep(rng.uniform(0, 0.1))
            p.send_signal(signal.SIGKILL)
        done = []  # the last round each writer finished (its later entries evicted the first ones)
        for p in procs:
            p.wait()
            if p.returncode != -signal.SIGKILL:  # a writer died on its own before the kill
                log.error("writer exited %s: %s", p.returncode, p.stderr.read().decode()[-2000:])
                tally["crash"] += 1
            rounds = [int(x) for x in p.stdout.read().decode().split() if x.isdigit()]
            done.append(rounds[-1] if rounds else -1)
            p.stdout.close()
            p.stderr.close()
        store = DiskStore(root, capacity_bytes=cap)
        reader = _cache(store)
        for w in range(writers):
            for i in range(max(0, done[w] - 1), done[w] + 2):  # the last two and the one cut short
                for s in sequences((run * 10 + w) * 100000 + i, 4):
                    tally[judge_lookup(reader, s)] += 1
        try:
            store.gc()
            if store.size() > cap:
                log.error("disk store holds %d bytes over its capacity %d", store.size(), cap)
                tally["wrong"] += 1
        except PromptCacheError:
            tally["error"] += 1
        store.close()
    return tally


# ------------------------------------------------------------------ 3. disk full, read-only, unreadable files


def disk_faults(runs: int, workdir: Path, *, seed: int = 0) -> Counter[str]:
    """A disk cache on a 2 MiB tmpfs with a 16 MiB capacity: inserts run the disk full, the
    temp directory becomes a file for 40 inserts (ENOTDIR on every write), entry files are replaced by directories (EISDIR) or
    removed (ENOENT); every insert must succeed or fail clearly, every lookup be exact or a miss."""
    tally: Counter[str] = Counter()
    rng = random.Random(seed)
    for run in range(runs):
        with faults.small_fs(workdir / f"full-{run}", 2 << 20) as mnt:
            store = DiskStore(mnt / "kv", capacity_bytes=16 << 20)
            cache = _cache(store)
            seqs = sequences(seed * 1000 + run, 200, vocab=5000)
            tmp = mnt / "kv" / "tmp"
            for i, s in enumerate(seqs):
                if i == 120:  # writes fail with ENOTDIR until i == 160 (an unwritable directory)
                    tmp.rmdir()
                    tmp.write_bytes(b"")
                if i == 160:
                    tmp.unlink()
                    tmp.mkdir()
                tally[judge_insert(cache, s)] += 1
            entries = faults.files_under(mnt / "kv" / "entries")
            for f in rng.sample(entries, min(5, len(entries))):
                f.unlink()
                if rng.random() < 0.5:
                    f.mkdir()
            fresh = _cache(store)
            for s in seqs:
                tally[judge_lookup(fresh, s)] += 1
            store.close()
    return tally


# ------------------------------------------------------------------ 4. Redis killed, restarted, slow, flushed


def redis_chaos(
    ops: int, redis_server: Any, *, seed: int = 0
) -> tuple[Counter[str], dict[str, float]]:
    """A writer and a reader (two caches, as two processes) on one Redis reached through a TCP
    proxy, faults and calm in turn, ten operations each: 300 ms delay, 20 % dropped chunks, all
    connections cut, redis-server stopped (restarted when calm returns), FLUSHALL. Returns the verdicts and the
    slowest operation (no operation may hang past the socket timeouts)."""
    tally: Counter[str] = Counter()
    rng = random.Random(seed)
    proxy = faults.TcpProxy(redis_server.port, seed=seed)
    events: Counter[str] = Counter()
    slowest = 0.0
    try:
        opts = {
            "socket_timeout": 0.5,
            "connect_timeout": 0.2,
            "retry_after": 0.2,
            "max_retry_after": 1.0,
        }
        writer = _cache(RedisStore(proxy.url, 4 << 20, namespace="chaos", **opts))
        reader = _cache(RedisStore(proxy.url, 4 << 20, namespace="chaos", **opts))
        seqs = sequences(seed, 40, vocab=1000)
        for op in range(ops):
            if (
                op % 20 == 10
            ):  # heal: ten calm operations after each fault, past the client's backoff
                proxy.delay, proxy.drop = 0.0, 0.0
                if redis_server.proc is None:
                    redis_server.start()
                time.sleep(1.1)
            if op % 20 == 0:
                event = rng.choice(["delay", "drop", "cut", "stop", "flush"])
                events[event] += 1
                if event == "delay":
                    proxy.delay = 0.3
                elif event == "drop":
                    proxy.drop = 0.2
                elif event == "cut":
                    proxy.cut_all()
                elif event == "stop":
                    redis_server.stop()
                elif event == "flush":
                    with redis_server.client() as c:
                        c.flushall()
            s = rng.choice(seqs)
            t0 = time.monotonic()
            if (
                op % 2 == 0
            ):  # the writer does what an engine does: look up, then cache what it computed
                verdict = judge_lookup(writer, s)
                verdict = verdict if verdict in FAILING else judge_insert(writer, s)
            else:
                verdict = judge_lookup(reader, s)
            slowest = max(slowest, time.monotonic() - t0)
            if op % 2:
                tally[verdict] += 1
            elif verdict in FAILING:
                tally[verdict] += 1
    finally:
        proxy.close()
        if redis_server.proc is None:
            redis_server.start()
    return tally, {
        "slowest_op_s": round(slowest, 3),
        **{f"event_{k}": v for k, v in events.items()},
    }


# ------------------------------------------------------------------ 5. the real model over damaged tiers, sessions

PROMPTS = [
    "The capital of France is",
    "The capital of France is a city where",
    "List three colours: red,",
    "Once upon a time, in a small village by the sea,",
]


class Oracle:
    """Uncached greedy answers and logits of the real default model: what every verdict compares to.
    `text`: LLM's greedy decoding, which every server answers whatever its --parallel."""

    def __init__(self, n_ctx: int = 512) -> None:
        from promptcache import LLM

        self.llm = LLM(n_ctx=n_ctx, cache=None)
        self.logits: dict[str, np.ndarray] = {}
        self.tokens: dict[str, list[int]] = {}
        self.text: dict[str, str] = {}
        for p in PROMPTS:
            self.add(p)

    def add(self, prompt: str) -> None:
        """Compute the uncached answer of one more prompt."""
        if prompt not in self.logits:
            self.llm.kv_cache_clear()
            self.logits[prompt] = self.llm.logits(prompt)
            done = self.llm.complete(prompt, max_tokens=GEN, temperature=0)
            self.tokens[prompt], self.text[prompt] = done.tokens, done.text


def judge_llm(llm: Any, oracle: Oracle, prompt: str) -> str:
    """Logits and GEN greedy tokens of `prompt` against the uncached oracle."""
    try:
        llm.kv_cache_clear()
        logits = llm.logits(prompt)
        reused = llm.last_stats.tokens_reused
        llm.kv_cache_clear()
        tokens = llm.complete(prompt, max_tokens=GEN, temperature=0).tokens
    except PromptCacheError:
        return "error"
    except Exception:
        log.exception("LLM call crashed")
        return "crash"
    if not np.array_equal(logits, oracle.logits[prompt]) or tokens != oracle.tokens[prompt]:
        log.error("WRONG answer for %r (reused %d tokens)", prompt, reused)
        return "wrong"
    return "cache" if reused else "recompute"


def llm_corruption(
    llm: Any,
    oracle: Oracle,
    tier: str,
    runs: int,
    workdir: Path,
    *,
    redis_url: str | None = None,
    seed: int = 0,
) -> Counter[str]:
    """The real model's states in a disk, Redis or tiered cache, one stored byte flipped or a value
    cut per run, then every prompt answered through a fresh cache: exact or recomputed."""
    tally: Counter[str] = Counter()
    rng = random.Random(seed)
    for run in range(runs):
        root = workdir / f"llm-{tier}-{run}"

        def store(root: Path = root, run: int = run) -> Any:
            tiers: list[Any] = []
            if tier in ("disk", "tiered"):
                tiers.append(DiskStore(root, capacity_bytes=256 << 20))
            if tier in ("redis", "tiered"):
                tiers.append(RedisStore(redis_url or "", 256 << 20, namespace=f"llm{run}"))
            return tiers[0] if len(tiers) == 1 else TieredStore(tiers)

        llm.cache = PromptCache(store(), shared=True)
        for p in PROMPTS:
            llm.kv_cache_clear()
            llm.logits(p)
        llm.cache.store.close()
        targets: list[Callable[[], str]] = []
        if tier in ("disk", "tiered"):
            targets += [
                lambda f=f: faults.damage_file(f, rng) for f in faults.files_under(root / "entries")
            ]
        if tier in ("redis", "tiered"):
            targets.append(lambda run=run: _redis_damage(redis_url or "", rng, f"llm{run}"))
        rng.choice(targets)()
        llm.cache = PromptCache(store(), shared=True)
        for p in PROMPTS:
            tally[judge_llm(llm, oracle, p)] += 1
        llm.cache.store.close()
    llm.cache = None
    return tally


def llm_disk_full(llm: Any, oracle: Oracle, runs: int, workdir: Path) -> Counter[str]:
    """The real model caching on a 1 MiB tmpfs (a state is about 23 KB a token): every answer is
    the uncached one, whether its state could be stored or the disk was full."""
    tally: Counter[str] = Counter()
    for run in range(runs):
        with faults.small_fs(workdir / f"llm-full-{run}", 1 << 20) as mnt:
            store = DiskStore(mnt / "kv", capacity_bytes=64 << 20)
            llm.cache = PromptCache(store, shared=True)
            for p in PROMPTS:
                tally[judge_llm(llm, oracle, p)] += 1
            store.close()
    llm.cache = None
    return tally


# Long enough (> 256 tokens, > 1 MiB of state) that its insert also writes the whole state
# (PersistedMerges) and a fresh process reads it as a mapped view (DiskStore.get_view).
LONG_PROMPT = "Northwind depot inventory. " + " ".join(
    f"Shelf {i} holds {n} {item}, checked on day {i % 28 + 1}."
    for i, (n, item) in enumerate(
        zip(range(3, 200, 7), ["tents", "boots", "stoves", "ropes", "lamps", "maps"] * 5)
    )
)


def llm_long_state_corruption(
    llm: Any, oracle: Oracle, runs: int, workdir: Path, *, seed: int = 0
) -> Counter[str]:
    """A long prompt cached on disk, then one of its large entry files (the whole state or a
    segment, each read through a memory map by a fresh cache) flipped or cut; the prompt is then
    answered through a fresh cache, as a new process would: exact, or recomputed."""
    tally: Counter[str] = Counter()
    rng = random.Random(seed)
    oracle.add(LONG_PROMPT)
    for run in range(runs):
        root = workdir / f"llm-long-{run}"
        llm.cache = PromptCache(DiskStore(root, capacity_bytes=512 << 20), shared=True)
        llm.kv_cache_clear()
        llm.logits(LONG_PROMPT)
        assert llm.cache.stats()["wholes_written"] >= 1, "the long prompt wrote no whole state"
        llm.cache.store.close()
        big = [f for f in faults.files_under(root / "entries") if f.stat().st_size >= 1 << 20]
        faults.damage_file(rng.choice(big), rng)
        llm.cache = PromptCache(DiskStore(root, capacity_bytes=512 << 20), shared=True)
        tally[judge_llm(llm, oracle, LONG_PROMPT)] += 1
        llm.cache.store.close()
    llm.cache = None
    return tally


def session_corruption(llm: Any, oracle: Oracle, runs: int, *, seed: int = 0) -> Counter[str]:
    """A saved session with one byte flipped (offsets spread over the whole blob) or cut at a random
    length: loading it raises a clear error, or (never expected) continues exactly."""
    tally: Counter[str] = Counter()
    rng = random.Random(seed)
    prompt = PROMPTS[3]
    llm.kv_cache_clear()
    llm.logits(prompt)
    blob = llm.session_bytes()
    for run in range(runs):
        if run % 2 == 0:
            damaged = faults.flip_byte(blob, rng, at=(run * len(blob)) // runs)
        else:
            damaged = faults.truncate(blob, rng)
        llm.kv_cache_clear()
        try:
            llm.load_session_bytes(damaged)
        except PromptCacheError:
            tally["error"] += 1
            continue
        except Exception:
            log.exception("load_session_bytes crashed")
            tally["crash"] += 1
            continue
        tally[judge_llm(llm, oracle, prompt)] += 1
    llm.kv_cache_clear()
    llm.load_session_bytes(blob)  # the undamaged blob still loads
    return tally


def run_with_timeout(fn: Callable[[], Any], seconds: float) -> Any:
    """fn() in a thread; raises TimeoutError when it has not returned after `seconds`."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"still running after {seconds} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ------------------------------------------------------------------ 6. the server, as a process on loopback


def server_answer(url: str, prompt: str, key: str, max_tokens: int = GEN) -> tuple[str, int]:
    """Greedy completion text of `prompt` and its cached prompt tokens, through the openai client."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)
    out = client.completions.create(
        model="default", prompt=prompt, max_tokens=max_tokens, temperature=0
    )
    details = out.usage.prompt_tokens_details
    return out.choices[0].text, int(getattr(details, "cached_tokens", 0) or 0)


def judge_server(url: str, oracle: Oracle, prompt: str, key: str) -> str:
    """The server's answer against the uncached oracle's greedy text (decoded as the server does)."""
    try:
        text, cached = server_answer(url, prompt, key)
    except Exception:
        log.exception("server request failed")
        return "crash"
    if text != oracle.text[prompt]:
        log.error("WRONG server answer for %r: %r", prompt, text)
        return "wrong"
    return "cache" if cached else "recompute"


def server_killed_mid_stream(
    runs: int, workdir: Path, oracle: Oracle, *, key: str = "k", seed: int = 0, parallel: int = 1
) -> Counter[str]:
    """A disk-cached server killed (SIGKILL) at a random point of a streamed answer or while it
    caches, restarted on the same cache directory: every prompt answered exactly (from the cache
    the dead server left) or recomputed. With parallel > 1 the server batches (--parallel) and
    `parallel` streams are live when it dies."""
    import httpx

    tally: Counter[str] = Counter()
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    flags = (
        "--workers",
        "1",
        "--n-ctx",
        "512",
        "--api-key",
        key,
        "--cache",
        "disk",
        "--cache-dir",
        str(workdir / "kv"),
        "--session-dir",
        str(workdir / "sessions"),
        "--log-level",
        "warning",
        "--parallel",
        str(parallel),
    )
    server = ServerProcess(workdir / "server.log", *flags)
    try:
        server.wait_ready()
        for _run in range(runs):
            body = {
                "model": "default",
                "max_tokens": 16 * parallel,  # the first stream still runs when the last opens
                "temperature": 0,
                "stream": True,
            }
            cut = rng.randrange(0, 6)
            with ExitStack() as streams:
                for _ in range(parallel):
                    r = streams.enter_context(
                        httpx.stream(
                            "POST",
                            f"{server.url}/v1/completions",
                            json={**body, "prompt": rng.choice(PROMPTS)},
                            headers={"Authorization": f"Bearer {key}"},
                            timeout=300,
                        )
                    )
                    lines = r.iter_lines()
                    for i, _line in enumerate(lines):
                        if i >= cut:
                            break
                time.sleep(rng.uniform(0, 0.3))  # sometimes mid-generation, sometimes while caching
                server.kill()
            server = ServerProcess(workdir / "server.log", *flags, port=server.port)
            server.wait_ready()
            for p in PROMPTS:
                tally[judge_server(server.url, oracle, p, key)] += 1
    finally:
        server.stop()
    return tally
