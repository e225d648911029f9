"""Lint as CI enforces it: the pinned ruff, with pyproject.toml's [tool.ruff], over src, tests, bench
and scripts, and its formatter's verdict (`ruff format --check`).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINTED = ("src", "tests", "bench", "scripts")


def _ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ruff_is_the_version_the_test_extra_pins() -> None:
    """Another ruff release may add or change rules: the verdict below is the pinned one's."""
    pin = re.search(r'"ruff==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml's test extra must pin ruff (ruff==X.Y.Z)"
    assert _ruff("--version").stdout.split() == ["ruff", pin.group(1)]


def test_ruff_check_is_clean() -> None:
    done = _ruff("check", *LINTED)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_ruff_format_is_clean() -> None:
    done = _ruff("format", "--check", *LINTED)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_ruff_check_flags_what_the_project_forbids() -> None:
    """The clean verdict above is not vacuous: with the same settings, ruff flags an unused import
    and an unpickling (invariant 6) in a file under src."""
    done = _ruff(
        "check",
        "--stdin-filename",
        "src/promptcache/lint_probe.py",
        "-",
        stdin="import os\nimport pickle\n\npickle.loads(b'')\n",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "F401" in done.stdout and "S301" in done.stdout, done.stdout
