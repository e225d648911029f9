"""CachedCausalLM: the language model LLaMPPL programs (LMContext, Model, smc_standard, smc_steer) run on.

Owns the log-probability cache, the batching of the queries particles await together, and a Hugging
Face-shaped view of the GGUF's own tokenizer; never holds KV itself (the Engine and PromptCache do).

Tokenizer: an adapter over llama.cpp's tokenizer of the GGUF, not transformers' GGUF loading. The logits
come from llama.cpp, so its tokenizer is the one whose ids they index: the adapter cannot disagree with
the model (transformers rebuilds a tokenizer from the GGUF's metadata, and needs transformers, torch and
gguf installed), loads in milliseconds, and covers what LLaMPPL and genlm-backend call (encode, decode,
convert_ids_to_tokens, eos/bos ids, all_special_ids).
"""

from __future__ import annotations

import asyncio
import logging
import os
import string
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from cachetools import LRUCache

from promptcache.engines.llama_cpp.engine import Engine

if TYPE_CHECKING:
    from promptcache.engines.llama_cpp import LLM

log = logging.getLogger(__name__)

# Loop turns a batch waits for more queries: a particle that awaits a sub-coroutine before asking reaches
# the queue a turn or two after the others; every turn without a new query adds ~10 us, not a timer's 20 ms.
SETTLE_TURNS = 2
BACKENDS = (None, "llama_cpp", "llama.cpp", "promptcache")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p for every token, computed stably in float64 and returned as float32."""
    x = logits.astype(np.float64)
    x -= x.max()
    x -= np.log(np.exp(x).sum())
    return x.astype(np.float32)


class GGUFTokenizer:
    """The GGUF's tokenizer (through llama.cpp) with the Hugging Face tokenizer methods LLaMPPL uses.

    model: a loaded llama_cpp._internals.LlamaModel (Engine.model.handle)."""

    is_fast = False
    padding_side = "right"

    def __init__(self, model: Any, name_or_path: str = "") -> None:
        self._model = model
        self._vocab = model.vocab
        self.name_or_path = name_or_path
        self.vocab_size = model.n_vocab()
        self.bos_token_id = _or_none(model.token_bos())
        self.eos_token_id = _or_none(model.token_eos())
        self.pad_token_id: int | None = None
        self.bos_token = self._texts[self.bos_token_id] if self.bos_token_id is not None else None
        self.eos_token = self._texts[self.eos_token_id] if self.eos_token_id is not None else None

    def __len__(self) -> int:
        return self.vocab_size

    @cached_property
    def _texts(self) -> list[str]:
        return [self._model.token_get_text(i) for i in range(self.vocab_size)]

    def _piece(self, token: int) -> bytes:
        from promptcache.engines.llama_cpp.context import token_piece

        return token_piece(self._vocab, token, True)

    @cached_property
    def _pieces(self) -> list[bytes]:
        """Each token's bytes as decoding writes them (special tokens as their text, as HF decodes)."""
        return [self._piece(i) for i in range(self.vocab_size)]

    @cached_property
    def all_special_ids(self) -> list[int]:
        """Control tokens (llama.cpp's LLAMA_TOKEN_ATTR_CONTROL), and BOS/EOS."""
        from llama_cpp import llama_vocab_is_control

        ids = {i for i in range(self.vocab_size) if llama_vocab_is_control(self._vocab, i)}
        ids |= {i for i in (self.bos_token_id, self.eos_token_id) if i is not None}
        return sorted(ids)

    @property
    def all_special_tokens(self) -> list[str]:
        return [self._texts[i] for i in self.all_special_ids]

    def encode(self, text: str, add_special_tokens: bool = True, **_: Any) -> list[int]:
        """Token ids of `text`; special-token text is parsed as special tokens (HF's default)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        return list(self._model.tokenize(text.encode("utf-8"), add_special_tokens, True))

    def __call__(
        self, text: str | list[str], add_special_tokens: bool = True, **_: Any
    ) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}

    def decode(
        self, token_ids: Iterable[int] | int, skip_special_tokens: bool = False, **_: Any
    ) -> str:
        ids = (
            [int(token_ids)]
            if isinstance(token_ids, (int, np.integer))
            else [int(t) for t in token_ids]
        )
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return b"".join(self._pieces[i] for i in ids).decode("utf-8", errors="replace")

    def batch_decode(self, sequences: Iterable[Iterable[int]], **kwargs: Any) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """The vocabulary's own token text (byte-level BPE: 'Ġthe' for ' the'), as HF returns it."""
        if isinstance(ids, (int, np.integer)):
            return self._texts[int(ids)]
        return [self._texts[int(i)] for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        lookup = self.get_vocab()
        if isinstance(tokens, str):
            return lookup[tokens]
        return [lookup[t] for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self._texts)}


