"""PromptcacheLM on the real default model: genlm-backend's AsyncLM, its vocabulary, exactness and caches."""

from __future__ import annotations

import asyncio
import copy
import ctypes
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PromptcacheLM needs the lm extra: pip install -e '.[lm]'"
)
pytest.importorskip("genlm.backend", reason="PromptcacheLM needs the lm extra")

from genlm.backend.llm.base import AsyncLM  # noqa: E402
from genlm.backend.tokenization import decode_vocab  # noqa: E402

from promptcache import PromptCache  # noqa: E402
from promptcache.files import user_cache_dir  # noqa: E402
from promptcache.genlm import PromptcacheLM, hf_tokenizer, vocabulary_disagreements  # noqa: E402
from promptcache.model import default_model_path, model_identity  # noqa: E402
from promptcache.store.disk import DiskStore  # noqa: E402

PROMPT = (
    "The harbour office of Northwind keeps a log of every ferry, fishing boat and cargo ship that "
    "enters the bay, with its name, its home port and the hour it docked. Today the first entry reads"
)


@pytest.fixture(scope="module")
def lm() -> PromptcacheLM:
    return PromptcacheLM.from_pretrained(None, n_seq=6, n_ctx=256, cache=None)


def llama_cpp_pieces() -> list[bytes]:
    """Each token id's bytes as llama.cpp's own llama_token_to_piece writes them (special tokens as
    their text), read through llama-cpp-python's bindings, not promptcache's."""
    import llama_cpp

    vocab_only = llama_cpp.Llama(
        model_path=str(default_model_path()), vocab_only=True, verbose=False
    )
    vocab = vocab_only._model.vocab
    pieces = []
    for i in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(vocab, i, buf, 256, 0, True)
        assert 0 <= n <= 256
        pieces.append(buf.raw[:n])
    return pieces


def test_every_token_ids_bytes_are_llama_cpps_piece(lm):
    pieces = llama_cpp_pieces()
    assert isinstance(lm, AsyncLM) and len(pieces) == lm.lm.vocab_size == 49152
    assert [bytes(t) for t in lm.byte_vocab] == pieces  # every id, special tokens included
    assert [t.token_id for t in lm.byte_vocab] == list(range(len(pieces)))
    # transformers' tokenizer of the GGUF, read as genlm-backend's AsyncLM reads it, agrees on every id
    hf_bytes, hf_strs = decode_vocab(lm.tokenizer)
    assert [bytes(t) for t in hf_bytes] == pieces and lm.vocabulary_disagreements == []
    assert lm.str_vocab == hf_strs
    for text in (PROMPT, "naïve café — 東京 🔥\n\tdone", "<|im_start|>user\nHi<|im_end|>"):
        assert lm.tokenizer.encode(text) == lm.lm.tokenizer.encode(text)
    assert lm.tokenizer.eos_token_id == lm.lm.tokenizer.eos_token_id == 2


def test_a_disagreeing_tokenizer_is_named_and_byte_vocab_stays_llama_cpps(lm, caplog):
    pieces = [bytes(t) for t in lm.byte_vocab]
    changed = [*pieces[:7], b"other", *pieces[8:]]
    assert vocabulary_disagreements(lm.tokenizer, changed) == [7]
    longer = copy.deepcopy(lm.tokenizer)
    longer.add_tokens(["<|promptcache_extra|>"])  # an id llama.cpp's vocabulary does not have
    with caplog.at_level(logging.WARNING, logger="promptcache.genlm"):
        other = PromptcacheLM(lm.lm, tokenizer=longer)
    assert other.vocabulary_disagreements == [49152] and "49152" in caplog.text
    assert [bytes(t) for t in other.byte_vocab] == pieces and len(other.str_vocab) == 49152


