"""A real redis-server on a free loopback port, for the tests of the Redis tier.

Import the fixtures into a test module (`from redis_fixture import redis_server, redis_url`);
tests that stop and restart Redis take `own_redis`, a server of their own.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process without persistence; stop() and start() keep its port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            raise RuntimeError("redis-server is already running")
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    self.proc = None
                    raise RuntimeError(f"redis-server exited at start (port {self.port} taken?)")
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING on port {self.port}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)


def _started(workdir: Path) -> RedisServer:
    for _attempt in range(3):  # another process may take the free port before redis-server binds it
        server = RedisServer(workdir)
        try:
            server.start()
            return server
        except RuntimeError:
            continue
    pytest.fail("could not start redis-server on a free loopback port")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> RedisServer:
    if not Path(REDIS_SERVER).exists():
        pytest.fail(
            "redis-server is not installed (apt-get install redis-server; see scripts/test.sh)"
        )
    server = _started(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied for this test."""
    if redis_server.proc is None:
        redis_server.start()
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def own_redis(tmp_path: Path) -> RedisServer:
    """A server of this test's own, free to stop and restart."""
    server = _started(tmp_path)
    yield server
    server.stop()