def _or_none(token: int) -> int | None:
    return token if token >= 0 else None


class TokenSet(frozenset):
    """An immutable set of token ids that copies and deep copies share instead of duplicating.

    LLaMPPL deep-copies every particle when it starts and resamples, and each particle's LMContext
    holds a mask (`ALL_TOKENS` after every token: the whole vocabulary, 49,152 ids on SmolLM2). A set
    costs about 10 ms per copy there (323 ms for 32 particles, more than a decode step); a TokenSet
    costs nothing, and the masks LLaMPPL derives from it (`-`, `intersection`, ...) are TokenSets too.
    LLaMPPL never mutates a mask ("do not mutate", its LMContext says); mutating raises here."""

    __slots__ = ()

    def __copy__(self) -> TokenSet:
        return self

    def __deepcopy__(self, memo: dict) -> TokenSet:
        return self

    def copy(self) -> TokenSet:
        return self


def _keeps_token_set(name: str) -> None:
    op = getattr(frozenset, name)

    def method(self: TokenSet, *others: Any) -> Any:
        out = op(self, *others)
        return TokenSet(out) if type(out) is frozenset else out

    method.__name__ = name
    setattr(TokenSet, name, method)


for _name in (
    "__and__", "__rand__", "__or__", "__ror__", "__sub__", "__rsub__", "__xor__", "__rxor__",
    "intersection", "union", "difference", "symmetric_difference",
):  # fmt: skip
    _keeps_token_set(_name)


class TokenMasks:
    """Token-id sets LLaMPPL's distributions use (same names and meaning as llamppl.llms.Masks),
    as TokenSets: immutable, shared by the particles that copy them."""

    def __init__(self, lm: CachedCausalLM) -> None:
        vocab = lm.str_vocab
        self.ALL_TOKENS = TokenSet(range(len(vocab)))
        self.STARTS_NEW_WORD = TokenSet(
            i
            for i, v in enumerate(vocab)
            if v[:1] == " "
            and len(v) > 1
            and v[1] not in string.whitespace
            and v[1] not in string.punctuation
        )
        self.CONTINUES_CURRENT_WORD = TokenSet(
            i for i, v in enumerate(vocab) if all(c in "'" or c.isalpha() for c in v)
        )
        self.MID_PUNCTUATION = TokenSet(
            i for i, v in enumerate(vocab) if v in (",", ":", ";", "-", '"')
        )
        self.END_PUNCTUATION = TokenSet(i for i, v in enumerate(vocab) if v in (".", "!", "?"))
        self.PUNCTUATION = self.MID_PUNCTUATION | self.END_PUNCTUATION
        self.CONTAINS_WHITESPACE = TokenSet(
            i for i, v in enumerate(vocab) if any(c in string.whitespace for c in v)
        )
        self.EOS = TokenSet([lm.tokenizer.eos_token_id])
        self._token_lengths = {i: len(v) for i, v in enumerate(vocab)}
        for i in lm.tokenizer.all_special_ids:
            self._token_lengths[i] = 0

    def token_length_mask(self, min: int | None = None, max: int | None = None) -> TokenSet:  # noqa: A002 - llamppl's names
        lo = 0 if min is None else min
        hi = float("inf") if max is None else max
        return TokenSet(i for i, n in self._token_lengths.items() if lo <= n <= hi)


