"""llama-cpp-python's caching examples (seed 000), run unchanged but for their import line, in fresh processes.

The scripts in tests/seed000/ are the seed's text byte for byte except: the import from llama_cpp
becomes one from promptcache.compat; the hard-coded model path becomes MODEL_PATH, the default
model; and custom_cache.py imports Optional and Tuple, which the seed uses without importing.
A runner executes a script with runpy and records, without touching the script, the n_tokens of
every state a Llama restored from its cache (Llama.load_state), then reports as JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promptcache.model import default_model_path

SEED = Path(__file__).parent / "seed000"
RUNNER = r"""
import json, runpy, sys
from pathlib import Path
import llama_cpp
import promptcache.model
if len(sys.argv) > 3:  # another model file in place of the default one
    promptcache.model.default_model_path = lambda: Path(sys.argv[3])
loads = []
real = llama_cpp.Llama.load_state
def load_state(self, state):
    loads.append(int(state.n_tokens))
    real(self, state)
llama_cpp.Llama.load_state = load_state
g = runpy.run_path(sys.argv[1], run_name="__main__")
report = {"loads": loads}
g["report"] = report
exec(sys.argv[2], g)
print("@@REPORT@@" + json.dumps(report))
"""


def run_example(
    name: str, cwd: Path, then: str = "", model: Path | None = None
) -> tuple[dict, str]:
    """Run tests/seed000/<name> in a new process in `cwd`; (report, stdout). Fails on any exception."""
    args = [sys.executable, "-c", RUNNER, str(SEED / name), then]
    if model is not None:
        args.append(str(model))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    report = json.loads(out.stdout.split("@@REPORT@@")[1])
    return report, out.stdout


def n_prompt_tokens(text: str) -> str:
    return f"report['n_prompt'] = len(llm.tokenize({text!r}.encode()))"


def modified_copy(tmp_path: Path) -> Path:
    """The default GGUF with one byte changed mid-file (tensor data): same shape, another model."""
    copy = tmp_path / "finetune.gguf"
    shutil.copyfile(default_model_path(), copy)
    with open(copy, "r+b") as f:
        f.seek(copy.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    return copy


def test_persistent_disk_cache_hits_after_a_restart_and_never_serves_another_model(
    tmp_path: Path,
) -> None:
    then = n_prompt_tokens("Write a fact about number 0:")
    first, stdout = run_example("persistent_disk_caching.py", tmp_path, then)
    assert "Disk cache contains 3 items" in stdout
    assert first["loads"] == []  # a fresh directory: nothing to restore

    # The restarted program restores the first prompt's state at once: no fingerprint= given.
    second, stdout = run_example("persistent_disk_caching.py", tmp_path, then)
    assert second["loads"] and second["loads"][0] >= second["n_prompt"]
    assert "Response 2:" in stdout

    # Same shape, one byte of tensor data changed: another model, so nothing is restored.
    finetune, _ = run_example(
        "persistent_disk_caching.py", tmp_path, then, model=modified_copy(tmp_path)
    )
    assert finetune["loads"] == []


def test_custom_cache_subclass_as_the_seed_writes_it_works_with_set_cache(tmp_path: Path) -> None:
    # Greedy, a token prompt P: the cache stores P + [t]; a completion of P + [t] then hits it.
    then = """
import glob, json
prompt = llm.tokenize(b"The capital of France is")
first = llm.create_completion(prompt, max_tokens=1, temperature=0)
stored = [json.load(open(p)) for p in glob.glob("custom_cache/*.json")]
report["stored"] = [sorted(s) for s in stored]
report["entries"] = len(custom_cache)
t = llm.tokenize(first["choices"][0]["text"].encode(), add_bos=False)
llm.reset()
report["loads_before"] = list(report["loads"])
second = llm.create_completion(prompt + t, max_tokens=4, temperature=0)
report["n_prompt"] = len(prompt) + len(t)
llm.set_cache(None)
llm.reset()
report["same_text"] = llm.create_completion(prompt + t, max_tokens=4, temperature=0)["choices"][0]["text"] == second["choices"][0]["text"]
"""
    report, _ = run_example("custom_cache.py", tmp_path, then)
    assert report["entries"] == 1
    assert report["stored"] == [["fingerprint", "format", "state"]]
    assert report["loads_before"] == []
    assert report["loads"] and report["loads"][0] >= report["n_prompt"] - 1
    assert report["same_text"]


def test_cache_cleanup_example_runs_and_the_cache_heals(tmp_path: Path) -> None:
    then = n_prompt_tokens("Example prompt 0") + "\nreport['entries'] = len(cache)"
    first, stdout = run_example("cache_cleanup.py", tmp_path, then)
    assert first["entries"] == 5 and "Removed old cache file" not in stdout

    # Two hours later: everything the first run wrote is old; the example removes what it finds.
    old = time.time() - 7200
    for root, dirs, files in os.walk(tmp_path / "temp_cache"):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (old, old))
    second, stdout = run_example("cache_cleanup.py", tmp_path, then)
    assert "Removed old cache file: index.sqlite" in stdout
    assert second["loads"] and second["loads"][0] >= second["n_prompt"]

    # The next run rebuilds the lost index from the entry files and restores from them.
    third, _ = run_example("cache_cleanup.py", tmp_path, then)
    assert third["loads"] and third["loads"][0] >= third["n_prompt"]
    assert third["entries"] >= 10


def _normal(line: str) -> str:
    return re.sub(r'model_path=("[^"]*"|MODEL_PATH)', "model_path=M", line.strip())


@pytest.mark.parametrize(
    "name", ["persistent_disk_caching.py", "custom_cache.py", "cache_cleanup.py"]
)
def test_example_scripts_are_the_seed_text_but_for_imports(name: str) -> None:
    # seed_000.txt is the seed as stored (line numbers between lines, indentation lost).
    seed = [
        _normal(line)
        for line in (SEED / "seed_000.txt").read_text().splitlines()
        if line.strip() and not line.strip().isdigit()
    ]
    script = [
        _normal(line)
        for line in (SEED / name).read_text().splitlines()
        if line.strip() and not line.startswith(("from promptcache", "from typing"))
    ]
    starts = [i for i, line in enumerate(seed) if line == script[0]]
    assert any(seed[i : i + len(script)] == script for i in starts), name
    assert "llama_cpp" not in (SEED / name).read_text()
