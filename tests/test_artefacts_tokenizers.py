"""DatasetCache with the model a user tokenizes with in a preprocess function's closure (issue 23):
promptcache's LLM and CachedCausalLM (by their GGUF's whole-file digest) and Hugging Face tokenizers
(by their vocabulary and settings), with per-row functions as Dataset.map calls them by default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

datasets = pytest.importorskip(
    "datasets", reason="the artefacts extra (pip install -e .[artefacts]) is not installed"
)

from datasets import Dataset  # noqa: E402
from finetune import finetune_copy  # noqa: E402

from promptcache import LLM, PromptCache  # noqa: E402
from promptcache.artefacts import DatasetCache, value_identity  # noqa: E402
from promptcache.lm import CachedCausalLM  # noqa: E402
from promptcache.model import default_model_path, model_identity  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
TEXTS = [f"Row {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(40)]


@pytest.fixture(scope="module")
def llm() -> LLM:
    with LLM(cache=None, n_ctx=256) as model:
        yield model


@pytest.fixture(scope="module")
def finetune(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetune_copy(default_model_path(), tmp_path_factory.mktemp("model") / "finetune.gguf")


def test_per_row_lambda_with_an_llm_in_its_closure(tmp_path: Path, llm: LLM) -> None:
    cache = DatasetCache(tmp_path)
    source = Dataset.from_dict({"text": TEXTS})
    keys = [  # the line, twice: the second call is a hit
        cache.cache_dataset(source, preprocess_fn=lambda r: {"ids": llm.tokenize(r["text"])})
        for _ in range(2)
    ]
    assert keys[0] == keys[1] and cache.stats()["puts"] == 1
    assert cache.get_dataset(keys[0])["ids"] == [llm.tokenize(t) for t in TEXTS]
    assert value_identity(llm) == {"llm": model_identity(llm.model_path)}


SCRIPT = """
import json, sys
from datasets import Dataset
from promptcache import LLM
from promptcache.artefacts import DatasetCache

llm = LLM(sys.argv[2], cache=None, n_ctx=256)
cache = DatasetCache(sys.argv[1])
source = Dataset.from_dict({"text": json.loads(sys.argv[3])})
tokenize_row = lambda r: {"ids": llm.tokenize(r["text"])}
key = cache.dataset_key(source, tokenize_row)
hit = cache.get_dataset(key) is not None
assert cache.cache_dataset(source, preprocess_fn=tokenize_row) == key
print(json.dumps({"key": key, "hit": hit, "puts": cache.stats()["puts"],
                  "ids": cache.get_dataset(key)["ids"][3]}))
"""


def run_script(script: Path, cache_dir: Path, gguf: Path) -> dict:
    out = subprocess.run(
        [sys.executable, str(script), str(cache_dir), str(gguf), json.dumps(TEXTS)],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fresh_process_reopens_it_and_another_model_file_is_another_key(
    tmp_path: Path, llm: LLM, finetune: Path
) -> None:
    script = tmp_path / "tokenize_rows.py"  # one file: the function's code and name are the same
    script.write_text(textwrap.dedent(SCRIPT))
    first = run_script(script, tmp_path / "c", default_model_path())
    assert not first["hit"] and first["puts"] == 1
    assert first["ids"] == llm.tokenize(TEXTS[3])
    second = run_script(script, tmp_path / "c", default_model_path())
    assert second["hit"] and second["key"] == first["key"] and second["puts"] == 0
    tuned = run_script(script, tmp_path / "c", finetune)  # one byte of tensor data changed
    assert not tuned["hit"] and tuned["key"] != first["key"] and tuned["puts"] == 1


def test_batched_function_gets_column_lists(tmp_path: Path, llm: LLM) -> None:
    cache = DatasetCache(tmp_path)
    source = Dataset.from_dict({"text": TEXTS})

    def tokenize_batch(batch):  # noqa: ANN001, ANN202
        assert isinstance(batch["text"], list)
        return {"ids": [llm.tokenize(t) for t in batch["text"]]}

    batched = cache.cache_dataset(source, tokenize_batch, batched=True, batch_size=16)
    assert cache.get_dataset(batched)["ids"] == [llm.tokenize(t) for t in TEXTS]
    per_row = cache.cache_dataset(source, lambda r: {"ids": llm.tokenize(r["text"])})
    assert per_row != batched  # the function's shape is part of what made the artefact
    with pytest.raises(TypeError, match="must be str"):  # a per-row function handed batches
        cache.cache_dataset(source, lambda r: {"ids": llm.tokenize(r["text"])}, batched=True)
    with cache.stream_dataset(source, 10, lambda r: {"n": len(r["text"])}) as stream:
        assert [b["n"] for b in stream][0] == [len(t) for t in TEXTS[:10]]


def test_cached_causal_lm_and_its_tokenizer_are_keyed_by_the_model_file(
    tmp_path: Path, finetune: Path
) -> None:
    lm = CachedCausalLM(LLM(cache=PromptCache(), n_ctx=128), n_seq=1, n_ctx=128)
    cache = DatasetCache(tmp_path)
    source = Dataset.from_dict({"text": TEXTS})
    key = cache.cache_dataset(source, lambda r: {"ids": lm.tokenizer.encode(r["text"])})
    assert cache.get_dataset(key)["ids"] == [lm.tokenize(t) for t in TEXTS]
    digest = model_identity(default_model_path())
    assert value_identity(lm) == value_identity(lm.tokenizer) == {"llm": digest}
    with LLM(finetune, cache=None) as tuned:
        assert value_identity(tuned) == {"llm": model_identity(finetune)} != value_identity(lm)


def hf_fast_tokenizer(vocab: dict[str, int], **settings: object):  # noqa: ANN201
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **settings)


def test_hugging_face_tokenizers_are_keyed_by_vocabulary_and_settings(tmp_path: Path) -> None:
    from transformers import ByT5Tokenizer  # a tokenizer in Python (no backend JSON)

    words = sorted({w for t in TEXTS for w in t.replace(":", " ").replace(".", " ").split()})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = hf_fast_tokenizer(vocab)
    cache = DatasetCache(tmp_path)
    source = Dataset.from_dict({"text": TEXTS})

    def key_with(t) -> str:  # noqa: ANN001
        return cache.cache_dataset(source, lambda r: {"ids": t(r["text"])["input_ids"]})

    key = key_with(tok)
    assert cache.get_dataset(key)["ids"][0] == tok(TEXTS[0])["input_ids"]
    assert key_with(hf_fast_tokenizer(dict(vocab))) == key  # an equal tokenizer: a hit
    swapped = {**vocab, words[0]: vocab[words[1]], words[1]: vocab[words[0]]}
    assert key_with(hf_fast_tokenizer(swapped)) != key  # two ids swapped: another vocabulary
    assert key_with(hf_fast_tokenizer(vocab, padding_side="left")) != key
    byt5 = key_with(ByT5Tokenizer())
    assert byt5 not in (key,) and key_with(ByT5Tokenizer()) == byt5
    assert key_with(ByT5Tokenizer(extra_ids=10)) != byt5
