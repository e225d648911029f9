"""PromptcacheLM: genlm-backend's AsyncLM (what genlm-control's PromptedLLM runs on) over CachedCausalLM.

Owns the torch face of the log-probabilities and the Hugging Face tokenizer read from the GGUF; never
batches queries, caches log-probabilities or holds KV itself (CachedCausalLM and the Engine do).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import torch
    from genlm.backend.llm.base import UNKNOWN_ADAPTER, AsyncLM
    from genlm.backend.tokenization import Token
    from genlm.backend.tokenization.bytes import ByteVocabError, get_byte_vocab
    from genlm.backend.tokenization.vocab import bytes_to_strs
except ImportError as exc:  # pragma: no cover - the lm extra is not installed
    raise ImportError(
        "promptcache.genlm needs genlm-backend and torch: pip install 'promptcache[lm]'"
    ) from exc

from promptcache.engines.llama_cpp.engine import Engine
from promptcache.files import user_cache_dir
from promptcache.lm import CachedCausalLM
from promptcache.model import model_identity

if TYPE_CHECKING:
    from promptcache.engines.llama_cpp import LLM

log = logging.getLogger(__name__)


def hf_tokenizer(model_path: str | os.PathLike[str]) -> Any:
    """transformers' tokenizer of a GGUF file: AutoTokenizer.from_pretrained(dir, gguf_file=name).

    transformers rebuilds it from the GGUF's metadata, which takes about 8 s for SmolLM2 on 2 cores
    (reading the vocabulary fields); the result is kept once per model (by the whole file's digest)
    in the user cache directory as the JSON files save_pretrained writes, which load in 0.3 s. Nothing
    is downloaded. Raises OSError/ValueError when transformers cannot read the file."""
    from transformers import AutoTokenizer

    path = Path(model_path)
    kept = user_cache_dir("tokenizers", model_identity(path)[:32])
    if kept.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(kept), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged copy is converted again, never fatal
            log.warning("ignoring the kept tokenizer %s: %s", kept, exc)
            shutil.rmtree(kept, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=kept.parent, prefix=".tmp-")
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, kept)  # atomic: readers see no copy or a whole one
        except OSError:  # another process kept it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        log.debug("could not keep the tokenizer of %s: %s", path, exc)
    return tokenizer


def vocabulary_disagreements(tokenizer: Any, pieces: Sequence[bytes]) -> list[int]:
    """Token ids whose bytes by genlm-backend's reading of `tokenizer` (get_byte_vocab, what
    AsyncLM.__init__ uses) differ from `pieces` (llama.cpp's), ids missing on either side included;
    every id when genlm-backend cannot read the tokenizer's bytes at all."""
    try:
        theirs = get_byte_vocab(tokenizer)
    except ByteVocabError:
        return list(range(max(len(pieces), len(tokenizer))))
    n = max(len(theirs), len(pieces))
    return [i for i in range(n) if i >= len(theirs) or i >= len(pieces) or theirs[i] != pieces[i]]


def _no_adapter(lora_name: str | None) -> None:
    if lora_name is not None:
        raise ValueError(UNKNOWN_ADAPTER.format(lora_name))


class PromptcacheLM(AsyncLM):
    """genlm-backend's AsyncLM on llama.cpp with promptcache underneath: genlm-control programs
    (PromptedLLM and its samplers) run on it as on AsyncTransformer or AsyncVirtualLM.

    Everything but the types is CachedCausalLM's (self.lm): the same engine and prefix cache (RAM,
    disk, Redis), the queries that particles await together evaluated in one engine round,
    log-probabilities cached by token sequence, bit-exact in exact mode (the default) whatever the
    batching. Log-probabilities come as float32 torch tensors of shape [V] (token i at index i).

    byte_vocab and str_vocab follow llama.cpp's token pieces, whose ids the logits index;
    `tokenizer` (transformers' tokenizer of the GGUF, hf_tokenizer) serves encode, decode and the
    EOS id. Ids where genlm-backend's reading of that tokenizer gives other bytes are listed in
    `vocabulary_disagreements` and logged (none on SmolLM2: tests/test_genlm.py checks every id).

    model: a CachedCausalLM, an LLM or Engine to build one on (its model, cache and mode), or None
    for the default model. tokenizer: a Hugging Face tokenizer of the same vocabulary, or None to read
    the GGUF's. LoRA adapters are not offered (lora_name must be None).
    """

    def __init__(
        self,
        model: CachedCausalLM | LLM | Engine | None = None,
        *,
        tokenizer: Any = None,
        **lm_kwargs: Any,
    ) -> None:
        if isinstance(model, CachedCausalLM):
            if lm_kwargs:
                raise TypeError(f"unexpected arguments with a CachedCausalLM: {sorted(lm_kwargs)}")
            self.lm = model
        else:
            self.lm = CachedCausalLM(model, **lm_kwargs)
        # AsyncLM.__init__ would derive the vocabularies from the tokenizer alone; here they come
        # from llama.cpp and the tokenizer's reading is only compared with them.
        self.tokenizer = (
            tokenizer if tokenizer is not None else hf_tokenizer(self.engine.model.path)
        )
        pieces = self.lm.byte_vocab
        self.vocabulary_disagreements = vocabulary_disagreements(self.tokenizer, pieces)
        if self.vocabulary_disagreements:
            log.warning(
                "%s: transformers' tokenizer gives other bytes than llama.cpp for %d token ids "
                "(first: %s); byte_vocab follows llama.cpp",
                self.engine.model.name,
                len(self.vocabulary_disagreements),
                self.vocabulary_disagreements[:10],
            )
        self.byte_vocab = [Token(i, piece) for i, piece in enumerate(pieces)]
        self.str_vocab = bytes_to_strs(self.tokenizer, pieces, "tokenizer")
        self._batch_queue: list[Any] = []  # AsyncLM's own batching state (unused here)
        self._batch_armed = False

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | os.PathLike[str] | None = None,
        *,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> PromptcacheLM:
        """Load a GGUF (None: the default SmolLM2) with CachedCausalLM.from_pretrained(model_path,
        **kwargs): n_seq, n_ctx, exact, cache ("ram", "disk", "tiered", a PromptCache), ..."""
        return cls(CachedCausalLM.from_pretrained(model_path, **kwargs), tokenizer=tokenizer)

    def __deepcopy__(self, memo: dict[int, Any]) -> PromptcacheLM:
        return self  # potentials may be copied; the model they share is not

    @property
    def engine(self) -> Engine:
        """The engine every query runs on (its stats count rows, rounds, restores)."""
        return self.lm.engine

    # ------------------------------------------------------------ log-probabilities

    async def next_token_logprobs(
        self, token_ids: Sequence[int], lora_name: str | None = None
    ) -> torch.Tensor:
        """log p(next token | token_ids) for every token, batched with the queries other
        coroutines await meanwhile (one engine round). Raises ValueError for empty ids or a
        lora_name."""
        _no_adapter(lora_name)
        return torch.tensor(await self.lm.next_token_logprobs(token_ids))

    def next_token_logprobs_sync(
        self, token_ids: Sequence[int], lora_name: str | None = None
    ) -> torch.Tensor:
        """As next_token_logprobs, computed now and alone (the same bits in exact mode)."""
        _no_adapter(lora_name)
        return torch.tensor(self.lm.next_token_logprobs_unbatched(token_ids))

    async def batch_next_token_logprobs(
        self, token_ids_list: Sequence[Sequence[int]], lora_name: str | None = None
    ) -> torch.Tensor:
        """log-probabilities after each token list, as one [len, V] tensor (one engine round)."""
        _no_adapter(lora_name)
        return torch.from_numpy(await self.lm.batch_next_token_logprobs(token_ids_list))

    def batch_next_token_logprobs_sync(
        self, token_ids_list: Sequence[Sequence[int]], lora_name: str | None = None
    ) -> torch.Tensor:
        """As batch_next_token_logprobs, without an event loop."""
        _no_adapter(lora_name)
        return torch.from_numpy(self.lm.batch_next_token_logprobs_sync(token_ids_list))

    # ------------------------------------------------------------ caches

    def cache_kv(self, prompt_tokens: Sequence[int], lora_name: str | None = None) -> None:
        """Evaluate a prompt every particle extends and keep it live (CachedCausalLM.cache_kv)."""
        _no_adapter(lora_name)
        self.lm.cache_kv(prompt_tokens)

    def clear_kv_cache(self) -> None:
        """Forget this LM's KV: live sequences and the prefix-cache entries it inserted (entries
        other processes put in a shared store stay)."""
        self.lm.clear_kv_cache()

    def clear_cache(self) -> None:
        """Forget cached log-probabilities and this LM's KV (shared stores spared, as above)."""
        self.lm.clear_cache()

    def reset_async_queries(self) -> None:
        """Drop queued queries after an exception stopped an inference run."""
        self.lm.reset_async_queries()


__all__ = ["PromptcacheLM", "hf_tokenizer", "vocabulary_disagreements"]
