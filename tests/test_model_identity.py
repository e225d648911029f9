"""One model identity (issue 23): the whole file's digest, hashed once per file version and machine.

A copy of the default GGUF with one byte changed in the middle of its tensor data is another model
to every path: LLM over a shared disk cache, two servers on one cache directory, and the drop-in
LlamaDiskCache shared by two llama_cpp.Llama. Each test has a control that shows the states were
there to be served (to the original model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from hashlib import blake2b
from pathlib import Path

import httpx
import llama_cpp
import pytest
from finetune import finetune_copy, settle
from server_process import SRC, ServerProcess, serving

from promptcache import LLM, PromptCache, model
from promptcache.compat import LlamaDiskCache
from promptcache.model import default_model_path, model_identity
from promptcache.store.disk import DiskStore

PROMPT = (
    "Northwind Outfitters sells tents, boots and stoves. Refunds take five business days. "
    "Returns of damaged items are free within thirty days. Question: do gift cards expire?"
)
EDGE = 4 << 20  # what the old identity hashed at each end of the file


@pytest.fixture(scope="module")
def finetune(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetune_copy(default_model_path(), tmp_path_factory.mktemp("model") / "finetune.gguf")


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The identity record of a new user cache directory, with nothing remembered by this process."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(model, "_known", {})
    return tmp_path / "xdg" / "promptcache" / model.IDENTITY_RECORD


def identity_in_fresh_process(path: Path, xdg: Path) -> tuple[str, int]:
    """(model_identity(path), files hashed) in a new process with user cache directory `xdg`."""
    script = (
        "import sys; from promptcache import model; "
        "print(model.model_identity(sys.argv[1]), model.files_hashed)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        env={**os.environ, "PYTHONPATH": str(SRC), "XDG_CACHE_HOME": str(xdg)},
        capture_output=True,
        text=True,
        check=True,
    )
    digest, hashed = out.stdout.split()
    return digest, int(hashed)


# -- the identity --------------------------------------------------------------------------------


def test_one_byte_in_the_middle_of_the_tensors_is_another_model(finetune: Path) -> None:
    original = default_model_path()
    with open(original, "rb") as a, open(finetune, "rb") as b:
        assert a.read(EDGE) == b.read(EDGE)  # the ends agree: hashing them could not tell
        a.seek(-EDGE, os.SEEK_END)
        b.seek(-EDGE, os.SEEK_END)
        assert a.read() == b.read()
    assert model_identity(finetune) != model_identity(original)
    assert model_identity(original) == blake2b(original.read_bytes(), digest_size=32).hexdigest()


def test_digest_is_computed_once_per_file_version(
    tmp_path: Path, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "weights.gguf"
    weights.write_bytes(os.urandom(3 << 20))
    settle(weights)
    hashed = model.files_hashed
    digest = model_identity(weights)
    assert digest == blake2b(weights.read_bytes(), digest_size=32).hexdigest()
    assert model.files_hashed == hashed + 1
    assert model_identity(weights) == digest and model.files_hashed == hashed + 1
    monkeypatch.setattr(model, "_known", {})  # as another process would: the record answers
    assert model_identity(weights) == digest and model.files_hashed == hashed + 1
    assert identity_in_fresh_process(weights, tmp_path / "xdg") == (digest, 0)

    st = weights.stat()  # a new mtime is a new file version: hashed again, the same bytes
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert model_identity(weights) == digest and model.files_hashed == hashed + 2
    with open(weights, "ab") as f:  # a new size: hashed again, another model
        f.write(b"\x00")
    settle(weights)
    assert model_identity(weights) != digest and model.files_hashed == hashed + 3
    assert len(json.loads(record.read_text())["files"]) == 3


def test_file_written_just_now_is_hashed_until_it_settles(tmp_path: Path, record: Path) -> None:
    """A write within the same mtime tick would keep the file's version: a fresh file is not
    remembered (a rewrite of the same size a moment later still gives the new bytes' digest)."""
    weights = tmp_path / "weights.gguf"
    weights.write_bytes(b"a" * 1000)
    hashed = model.files_hashed
    first = model_identity(weights)
    with open(weights, "r+b") as f:
        f.write(b"b")
    assert model_identity(weights) != first and model.files_hashed == hashed + 2
    assert not record.exists() or not json.loads(record.read_text())["files"]
    settle(weights)
    model_identity(weights)
    model_identity(weights)
    assert model.files_hashed == hashed + 3


def test_record_keeps_the_latest_file_versions(
    tmp_path: Path, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model, "RECORD_LIMIT", 2)
    files = [tmp_path / f"m{i}.gguf" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 1000)
        settle(f)
        model_identity(f)
    kept = json.loads(record.read_text())["files"]
    assert sorted(v["path"] for v in kept.values()) == [str(f) for f in files[1:]]


@pytest.mark.parametrize(
    "damage",
    [
        b"\x00{not json",
        b"[1, 2]",
        b'{"files": [1]}',
        b'{"files": {"KEY": {"blake2b": "0123"}}}',
        b'{"files": {"KEY": {"blake2b": 7}}}',
    ],
)
def test_damaged_record_is_ignored_and_rewritten(
    tmp_path: Path, record: Path, damage: bytes
) -> None:
    weights = tmp_path / "weights.gguf"
    weights.write_bytes(b"gguf" * 1000)
    settle(weights)
    st = weights.stat()
    key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    record.parent.mkdir(parents=True)
    record.write_bytes(damage.replace(b"KEY", key.encode()))
    hashed = model.files_hashed
    digest = model_identity(weights)
    assert digest == blake2b(weights.read_bytes(), digest_size=32).hexdigest()
    assert model.files_hashed == hashed + 1
    assert json.loads(record.read_text())["files"][key]["blake2b"] == digest


def test_processes_starting_at_once_hash_a_model_once(finetune: Path, tmp_path: Path) -> None:
    script = (
        "import sys; from promptcache import model; "
        "print(model.model_identity(sys.argv[1]), model.files_hashed)"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(finetune)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    answers = [child.communicate(timeout=300)[0].split() for child in children]
    assert all(child.returncode == 0 for child in children)
    assert {digest for digest, _n in answers} == {model_identity(finetune)}
    assert sum(int(n) for _d, n in answers) == 1  # one process hashed, three read its answer


# -- no path serves the original's states to the fine-tune -------------------------------------


def test_llm_never_restores_the_originals_states_in_the_finetune(
    finetune: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "kv"
    with LLM(cache=PromptCache(DiskStore(shared)), n_ctx=512) as original:
        tokens = original.tokenize(PROMPT)
        original.logits(tokens)
        fingerprint = original.fingerprint
    with LLM(finetune, cache=PromptCache(DiskStore(shared)), n_ctx=512) as tuned:
        assert tuned.tokenize(PROMPT) == tokens and tuned.fingerprint != fingerprint
        tuned.logits(tokens)
        assert tuned.last_stats.tokens_reused == 0 and tuned.last_stats.source == "none"
    with LLM(cache=PromptCache(DiskStore(shared)), n_ctx=512) as again:  # the control
        again.logits(tokens)
        assert again.last_stats.source == "disk" and again.last_stats.tokens_reused > 0


def cached_tokens(server: ServerProcess) -> int:
    """usage.prompt_tokens_details.cached_tokens of a one-token greedy completion of PROMPT."""
    reply = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "default", "prompt": PROMPT, "max_tokens": 1, "temperature": 0},
        timeout=300,
    )
    reply.raise_for_status()
    return reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_server_never_serves_the_originals_states_to_the_finetune(
    finetune: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "kv"

    def server(name: str, gguf: Path) -> ServerProcess:
        return ServerProcess(
            tmp_path / f"{name}.log",
            *("--model", str(gguf), "--cache", "disk", "--cache-dir", str(shared)),
            *("--n-ctx", "512", "--workers", "1", "--log-level", "warning"),
        )

    with serving({"original": server("original", default_model_path())}) as s:
        assert cached_tokens(s["original"]) == 0
    deadline = time.monotonic() + 60
    while not len(DiskStore(shared)):  # the original's states are on disk before the fine-tune asks
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with serving(
        {"finetune": server("finetune", finetune), "again": server("again", default_model_path())}
    ) as s:
        assert cached_tokens(s["finetune"]) == 0
        assert cached_tokens(s["again"]) > 0  # the control: the original model is served them


def test_drop_in_disk_cache_never_serves_the_originals_states_to_the_finetune(
    finetune: Path, tmp_path: Path
) -> None:
    cache = LlamaDiskCache(str(tmp_path / "c"))
    loaded: dict[str, list[int]] = {"original": [], "finetune": []}

    def llama(name: str, gguf: Path) -> llama_cpp.Llama:
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, verbose=False, n_threads=2)
        real = llm.load_state
        llm.load_state = lambda s: (loaded[name].append(s.n_tokens), real(s))  # type: ignore[method-assign]
        llm.set_cache(cache)
        return llm

    def complete(llm: llama_cpp.Llama, prompt: str) -> None:
        llm.create_completion(prompt, max_tokens=2, temperature=0)

    original, tuned = llama("original", default_model_path()), llama("finetune", finetune)
    complete(original, PROMPT)
    hits, misses = cache.hits, cache.misses
    complete(tuned, PROMPT)
    assert cache.hits == hits and cache.misses == misses + 1 and loaded["finetune"] == []
    complete(original, "Hello there")
    complete(original, PROMPT)  # the control: the original gets its state back
    assert cache.hits > hits and loaded["original"]
