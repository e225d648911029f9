"""The server as a test drives it: `python -m promptcache.server` on a free loopback port (and any
other HTTP service a test starts beside it, such as a router).

Owns starting, waiting for and stopping server processes; never sends a request but /health.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parent.parent / "src"


def env_with_src() -> dict[str, str]:
    """This process' environment with this checkout's src first on PYTHONPATH (for child processes)."""
    return {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChildProcess:
    """An HTTP service run as `command` that answers on `port` of the loopback, its output in
    `log_path`; ready once its /health answers 200."""

    def __init__(self, command: list[str], log_path: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_path
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**env_with_src(), "PYTHONUNBUFFERED": "1"},
            )

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Return once /health answers 200. Raises RuntimeError (with the log's tail) when the
        process exits or `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited {self.proc.returncode}: {self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s: {self.log.read_text()[-3000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 60 s; the exit code."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class ServerProcess(ChildProcess):
    """`python -m promptcache.server` on a free loopback port (or `port`), its output in `log_path`."""

    def __init__(self, log_path: Path, *flags: str, port: int | None = None) -> None:
        port = port or free_port()
        self.flags = flags
        command = [sys.executable, "-m", "promptcache.server", "--port", str(port), *flags]
        super().__init__(command, log_path, port)


@contextmanager
def serving(servers: dict[str, ServerProcess]) -> Iterator[dict[str, ServerProcess]]:
    """Wait until every server (started together, so they load in parallel) is ready; stop them all
    on the way out, whatever happened (their exit codes are then in `.proc.returncode`)."""
    try:
        for s in servers.values():
            s.wait_ready()
        yield servers
    finally:
        for s in servers.values():
            s.stop()


def cached_and_uncached(tmp: Path, *flags: str) -> dict[str, ServerProcess]:
    """Two servers with `flags`: `cached` on a RAM prefix cache and `none` with `--cache none` (the
    uncached oracle, every prompt evaluated whole). Logs in `tmp`."""
    quiet = ("--log-level", "warning", *flags)
    return {
        "cached": ServerProcess(tmp / "cached.log", "--cache", "ram", *quiet),
        "none": ServerProcess(tmp / "none.log", "--cache", "none", *quiet),
    }
