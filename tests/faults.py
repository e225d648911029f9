"""Fault injectors on real components: a TCP proxy that delays and drops, a small filesystem, byte damage.

Owns the faults only; never judges an answer (tests/scenarios.py does) and never mocks what it breaks.
"""

from __future__ import annotations

import os
import random
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class TcpProxy:
    """A loopback TCP proxy in front of `target_port`; set `delay` (seconds added to every chunk
    forwarded) and `drop` (probability that a chunk closes both ends instead) while it runs."""

    def __init__(self, target_port: int, *, seed: int = 0) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.drop = 0.0
        self.dropped = 0
        self._rng = random.Random(seed)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=1)
            except OSError:
                client.close()  # the target is down: the client sees a reset, as it would without us
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for s in ready:
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    with self._lock:
                        drop = self._rng.random() < self.drop
                    if drop:
                        self.dropped += 1
                        return
                    if self.delay:
                        time.sleep(self.delay)
                    peers[s].sendall(chunk)
        except OSError:
            return
        finally:
            for s in (a, b):
                with self._lock:
                    self._conns.discard(s)
                try:
                    s.close()
                except OSError:
                    pass

    def cut_all(self) -> None:
        """Close every open connection now (a network blip)."""
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self.cut_all()
        self._listener.close()
        self._thread.join(timeout=2)


def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root in a container with CAP_SYS_ADMIN)."""
    probe = Path(f"/tmp/promptcache-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                capture_output=True,
            ).returncode
            == 0
        )
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    finally:
        probe.rmdir()


@contextmanager
def small_fs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` mounted at `path` (created), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    """Remount the tmpfs at `path` read-only ("ro") or read-write ("rw"): writes then fail with EROFS."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def flip_byte(blob: bytes, rng: random.Random, at: int | None = None) -> bytes:
    """`blob` with one byte XORed by a random non-zero mask (at `at`, else a random offset)."""
    i = rng.randrange(len(blob)) if at is None else at
    return blob[:i] + bytes([blob[i] ^ rng.randrange(1, 256)]) + blob[i + 1 :]


def truncate(blob: bytes, rng: random.Random) -> bytes:
    """`blob` cut at a random length shorter than it (possibly empty)."""
    return blob[: rng.randrange(len(blob))]


def damage(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random kind of damage: ("flip", ...) or ("truncate", ...)."""
    if blob and rng.random() < 0.5:
        return "flip", flip_byte(blob, rng)
    return "truncate", truncate(blob, rng) if blob else blob


def damage_file(path: Path, rng: random.Random) -> str:
    """Damage the file at `path` in place; returns the kind of damage."""
    kind, blob = damage(path.read_bytes(), rng)
    path.write_bytes(blob)
    return kind


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())
