"""How the Redis tier spreads over a Redis Cluster, and what its accounting costs: a 3-master cluster
and one redis-server on loopback, N entries put then read through RedisStore. Prints, per master, the
values' share of the bytes and the commands it served, the accounting node's bytes, the server time
of the accounting scripts per put, and put/get latency on one server and on the cluster.

    python bench/redis_cluster_bench.py [--entries 600] [--kb 16]

Needs redis-server and redis-cli on PATH (started here on free loopback ports, without persistence).
Writes nothing: the figures it prints are quoted in src/promptcache/store/redis_ledger.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the test fixtures start the servers

from redis_cluster_fixture import RedisClusterServers  # noqa: E402
from redis_fixture import RedisServer  # noqa: E402

from promptcache.store.redis import RedisStore  # noqa: E402

NS = "bench"


def load(node) -> dict[str, float]:
    """What one node has done so far: network bytes in and out, CPU seconds, script microseconds
    (INFO counts the commands a script runs under its own names, so commands are not counted)."""
    stats, cpu = node.info("stats"), node.info("cpu")
    scripts = node.info("commandstats")
    return {
        "net": stats["total_net_input_bytes"] + stats["total_net_output_bytes"],
        "cpu": cpu["used_cpu_user"] + cpu["used_cpu_sys"],
        "script_usec": sum(r["usec"] for n, r in scripts.items() if n.startswith("cmdstat_eval")),
    }


def timed(store: RedisStore, entries: int, value: bytes) -> tuple[float, float]:
    """Median put and get milliseconds over `entries` keys."""
    puts, gets = [], []
    for i in range(entries):
        t = time.perf_counter()
        store.put(f"segment-{i}", value, fingerprint="fp")
        puts.append(time.perf_counter() - t)
    for i in range(entries):
        t = time.perf_counter()
        assert store.get(f"segment-{i}", fingerprint="fp") == value
        gets.append(time.perf_counter() - t)
    return statistics.median(puts) * 1e3, statistics.median(gets) * 1e3


def spread(cluster: RedisClusterServers, entries: int, value: bytes) -> None:
    nodes = {port: cluster.node(port) for port in cluster.ports}
    before = {port: load(n) for port, n in nodes.items()}
    store = RedisStore(cluster.urls[0], 1 << 40, namespace=NS)
    put_ms, get_ms = timed(store, entries, value)
    work = {p: {k: v - before[p][k] for k, v in load(n).items()} for p, n in nodes.items()}
    rows, total_values = [], 0
    for port, node in nodes.items():
        values = list(node.scan_iter(match=f"{NS}:v:*", count=1000))
        value_bytes = sum(node.strlen(k) for k in values)
        meta = list(node.scan_iter(match=f"{NS}:{{{NS}}}:*"))
        meta_bytes = sum(int(node.memory_usage(k) or 0) for k in meta)
        rows.append((port, len(values), value_bytes, len(meta), meta_bytes))
        total_values += value_bytes
    net = sum(w["net"] for w in work.values())
    cpu = sum(w["cpu"] for w in work.values())
    print(f"{entries} entries of {len(value) // 1024} KB put then read, 3 masters, one client:")
    print("master   values  share  meta keys  meta bytes  network  CPU   script ms/put")
    for port, n, vb, nm, mb in rows:
        w = work[port]
        print(
            f"{port:>6} {n:>8} {vb / total_values:6.1%} {nm:>10} {mb:>11} "
            f"{w['net'] / net:7.1%} {w['cpu'] / cpu:6.1%} {w['script_usec'] / 1e3 / entries:8.4f}"
        )
    meta_bytes = sum(r[4] for r in rows)
    print(
        f"accounting: {meta_bytes} bytes, {meta_bytes / entries:.0f} a entry, "
        f"{meta_bytes / (meta_bytes + total_values):.2%} of the bytes; "
        f"cluster put {put_ms:.2f} ms, get {get_ms:.2f} ms (medians)"
    )
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=600)
    parser.add_argument("--kb", type=int, default=16)
    args = parser.parse_args()
    value = bytes(range(256)) * (args.kb * 4)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = RedisClusterServers(Path(tmp) / "cluster")
        server = RedisServer(Path(tmp))
        try:
            cluster.start()
            server.start()
            spread(cluster, args.entries, value)
            single = RedisStore(server.url, 1 << 40, namespace=NS)
            put_ms, get_ms = timed(single, args.entries, value)
            print(f"one redis-server: put {put_ms:.2f} ms, get {get_ms:.2f} ms (medians)")
        finally:
            cluster.stop()
            server.stop()


if __name__ == "__main__":
    main()
