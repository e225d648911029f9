"""promptcache.compat: drop-in caches for llama_cpp.Llama.set_cache, against the real default model."""

from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cache
import numpy as np
import pytest

import promptcache.compat as compat
from promptcache.compat import (
    BaseLlamaCache,
    LlamaCache,
    LlamaDiskCache,
    LlamaRAMCache,
    LlamaState,
    llama_fingerprint,
)
from promptcache.model import default_model_path, model_identity

PROMPT = "The capital of France is"
LONGER = "The capital of France is a city that many people visit, and the capital of Spain is"
OTHER = "Hello there"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def llm() -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=str(default_model_path()), n_ctx=512, verbose=False, n_threads=2
    )


@pytest.fixture(autouse=True)
def _no_cache_after(request: pytest.FixtureRequest):
    yield
    if "llm" in request.fixturenames:
        request.getfixturevalue("llm").set_cache(None)


_baselines: dict[str, str] = {}


def complete(llm: llama_cpp.Llama, prompt: str) -> str:
    return llm.create_completion(prompt, max_tokens=MAX_TOKENS, temperature=0)["choices"][0]["text"]


def uncached(llm: llama_cpp.Llama, prompt: str) -> str:
    """Greedy text from a fresh context with no cache: the reference every cached run must equal."""
    if prompt not in _baselines:
        cache = llm.cache
        llm.set_cache(None)
        llm.reset()
        _baselines[prompt] = complete(llm, prompt)
        llm.set_cache(cache)
    return _baselines[prompt]


def tokens(llm: llama_cpp.Llama, text: str) -> list[int]:
    return llm.tokenize(text.encode())


@pytest.fixture
def loads(llm: llama_cpp.Llama, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """n_tokens of every state Llama actually restored from its cache."""
    seen: list[int] = []
    real = llm.load_state

    def counting(state: LlamaState) -> None:
        seen.append(state.n_tokens)
        real(state)

    monkeypatch.setattr(llm, "load_state", counting)
    return seen


def synthetic_state(
    n_tokens: int, *, n_vocab: int = 64, n_ctx: int = 32, state_bytes: int = 1000
) -> LlamaState:
    rng = np.random.default_rng(n_tokens)
    input_ids = np.zeros(n_ctx, dtype=np.intc)
    input_ids[:n_tokens] = rng.integers(0, n_vocab, n_tokens)
    input_ids[n_tokens:] = 7  # stale ids, as llama-cpp-python leaves them
    return LlamaState(
        input_ids=input_ids,
        scores=np.zeros((n_tokens, n_vocab), dtype=np.single),
        n_tokens=n_tokens,
        llama_state=rng.bytes(state_bytes),
        llama_state_size=state_bytes,
        seed=1234,
    )


def entry_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "entries").rglob("*") if p.is_file())


# -- API shape ----------------------------------------------------------------------------------


def test_drop_ins_are_llama_cpp_caches_with_the_documented_api(tmp_path: Path) -> None:
    ram, disk = LlamaRAMCache(capacity_bytes=1 << 20), LlamaDiskCache(cache_dir=str(tmp_path / "c"))
    for cache in (ram, disk):
        assert isinstance(cache, llama_cpp.llama_cache.BaseLlamaCache)
        assert isinstance(cache, BaseLlamaCache)
        assert len(cache) == 0 and cache.cache_size == 0
        assert bool(cache)  # Llama tests `if self.cache:`; an empty cache must still be used
        assert [1, 2] not in cache
        with pytest.raises(KeyError):
            cache[[1, 2]]
    assert LlamaCache is LlamaRAMCache
    assert LlamaRAMCache().capacity_bytes == 2 << 30
    assert disk.cache_dir == str(tmp_path / "c") and disk.capacity_bytes == 2 << 30
    assert LlamaDiskCache.__init__.__defaults__ == (".cache/llama_cpp", 2 << 30)
    with pytest.raises(ValueError):
        LlamaRAMCache(capacity_bytes=0)
    with pytest.raises(TypeError):
        ram[[1, 2]] = "not a state"


def test_base_class_is_abstract_and_always_true() -> None:
    with pytest.raises(TypeError):
        BaseLlamaCache()  # type: ignore[abstract]

    class Empty(BaseLlamaCache):
        cache_size = 0

        def __getitem__(self, key):
            raise KeyError(key)

        def __contains__(self, key):
            return False

        def __setitem__(self, key, value):
            pass

        def __len__(self):
            return 0

    assert bool(Empty()) and len(Empty()) == 0


