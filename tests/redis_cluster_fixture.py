"""A real 3-master Redis Cluster on free loopback ports, for the Redis tier's cluster tests.

Import the fixtures into a test module (`pytest_plugins = ["redis_fixture", "redis_cluster_fixture"]`):
`redis_cluster` is started once a session (about 2 s: three redis-server processes, `redis-cli
--cluster create` and its one-second wait for the nodes to meet), `redis_cluster_url` empties it for
each test, and `any_redis` runs a test on the single server, then on the cluster.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis_fixture import REDIS_SERVER, free_port

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
MASTERS = 3


class RedisClusterServers:
    """MASTERS redis-server processes in cluster mode, joined into one cluster (no replicas)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{port}" for port in self.ports]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: the cluster form CacheConfig's redis_url accepts."""
        return ",".join(self.urls)

    def start(self, timeout: float = 20.0) -> None:
        for i in range(MASTERS):
            node_dir = self.workdir / f"node{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            # Another process may take a port before redis-server binds it: start() fails then.
            # The bus port is given, not derived (port + 10000 may be taken or above 65535).
            port, bus_port = free_port(), free_port()
            self.procs.append(
                subprocess.Popen(
                    [
                        REDIS_SERVER,
                        *("--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "no"),
                        *("--cluster-enabled", "yes", "--cluster-port", str(bus_port)),
                        *("--cluster-config-file", "nodes.conf"),
                        *("--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no"),
                        *("--dir", str(node_dir)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            self.ports.append(port)
        deadline = time.monotonic() + timeout
        for port, proc in zip(self.ports, self.procs, strict=True):
            self._wait(lambda port=port: self.node(port).ping(), proc, deadline, "answer PING")
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        for port, proc in zip(self.ports, self.procs, strict=True):
            self._wait(
                lambda port=port: self._state_ok(port), proc, deadline, "reach cluster_state:ok"
            )

    def _state_ok(self, port: int) -> bool:
        with self.node(port) as node:
            return node.cluster("info").get("cluster_state") == "ok"

    def _wait(self, ready, proc: subprocess.Popen[bytes], deadline: float, what: str) -> None:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"a cluster node exited at start (port taken?); could not {what}"
                )
            try:
                if ready():
                    return
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not {what} in time")
            time.sleep(0.02)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (it answers only for the slots it serves)."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def client(self) -> RedisCluster:
        """A cluster client: commands go to the node that serves their key's slot."""
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in self.ports])


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> RedisClusterServers:
    """One cluster for the session (the tests of the contract, the Redis tier and the cluster)."""
    if not Path(REDIS_SERVER).exists() or not Path(REDIS_CLI).exists():
        pytest.fail("redis-server and redis-cli are not installed (apt-get install redis-server)")
    for _attempt in range(3):
        cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
        try:
            cluster.start()
            break
        except (RuntimeError, subprocess.SubprocessError):
            cluster.stop()
    else:
        pytest.fail("could not start a 3-master Redis Cluster on free loopback ports")
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServers) -> str:
    """One node's URL (the store discovers the others), the cluster emptied for this test."""
    for port in redis_cluster.ports:
        with redis_cluster.node(port) as node:
            node.flushall()
    return redis_cluster.urls[0]


@dataclass(frozen=True)
class RedisUnderTest:
    """One Redis a parametrized test runs on: `kind` "server" or "cluster", the URL a store is given,
    and a raw client of it (commands routed by slot on the cluster)."""

    kind: str
    url: str
    client: Callable[[], redis.Redis | RedisCluster]


@pytest.fixture(params=["server", "cluster"])
def any_redis(request: pytest.FixtureRequest) -> RedisUnderTest:
    """The session's redis-server, then the session's 3-master cluster, each emptied for this test."""
    if request.param == "server":
        server = request.getfixturevalue("redis_server")
        return RedisUnderTest("server", request.getfixturevalue("redis_url"), server.client)
    cluster = request.getfixturevalue("redis_cluster")
    return RedisUnderTest("cluster", request.getfixturevalue("redis_cluster_url"), cluster.client)
