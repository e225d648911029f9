"""The front door: `promptcache demo` runs the real model end to end, as the README's first command does,
and `promptcache serve` starts the server with the README's flags."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def test_demo_runs_and_hits_the_cache_in_a_fresh_process(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "promptcache.cli",
            "demo",
            "--max-tokens",
            "4",
            "--cache-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {
        line.split("│")[1].strip(): line
        for line in proc.stdout.splitlines()
        if line.count("│") >= 7
    }
    assert set(rows) >= {"cold", "live/RAM", "disk tier", "new process"}
    cells = [c.strip() for c in rows["new process"].split("│")]
    assert cells[5] == "disk"
    reused = int(cells[4])
    assert reused > 1000  # the second process restored the shared system prompt from disk
    assert not proc.stderr.strip()  # the library writes nothing to stderr unasked


def test_serve_starts_the_server_with_the_readme_flags(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "promptcache.cli", "serve", "--no-exact", "--port", str(port)]
            + ["--max-tokens", "8", "--cache", "none", "--log-level", "warning"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
        body = {"prompt": "Hello", "max_tokens": 9}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text  # --max-tokens 8 reached the server
        assert r.json()["error"]["param"] == "max_tokens"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