# -- semantics without the model ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ram", "disk"])
def test_longest_prefix_wins_and_round_trip_is_lossless(kind: str, tmp_path: Path) -> None:
    cache = LlamaRAMCache() if kind == "ram" else LlamaDiskCache(str(tmp_path))
    short, long_ = synthetic_state(3), synthetic_state(6)
    # Sparse and awkward score rows: -0.0 and NaN must come back bit for bit.
    long_.scores[2, 5] = -0.0
    long_.scores[4, :] = np.nan
    long_.scores[5, 0] = 1.5
    cache[[1, 2, 3]] = short
    cache[[1, 2, 3, 4, 5, 6]] = long_
    cache[[9, 9]] = synthetic_state(2)

    got = cache[[1, 2, 3, 4, 5, 6, 7, 8]]
    assert got.n_tokens == 6 and got.seed == long_.seed
    assert got.llama_state == long_.llama_state and got.llama_state_size == long_.llama_state_size
    assert got.scores.dtype == np.single and got.scores.shape == long_.scores.shape
    assert got.scores.tobytes() == long_.scores.tobytes()
    assert got.input_ids.dtype == np.intc and got.input_ids.shape == long_.input_ids.shape
    assert np.array_equal(got.input_ids[:6], long_.input_ids[:6])
    assert not got.input_ids[6:].any()  # stale ids past n_tokens are not kept

    assert cache[[1, 2, 3]].n_tokens == 3  # exact key: its own entry
    assert cache[[1, 2, 3, 4]].n_tokens == 6  # shares 4 with the long key, 3 with the short one
    assert cache[[1, 7]].n_tokens in (3, 6)  # shares one token with both
    assert [1] in cache and [9, 1] in cache and [2, 1] not in cache and [] not in cache
    with pytest.raises(KeyError):
        cache[[2, 1]]
    assert cache._find_longest_prefix_key((1, 2, 3, 4, 5, 6, 7)) == (1, 2, 3, 4, 5, 6)
    assert cache.hits == 4 and cache.misses == 1
    assert len(cache) == 3


@pytest.mark.parametrize("kind", ["ram", "disk"])
def test_capacity_holds_by_evicting_least_recently_used(kind: str, tmp_path: Path) -> None:
    one = LlamaRAMCache(1 << 30)
    one[[1]] = synthetic_state(4, state_bytes=20_000)
    capacity = int(one.cache_size * 3.5) if kind == "ram" else 80_000
    cache = LlamaRAMCache(capacity) if kind == "ram" else LlamaDiskCache(str(tmp_path), capacity)
    for i in range(3):
        cache[[100 + i, 1]] = synthetic_state(4, state_bytes=20_000)
    assert len(cache) == 3
    cache[[100, 1]]  # refresh the oldest
    if kind == "disk":
        cache._disk.atime_resolution = 0.0  # make the refresh visible within the same second
        cache[[100, 1]]
    cache[[103, 1]] = synthetic_state(4, state_bytes=20_000)
    assert len(cache) == 3 and cache.cache_size <= capacity
    assert [100, 1] in cache and [102, 1] in cache and [103, 1] in cache  # refreshed and newer
    assert [101, 1] not in cache  # the least recently used went
    with pytest.raises(KeyError):
        cache[[101, 1]]
    for i in range(4, 12):
        cache[[100 + i, 1]] = synthetic_state(4, state_bytes=20_000)
        assert cache.cache_size <= capacity and len(cache) == 3


def test_state_larger_than_capacity_is_dropped_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    cache = LlamaRAMCache(capacity_bytes=5000)
    cache[[1, 2]] = synthetic_state(2, state_bytes=1000)
    with caplog.at_level(logging.WARNING, logger="promptcache.compat"):
        cache[[3, 4]] = synthetic_state(2, state_bytes=10_000)
    assert "capacity_bytes" in caplog.text
    assert len(cache) == 1 and [1, 2] in cache


