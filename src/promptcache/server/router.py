"""vllm-router in front of several promptcache servers: its command line for a fleet.

Owns the flags a fleet needs (policy, each server's KV-event and replay sockets, block size, health
checks, the router's own metrics port); never starts a process itself (the README's commands, the
tests and bench/fleet_bench.py do). Measured against vllm-router 0.1.17 (README, "A fleet").
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

POLICIES = (
    "round_robin",
    "cache_aware",
    "kv_aware",
    "consistent_hash",
    "random",
    "power_of_two",
    "sticky_least_loaded",
)


@dataclass(frozen=True)
class Worker:
    """One server as the router sees it: its URL, and (for kv_aware) where its KV events and their
    replay are published (`promptcache serve --kv-events tcp://*:5557 --kv-events-replay ...`)."""

    url: str
    events: str | None = None
    replay: str | None = None


def router_command(
    workers: list[Worker],
    *,
    policy: str = "kv_aware",
    host: str = "127.0.0.1",
    port: int = 30000,
    prometheus_port: int = 29000,
    block_size: int = 16,
    model: str = "default",
    health_check_secs: int | None = None,
    api_key: str | None = None,
    binary: str | None = None,
) -> list[str]:
    """The vllm-router command routing to `workers` by `policy`. kv_aware subscribes to each
    worker's events (every worker needs `events`); `block_size` must equal the servers'
    --kv-events-block-size. health_check_secs: seconds between health checks (the router's default
    is 60; tests pass 1). Raises ValueError for an unknown policy or a kv_aware worker without
    events, FileNotFoundError when no vllm-router is installed (pip install vllm-router==0.1.17)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
    exe = binary or shutil.which("vllm-router")
    if exe is None:
        raise FileNotFoundError("vllm-router is not installed: pip install vllm-router==0.1.17")
    cmd = [exe, "--worker-urls", *(w.url for w in workers), "--policy", policy]
    cmd += ["--host", host, "--port", str(port), "--prometheus-port", str(prometheus_port)]
    if policy == "kv_aware":
        missing = [w.url for w in workers if not w.events]
        if missing:
            raise ValueError(f"kv_aware needs every worker's KV events; none for {missing}")
        for w in workers:
            cmd += ["--kv-event-source", f"{w.url}={w.events}"]
            if w.replay:
                cmd += ["--kv-event-replay-source", f"{w.url}={w.replay}"]
        cmd += ["--kv-event-block-size", str(block_size), "--kv-event-model", model]
    if health_check_secs is not None:
        cmd += ["--health-check-interval-secs", str(health_check_secs)]
        cmd += ["--health-failure-threshold", "1", "--health-success-threshold", "1"]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd


__all__ = ["POLICIES", "Worker", "router_command"]
