"""Shared plumbing of the benchmarks: medians, machine facts, and assembling BENCHMARKS.md from sections.

Each benchmark writes bench/results/<name>.md (and .json); BENCHMARKS.md is their concatenation.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ORDER = [
    "index",
    "prefix",
    "exactness",
    "server",
    "fleet",
    "fleet_document",
    "tiers",
    "artefacts",
    "smc",
]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_section(name: str, markdown: str, data: dict, *, stamp: bool = True) -> None:
    """Save one benchmark's section and rebuild BENCHMARKS.md from every section present. With
    stamp=False the markdown carries its own "Measured" lines (a section made of several runs)."""
    RESULTS.mkdir(exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    tail = f"\n\n_Measured {when} on {machine()}._" if stamp else ""
    (RESULTS / f"{name}.md").write_text(f"{markdown.rstrip()}{tail}\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    rebuild()


def rebuild() -> None:
    """BENCHMARKS.md as the concatenation of every section in bench/results (no benchmark runs)."""
    parts = [
        "# promptcache benchmarks\n",
        "Every figure below was measured by the script named in its section; rerun it to refresh.\n",
    ]
    names = ORDER + sorted(p.stem for p in RESULTS.glob("*.md") if p.stem not in ORDER)
    for n in names:
        path = RESULTS / f"{n}.md"
        if path.exists():
            parts.append(path.read_text())
    (HERE.parent / "BENCHMARKS.md").write_text("\n".join(parts))


if __name__ == "__main__":  # python bench/common.py: rebuild BENCHMARKS.md from the saved sections
    rebuild()