def test_entries_of_another_shape_are_misses() -> None:
    cache = LlamaRAMCache()
    cache[[1, 2, 3]] = synthetic_state(3, n_vocab=64)
    assert cache[[1, 2, 3]].n_tokens == 3
    cache[[5, 6]] = synthetic_state(2, n_vocab=80)  # the cache now serves an 80-token vocabulary
    assert [1, 2, 3] not in cache
    with pytest.raises(KeyError):
        cache[[1, 2, 3]]
    cache[[7]] = synthetic_state(1, n_vocab=64, n_ctx=48)  # same vocabulary, other context size
    with pytest.raises(KeyError):
        cache[[1, 2, 3]]


def test_disk_entry_of_another_fingerprint_is_a_miss_and_is_kept(tmp_path: Path) -> None:
    a = LlamaDiskCache(str(tmp_path), fingerprint="model-a")
    a[[1, 2, 3]] = synthetic_state(3)
    b = LlamaDiskCache(str(tmp_path), fingerprint="model-b")
    assert len(b) == 0 and [1, 2, 3] not in b
    with pytest.raises(KeyError):
        b[[1, 2, 3]]
    b[[1, 2, 3, 4]] = synthetic_state(4)
    assert b[[1, 2, 3]].n_tokens == 4  # b sees only its own entry
    assert LlamaDiskCache(str(tmp_path), fingerprint="model-a")[[1, 2, 3]].n_tokens == 3
    assert len(entry_files(tmp_path)) == 4


def test_fresh_disk_cache_without_fingerprint_waits_for_a_state_of_its_model(
    tmp_path: Path,
) -> None:
    LlamaDiskCache(str(tmp_path))[[1, 2, 3]] = synthetic_state(3)
    fresh = LlamaDiskCache(str(tmp_path))
    assert len(fresh) == 1
    with pytest.raises(KeyError):  # it cannot tell yet whether the entry fits its model
        fresh[[1, 2, 3]]
    fresh[[8, 8]] = synthetic_state(2)  # a state of the same shape: now it knows
    assert fresh[[1, 2, 3]].n_tokens == 3


