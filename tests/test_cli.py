"""The front door: `promptcache demo` runs the real model end to end, as the README's first command does."""

from __future__ import annotations

import os
import subprocess
import sys


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