class CachedCausalLM:
    """Next-token log-probabilities for LLaMPPL programs, on llama.cpp with promptcache underneath.

    - log-probabilities are cached by exact token sequence in an LRU bounded by `cache_size` entries and
      `cache_bytes` bytes, so cloned particles asking the same question run the model once;
    - queries that particles await concurrently are evaluated together: one Engine round holds
      the new tokens of every particle, each particle's sequence forked from its parent's, and a prompt
      not live is fed from the prefix cache (RAM, disk, Redis) instead of prefilled.

    model: an LLM (its model, cache and settings), an Engine, or None for the default model. n_seq: sequences live at once (one
    per particle, plus the cached prompt: more particles than that run in several batches per step);
    n_ctx: tokens one sequence may hold (exact mode keeps n_seq x n_ctx KV cells, 23 KB each here).

    exact=True (the default): every log-probability equals an uncached single-sequence llama.cpp
    prefill bit for bit, batched or not, cached or not; a particle's step re-reads its previous token
    and a fork copies its parent's KV stream (see promptcache.engines.llama_cpp.engine). exact=False: forks
    share the prompt's KV cells and a step reads one row, at a drift of about 1.0 in the logits
    (measured in tests/test_lm.py and bench/smc_bench.py). Exact is the default because promptcache's
    promise is that caching never changes a result, and an SMC run is then reproducible from its seed
    whatever the batching.
    """

    backend = "llama_cpp"

    def __init__(
        self,
        model: LLM | Engine | None = None,
        *,
        cache_size: int = 1024,
        cache_bytes: int = 256 << 20,
        batch_size: int = 64,
        n_seq: int = 32,
        n_ctx: int = 512,
        exact: bool | None = None,
    ) -> None:
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(
                "cache_size must be an int >= 0 (0 turns the log-probability cache off)"
            )
        if not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ValueError("cache_bytes must be an int >= 0")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError("batch_size must be an int >= 1")
        self.engine = model if isinstance(model, Engine) else _engine(model, n_seq, n_ctx, exact)
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.batch_size = batch_size
        self.tokenizer = GGUFTokenizer(self.engine.model.handle, self.engine.model.path)
        # Log-probabilities by token list, with their size (array and key), least recently used
        # out first past cache_bytes, and past cache_size entries (evicted before an insert).
        self._results: LRUCache[tuple[int, ...], tuple[np.ndarray, int]] = LRUCache(
            max(1, cache_bytes), getsizeof=lambda entry: entry[1]
        )
        self._lock = threading.RLock()
        self._queue: OrderedDict[tuple[int, ...], asyncio.Future[np.ndarray]] = OrderedDict()
        self._flush_handle: asyncio.Handle | None = None
        self.hits = self.misses = 0

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | os.PathLike[str] | None = None,
        backend: str | None = None,
        *,
        cache_size: int = 1024,
        cache_bytes: int = 256 << 20,
        batch_size: int = 64,
        n_seq: int = 32,
        n_ctx: int = 512,
        exact: bool = True,
        **llm_kwargs: Any,
    ) -> CachedCausalLM:
        """Load a GGUF (None: the default SmolLM2) with LLM(model_path, exact=exact, **llm_kwargs), e.g.
        cache="disk". backend: None or "llama_cpp" (llamppl's own CachedCausalLM serves "hf" and "vllm")."""
        if backend not in BACKENDS:
            raise ValueError(
                f"backend {backend!r}: promptcache runs llama.cpp ('llama_cpp'); for 'hf', 'vllm' or 'mlx' "
                "use llamppl.CachedCausalLM"
            )
        from promptcache.engines.llama_cpp import LLM

        llm = LLM(model_path, exact=exact, **llm_kwargs)
        return cls(
            _engine(llm, n_seq, n_ctx, exact),
            cache_size=cache_size,
            cache_bytes=cache_bytes,
            batch_size=batch_size,
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> CachedCausalLM:
        return self  # particles are deep-copied; the model they share is not

    # ------------------------------------------------------------ vocabulary

    @cached_property
    def llm(self) -> LLM:
        """An LLM handle on this LM's engine (its model, cache, tokenizer and settings)."""
        from promptcache.engines.llama_cpp import LLM

        return LLM(engine=self.engine)

    @property
    def vocab_size(self) -> int:
        return self.engine.n_vocab

    @cached_property
    def byte_vocab(self) -> list[bytes]:
        """Each token id's bytes (special tokens as their text)."""
        return list(self.tokenizer._pieces)

    @cached_property
    def str_vocab(self) -> list[str]:
        """Each token id's text; bytes that are not UTF-8 on their own fall back to the token's
        vocabulary text, as genlm-backend's decode_vocab does by default."""
        out = []
        for i, piece in enumerate(self.byte_vocab):
            try:
                out.append(piece.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(self.tokenizer.convert_ids_to_tokens(i))
        return out

    @property
    def vocab(self) -> list[str]:
        """Legacy name of str_vocab (llamppl deprecates it too)."""
        warnings.warn(
            "CachedCausalLM.vocab is deprecated: use str_vocab or byte_vocab",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.str_vocab

    @cached_property
    def masks(self) -> TokenMasks:
        return TokenMasks(self)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    # ------------------------------------------------------------ log-probabilities

    def _key(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        if isinstance(token_ids, (str, bytes)):
            raise TypeError("token_ids must be a sequence of int token ids")
        key = tuple(int(t) for t in token_ids)
        if not key:
            raise ValueError("token_ids must not be empty")
        return key

    def _cached(self, key: tuple[int, ...]) -> np.ndarray | None:
        with self._lock:
            found = self._results.get(key)
            if found is None:
                return None
            self.hits += 1
            return found[0]

    def _remember(self, key: tuple[int, ...], logits: np.ndarray) -> np.ndarray:
        logprobs = log_softmax(logits)
        logprobs.setflags(write=False)
        size = logprobs.nbytes + 8 * len(key)
        with self._lock:
            self.misses += 1
            if self.cache_size and size <= self.cache_bytes and key not in self._results:
                while len(self._results) >= self.cache_size:
                    self._results.popitem()
                self._results[key] = (logprobs, size)
        return logprobs

    @property
    def cache_nbytes(self) -> int:
        """Bytes the log-probability cache holds (arrays and keys)."""
        return int(self._results.currsize)

    def _evaluate(self, keys: list[tuple[int, ...]]) -> list[np.ndarray]:
        with self._lock:
            logits = self.engine.evaluate([list(k) for k in keys])
            return [self._remember(k, x) for k, x in zip(keys, logits, strict=True)]

    def next_token_logprobs_unbatched(self, token_ids: Sequence[int]) -> np.ndarray:
        """log p(next token | token_ids) for every token: a read-only float32 array of vocab_size,
        computed now (no batching). Raises ValueError/TypeError for empty or malformed ids."""
        key = self._key(token_ids)
        found = self._cached(key)
        return found if found is not None else self._evaluate([key])[0]

    async def next_token_logprobs(self, token_ids: Sequence[int]) -> np.ndarray:
        """As next_token_logprobs_unbatched, batched with the queries other coroutines await meanwhile
        (at most batch_size per batch); the same bits either way in exact mode."""
        key = self._key(token_ids)
        found = self._cached(key)
        if found is not None:
            return found
        loop = asyncio.get_running_loop()
        future = self._queue.get(key)
        if future is None:
            future = loop.create_future()
            self._queue[key] = future
            if len(self._queue) >= self.batch_size:
                self._flush()
            elif self._flush_handle is None:
                self._flush_handle = loop.call_soon(self._settle, len(self._queue), SETTLE_TURNS)
        return await future

    def _settle(self, seen: int, turns: int) -> None:
        """Run the batch once the queue stopped growing for `turns` loop turns."""
        loop = asyncio.get_running_loop()
        if len(self._queue) != seen:
            self._flush_handle = loop.call_soon(self._settle, len(self._queue), SETTLE_TURNS)
        elif turns > 1:
            self._flush_handle = loop.call_soon(self._settle, seen, turns - 1)
        else:
            self._flush()

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        queue, self._queue = self._queue, OrderedDict()
        live = [(k, f) for k, f in queue.items() if not f.done()]
        if not live:
            return
        try:
            results = self._evaluate([k for k, _ in live])
        except Exception as exc:  # noqa: BLE001 - handed to every awaiting particle
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), logprobs in zip(live, results, strict=True):
            if not future.done():
                future.set_result(logprobs)

    async def batch_next_token_logprobs(
        self, token_ids_list: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """log-probabilities after each token list, as one (len, vocab_size) float32 array."""
        rows = await asyncio.gather(*(self.next_token_logprobs(t) for t in token_ids_list))
        return np.stack(rows) if rows else np.zeros((0, self.vocab_size), dtype=np.float32)

    def batch_next_token_logprobs_sync(self, token_ids_list: Sequence[Sequence[int]]) -> np.ndarray:
        """As batch_next_token_logprobs, without an event loop: the missing ones in one engine call."""
        keys = [self._key(t) for t in token_ids_list]
        found = {k: v for k in keys if (v := self._cached(k)) is not None}
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        if missing:
            found.update(zip(missing, self._evaluate(missing), strict=True))
        return (
            np.stack([found[k] for k in keys])
            if keys
            else np.zeros((0, self.vocab_size), dtype=np.float32)
        )

    def reset_async_queries(self) -> None:
        """Drop queued queries (after an exception stopped an inference run); their awaiters are cancelled."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        queue, self._queue = self._queue, OrderedDict()
        for future in queue.values():
            if not future.done():
                future.cancel()

    # ------------------------------------------------------------ KV

    def cache_kv(self, prompt_tokens: Sequence[int]) -> None:
        """Evaluate a prompt every particle will extend: its sequence stays live (pinned) for them to
        fork from, and its state goes to the prefix cache for other processes and later runs."""
        key = self._key(prompt_tokens)
        with self._lock:
            logits = self.engine.prefill(list(key), pin=True)
            if self._cached(key) is None:
                self._remember(key, logits)

    def clear_kv_cache(self) -> None:
        """Forget this LM's KV: its live sequences, and the prefix-cache entries it inserted (on a store
        other processes share, chunks stay for them; see Engine.forget_cached). Cached
        log-probabilities stay."""
        with self._lock:
            self.engine.clear()
            self.engine.forget_cached()

    def clear_cache(self) -> None:
        """Forget cached log-probabilities and this LM's KV (as llamppl's hf backend does)."""
        with self._lock:
            self._results.clear()
            self.clear_kv_cache()


def _engine(model: LLM | None, n_seq: int, n_ctx: int, exact: bool | None) -> Engine:
    """An engine of n_seq sequences for particles: over an LLM's model, cache and settings (its mode
    unless `exact` says otherwise), or the default model. A particle's one-token step never asks the
    prefix cache (min_restore: two 8-token blocks)."""
    if model is None:
        return Engine(
            cache="ram", n_seq=n_seq, n_ctx=n_ctx, exact=True if exact is None else exact,
            min_restore=16,
        )  # fmt: skip
    return model.engine.sibling(
        n_seq=n_seq, n_ctx=n_ctx, exact=model.exact if exact is None else exact, min_restore=16
    )


__all__ = ["CachedCausalLM", "GGUFTokenizer", "TokenMasks", "log_softmax"]