def test_corrupt_or_truncated_disk_files_are_misses_and_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = LlamaDiskCache(str(tmp_path), fingerprint="m")
    cache[[1, 2, 3]] = synthetic_state(3, state_bytes=5000)
    cache[[4, 5]] = synthetic_state(2, state_bytes=5000)
    big = [p for p in entry_files(tmp_path) if p.stat().st_size > 4000]
    assert len(big) == 2
    blob = bytearray(big[0].read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    big[0].write_bytes(bytes(blob))
    big[1].write_bytes(big[1].read_bytes()[:100])
    fresh = LlamaDiskCache(str(tmp_path), fingerprint="m")
    with caplog.at_level(logging.WARNING):
        for key in ([1, 2, 3], [4, 5]):
            with pytest.raises(KeyError):
                fresh[key]
    assert fresh.misses == 2 and fresh.hits == 0
    assert len(fresh) == 0 and entry_files(tmp_path) == []
    assert "checksum" in caplog.text or "truncated" in caplog.text or "header" in caplog.text


def test_caches_write_nothing_to_stdout_or_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    for cache in (LlamaRAMCache(), LlamaDiskCache(str(tmp_path))):
        cache[[1, 2]] = synthetic_state(2)
        cache[[1, 2, 3]]
        with pytest.raises(KeyError):
            cache[[5]]
        assert len(cache) == 1
    assert capfd.readouterr() == ("", "")


def test_compat_never_pickles(tmp_path: Path) -> None:
    tree = ast.parse(inspect.getsource(compat))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {
        "pickle",
        "_pickle",
        "cPickle",
        "dill",
        "cloudpickle",
        "shelve",
        "marshal",
        "diskcache",
    }
    # numpy and llama_cpp (through diskcache) import pickle themselves, so sys.modules cannot be
    # pickle-free; instead: importing compat adds no pickling module, and a round trip through both
    # caches works with every pickle entry point made to fail.
    script = textwrap.dedent(
        f"""
        import sys
        import numpy, llama_cpp, llama_cpp.llama_cache
        before = set(sys.modules)
        import promptcache.compat as compat
        added = set(sys.modules) - before
        assert not added & {{"pickle", "_pickle", "dill", "cloudpickle", "shelve"}}, added
        import pickle
        def refuse(*a, **k):
            raise AssertionError("pickle used")
        for name in ("dump", "dumps", "load", "loads", "Pickler", "Unpickler"):
            setattr(pickle, name, refuse)
        import numpy as np
        state = compat.LlamaState(np.arange(8, dtype=np.intc), np.ones((3, 5), np.single), 3, b"kv" * 50, 100, 1)
        for cache in (compat.LlamaRAMCache(), compat.LlamaDiskCache({str(tmp_path)!r})):
            cache[[1, 2, 3]] = state
            assert cache[[1, 2, 3, 4]].llama_state == state.llama_state
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- with the real model ------------------------------------------------------------------------


def test_repeated_completion_is_a_hit_with_the_uncached_text(
    llm: llama_cpp.Llama, loads: list[int]
) -> None:
    expected = uncached(llm, PROMPT)
    cache = LlamaRAMCache(capacity_bytes=1 << 30)
    llm.set_cache(cache)
    assert complete(llm, PROMPT) == expected
    assert len(cache) == 1 and cache.misses == 1  # the empty cache was consulted and filled
    complete(llm, OTHER)  # the live context now holds another prompt
    assert complete(llm, PROMPT) == expected
    assert cache.hits >= 1 and loads, "the repeated prompt was not restored from the cache"
    assert loads[-1] >= len(tokens(llm, PROMPT))
    assert len(cache) == 2
    state = cache[tokens(llm, PROMPT)]
    assert state.scores.shape == (state.n_tokens, llm.n_vocab())
    # Scores are all zero with logits_all=False: the entry holds the state bytes and little else.
    assert cache.cache_size < 2 * (state.llama_state_size + 4096)


def test_longer_prompt_sharing_a_prefix_gets_the_entry(
    llm: llama_cpp.Llama, loads: list[int]
) -> None:
    expected = uncached(llm, LONGER)
    cache = LlamaRAMCache()
    llm.set_cache(cache)
    complete(llm, PROMPT)
    complete(llm, OTHER)
    prefix = tokens(llm, PROMPT)
    longer = tokens(llm, LONGER)
    assert longer[: len(prefix)] == prefix
    state = cache[longer]
    assert list(state.input_ids[: len(prefix)]) == prefix
    loads.clear()
    assert complete(llm, LONGER) == expected
    assert loads and loads[0] >= len(prefix)


def test_disk_entries_survive_a_new_cache_object_and_reads(
    llm: llama_cpp.Llama, loads: list[int], tmp_path: Path
) -> None:
    expected = uncached(llm, PROMPT)
    fingerprint = llama_fingerprint(llm)
    first = LlamaDiskCache(cache_dir=str(tmp_path), fingerprint=fingerprint)
    llm.set_cache(first)
    assert complete(llm, PROMPT) == expected
    assert len(first) == 1
    files = entry_files(tmp_path)

    second = LlamaDiskCache(cache_dir=str(tmp_path), fingerprint=fingerprint)
    assert len(second) == 1
    key = tokens(llm, PROMPT)
    assert second[key].n_tokens >= len(key)
    assert second[key].n_tokens >= len(key)  # a read does not delete the entry
    assert entry_files(tmp_path) == files

    llm.set_cache(second)
    complete(llm, OTHER)
    loads.clear()
    assert complete(llm, PROMPT) == expected
    assert loads and loads[0] >= len(key)
    assert len(LlamaDiskCache(cache_dir=str(tmp_path), fingerprint=fingerprint)) == 2


def test_real_states_evict_to_capacity(llm: llama_cpp.Llama, tmp_path: Path) -> None:
    llm.set_cache(None)
    complete(llm, PROMPT)
    state = llm.save_state()
    for cache in (
        LlamaRAMCache(capacity_bytes=int(state.llama_state_size * 2.5)),
        LlamaDiskCache(str(tmp_path), capacity_bytes=int(state.llama_state_size * 2.5)),
    ):
        for i in range(5):
            cache[[1000 + i] + tokens(llm, PROMPT)] = state
            assert cache.cache_size <= cache.capacity_bytes
        assert len(cache) == 2
        assert cache[[1004]].n_tokens == state.n_tokens
        with pytest.raises(KeyError):
            cache[[1000]]


def test_corrupt_disk_entry_during_completion_is_a_miss(
    llm: llama_cpp.Llama, tmp_path: Path
) -> None:
    expected = uncached(llm, PROMPT)
    cache = LlamaDiskCache(str(tmp_path), fingerprint=llama_fingerprint(llm))
    llm.set_cache(cache)
    complete(llm, PROMPT)
    for path in entry_files(tmp_path):
        path.write_bytes(b"garbage")
    complete(llm, OTHER)
    hits = cache.hits
    assert complete(llm, PROMPT) == expected
    assert cache.hits == hits


def test_seed_basic_ram_caching_flow(llm: llama_cpp.Llama) -> None:
    # Seed 000, "Basic RAM Caching", with the drop-in import (model already loaded, fewer tokens).
    cache = LlamaRAMCache(capacity_bytes=1 << 30)  # 1GB
    llm.set_cache(cache)
    response1 = llm.create_completion(prompt="The capital of France is", max_tokens=MAX_TOKENS)
    response2 = llm.create_completion(prompt="The capital of France is", max_tokens=MAX_TOKENS)
    assert response1["choices"][0]["text"] and response2["choices"][0]["text"]
    assert len(cache) in (1, 2)  # sampled (temperature 0.8): the two replies may differ
    assert cache.hits == 1


# -- learning the model, healing the directory ----------------------------------------------------


def test_index_deleted_or_broken_while_in_use_is_rebuilt_from_entry_files(tmp_path: Path) -> None:
    a, b = (LlamaDiskCache(str(tmp_path), fingerprint="m") for _ in range(2))
    a[[1, 2, 3]] = synthetic_state(3)
    a[[4, 5]] = synthetic_state(2)
    assert b[[1, 2, 3, 9]].n_tokens == 3
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    # Both objects notice, rebuild from the entry files and keep serving and storing.
    assert a[[1, 2, 3]].n_tokens == 3 and b[[4, 5, 6]].n_tokens == 2
    b[[7, 7]] = synthetic_state(2)
    assert a[[7, 7]].n_tokens == 2 and len(a) == len(b) == 3
    # An index that is not a database any more: a fresh object heals it the same way.
    a.close()
    b.close()
    for name in ("index.sqlite-wal", "index.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / "index.sqlite").write_bytes(b"not a database" * 100)
    fresh = LlamaDiskCache(str(tmp_path), fingerprint="m")
    assert fresh[[1, 2, 3]].n_tokens == 3 and len(fresh) == 3


def test_deleted_and_truncated_entry_files_are_misses(tmp_path: Path) -> None:
    cache = LlamaDiskCache(str(tmp_path))
    for i in range(4):
        cache[[100 + i, 1]] = synthetic_state(2, state_bytes=3000)
    files = entry_files(tmp_path)
    assert len(files) == 8
    for path in files[:3]:
        path.unlink()
    files[3].write_bytes(files[3].read_bytes()[:10])
    files[4].write_bytes(b"")
    served = 0
    for i in range(4):
        try:
            served += cache[[100 + i, 1]].n_tokens == 2
        except KeyError:
            pass
    assert 0 < served < 4
    assert len(cache) == served
    cache[[200]] = synthetic_state(1)  # and it still stores
    assert cache[[200]].n_tokens == 1


def test_cleanup_by_age_never_meets_a_stale_directory_of_a_used_cache(tmp_path: Path) -> None:
    old = time.time() - 7200
    LlamaDiskCache(str(tmp_path))[[1, 2]] = synthetic_state(2)
    for path in [tmp_path / "entries", tmp_path / "tmp"]:
        os.utime(path, (old, old))
    LlamaDiskCache(str(tmp_path))  # opening it is using it
    assert all(os.path.getmtime(tmp_path / sub) > old + 3600 for sub in ("entries", "tmp"))


def test_max_age_expires_entries(tmp_path: Path) -> None:
    cache = LlamaDiskCache(str(tmp_path), max_age=0.5)
    assert cache.max_age == 0.5
    cache[[1, 2]] = synthetic_state(2)
    assert cache[[1, 2]].n_tokens == 2
    time.sleep(0.7)
    with pytest.raises(KeyError):
        cache[[1, 2]]
    assert len(LlamaDiskCache(str(tmp_path), max_age=0.5)) == 0
    with pytest.raises(ValueError):
        LlamaDiskCache(str(tmp_path), max_age=0)


def test_llama_cpp_calling_without_a_llama_in_reach_is_refused(tmp_path: Path) -> None:
    # What a future llama-cpp-python that calls the cache from a free function would look like.
    scope: dict = {"__name__": "llama_cpp.future"}
    exec(
        "def lookup(cache, key):\n    return cache[key]\n"
        "def store(cache, key, state):\n    cache[key] = state\n",
        scope,
    )
    for cache in (LlamaRAMCache(), LlamaDiskCache(str(tmp_path))):
        cache[[1, 2]] = synthetic_state(2)
        with pytest.raises(KeyError):
            scope["lookup"](cache, [1, 2])
        scope["store"](cache, [3, 4], synthetic_state(2))
        assert len(cache) == 1
    pinned = LlamaRAMCache(fingerprint="m")  # an explicit fingerprint is the user's word
    pinned[[1, 2]] = synthetic_state(2)
    assert scope["lookup"](pinned, [1, 2]).n_tokens == 2


def test_custom_subclass_gets_portable_states_and_its_misses_are_key_errors() -> None:
    class DictCache(BaseLlamaCache):  # as llama-cpp-python's docs write one: no super().__init__
        def __init__(self):
            self.saved = {}

        def __getitem__(self, key):
            return self.saved.get(tuple(key))

        def __setitem__(self, key, value):
            self.saved[tuple(key)] = json.loads(json.dumps(value))

        def __contains__(self, key):
            return tuple(key) in self.saved

    cache = DictCache()
    assert cache.capacity_bytes == 2 << 30 and cache.cache_size == 0 and bool(cache)
    with pytest.raises(KeyError):
        cache[[1, 2]]
    state = synthetic_state(3)
    state.scores[1, 2] = 0.5
    cache[[1, 2, 3]] = state
    got = cache[[1, 2, 3]]
    assert got.llama_state == state.llama_state and got.scores.tobytes() == state.scores.tobytes()
    cache.saved[(1, 2, 3)]["fingerprint"] = "another model"
    with pytest.raises(KeyError):
        cache[[1, 2, 3]]
    cache.saved[(1, 2, 3)] = {
        "format": "promptcache.llama_state/1",
        "fingerprint": "",
        "state": "!",
    }
    with pytest.raises(KeyError):
        cache[[1, 2, 3]]


def test_auto_fingerprint_is_llama_fingerprint_and_covers_the_whole_file(
    llm: llama_cpp.Llama, tmp_path: Path
) -> None:
    auto = LlamaDiskCache(str(tmp_path / "c"))
    llm.set_cache(auto)
    complete(llm, PROMPT)
    llm.set_cache(None)
    pinned = LlamaDiskCache(str(tmp_path / "c"), fingerprint=llama_fingerprint(llm))
    assert len(pinned) == 1 and len(LlamaDiskCache(str(tmp_path / "c"), fingerprint="x")) == 0
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(Path(llm.model_path).read_bytes())
    assert model_identity(copy) == model_identity(llm.model_path)
    with open(copy, "r+b") as f:  # a byte of tensor data, far from both ends of the file
        f.seek(copy.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    assert model_identity(copy) != model_identity(llm.model_path)


def test_one_cache_shared_by_two_models_of_one_shape_keeps_them_apart(
    llm: llama_cpp.Llama, loads: list[int], tmp_path: Path
) -> None:
    copy = tmp_path / "finetune.gguf"
    blob = bytearray(Path(llm.model_path).read_bytes())
    blob[len(blob) // 2] ^= 1
    copy.write_bytes(bytes(blob))
    other = llama_cpp.Llama(model_path=str(copy), n_ctx=512, verbose=False, n_threads=2)
    try:
        for cache in (LlamaRAMCache(), LlamaDiskCache(str(tmp_path / "c"))):
            llm.set_cache(cache)
            other.set_cache(cache)
            complete(llm, PROMPT)
            loads.clear()
            other_loads: list[int] = []
            real = other.load_state
            other.load_state = lambda s, seen=other_loads, real=real: (  # type: ignore[method-assign]
                seen.append(s.n_tokens),
                real(s),
            )
            complete(other, PROMPT)
            assert other_loads == []  # the fine-tune was not served the original's state
            complete(llm, OTHER)
            complete(llm, PROMPT)
            assert loads  # while the original still is
            del other.load_state
    finally:
        other.set_cache(None)
        other.close()