def test_batched_logprobs_equal_unbatched_bit_for_bit(lm):
    prompt = lm.tokenizer.encode(PROMPT)
    first = lm.next_token_logprobs_sync(prompt)
    assert isinstance(first, torch.Tensor) and first.shape == (49152,)
    assert first.dtype == torch.float32 and abs(float(first.double().exp().sum()) - 1) < 1e-4
    queries = [prompt + [int(t)] for t in torch.topk(first, 4).indices]
    batches = lm.engine.stats.batches

    async def particles() -> list[torch.Tensor]:
        return await asyncio.gather(*(lm.next_token_logprobs(q) for q in queries))

    batched = asyncio.run(particles())
    assert lm.engine.stats.batches == batches + 1  # four particles' queries in one llama_decode
    stacked = asyncio.run(lm.batch_next_token_logprobs(queries))  # cached by sequence: no decode
    assert lm.engine.stats.batches == batches + 1 and stacked.shape == (4, 49152)
    lm.clear_cache()  # log-probabilities and KV gone: each query below is a lone prefill
    for q, got, row in zip(queries, batched, stacked, strict=True):
        done = lm.engine.stats.queries
        alone = lm.next_token_logprobs_sync(q)
        assert lm.engine.stats.queries == done + 1
        assert torch.equal(got, alone) and torch.equal(row, alone)  # bit for bit, exact mode
        lm.clear_cache()
    assert torch.equal(lm.batch_next_token_logprobs_sync(queries[::-1]), stacked.flip(0))


def test_results_are_the_callers_to_change_and_adapters_are_refused(lm):
    ids = lm.tokenizer.encode("A tensor handed out")
    got = lm.next_token_logprobs_sync(ids)
    got.zero_()
    assert not torch.equal(lm.next_token_logprobs_sync(ids), got)  # the cached copy is intact
    with pytest.raises(ValueError, match="LoRA"):
        lm.next_token_logprobs_sync(ids, lora_name="reviewer")
    with pytest.raises(ValueError, match="empty"):
        lm.next_token_logprobs_sync([])
    assert copy.deepcopy(lm) is lm


def test_a_second_process_reuses_the_prompt_from_a_shared_disk_cache(tmp_path):
    first = textwrap.dedent(
        f"""
        import asyncio
        import numpy as np
        from genlm.control import PromptedLLM, direct_token_sampler
        from promptcache import PromptCache
        from promptcache.genlm import PromptcacheLM
        from promptcache.store.disk import DiskStore

        lm = PromptcacheLM.from_pretrained(
            None, cache=PromptCache(DiskStore({str(tmp_path / "store")!r})), n_seq=4, n_ctx=256
        )
        llm = PromptedLLM(lm, eos_byte_strings=[b"."])
        llm.set_prompt_from_str({PROMPT!r})
        asyncio.run(direct_token_sampler(llm).smc(n_particles=2, max_tokens=3, ess_threshold=0.0))
        assert lm.engine.stats.inserts >= 1
        np.save({str(tmp_path / "prompt.npy")!r}, lm.next_token_logprobs_sync(llm.prompt_ids).numpy())
        """
    )
    subprocess.run([sys.executable, "-c", first], check=True, timeout=600)
    theirs = set(DiskStore(tmp_path / "store").keys())
    assert theirs
    cache = PromptCache(DiskStore(tmp_path / "store"))
    lm = PromptcacheLM.from_pretrained(None, cache=cache, n_seq=4, n_ctx=256)
    prompt = lm.tokenizer.encode(PROMPT)
    got = asyncio.run(lm.next_token_logprobs(prompt))
    assert lm.engine.stats.restores == 1 and lm.engine.stats.tokens_restored >= len(prompt) - 2
    assert cache.stats()["hits_by_tier"] == {"disk": 1}
    expected = np.load(tmp_path / "prompt.npy", allow_pickle=False)
    assert torch.equal(got, torch.from_numpy(expected))  # restored, then the same bits
    lm.clear_cache()
    assert theirs <= set(DiskStore(tmp_path / "store").keys())  # the shared store is spared


def test_the_gguf_tokenizer_is_converted_once_and_a_damaged_copy_again(
    lm, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # platformdirs' user cache directory
    path = default_model_path()
    kept = user_cache_dir("tokenizers", model_identity(path)[:32])
    assert str(kept).startswith(str(tmp_path))
    kept.mkdir(parents=True)
    (kept / "tokenizer.json").write_text("not a tokenizer")
    with caplog.at_level(logging.WARNING, logger="promptcache.genlm"):
        converted = hf_tokenizer(path)  # read from the GGUF: the damaged copy is replaced
    assert "ignoring the kept tokenizer" in caplog.text
    assert converted.name_or_path == str(path.parent)
    again = hf_tokenizer(path)
    assert again.name_or_path == str(kept)  # the kept copy, not the GGUF, this time
    assert [bytes(t) for t in decode_vocab(again)[0]] == [bytes(t) for t in lm.byte_vocab]
    assert again.encode(PROMPT) == converted.encode(PROMPT) == lm.lm.tokenizer.encode(PROMPT)
