"""Model: one loaded GGUF, its weights, vocabulary and tokenizer, shared by every engine over the file.

Owns loading the weights once and turning text into tokens and back; never creates a context (context.py
does) and never decides reuse. Where the file is and what identifies it: promptcache.model.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property
from pathlib import Path

from promptcache.engines.llama_cpp.context import bindings, token_piece
from promptcache.model import default_model_path, model_identity

log = logging.getLogger(__name__)


class Model:
    """The GGUF at `path` (default: promptcache.default_model_path()), loaded once.

    Raises FileNotFoundError when there is no file and whatever llama-cpp-python raises for a file it
    cannot load."""

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, verbose: bool = False
    ) -> None:
        llama_cpp = bindings()
        from llama_cpp._internals import LlamaModel

        self.path = str(path) if path is not None else str(default_model_path())
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"no model file at {self.path}")
        self.verbose = verbose
        self.handle = LlamaModel(
            path_model=self.path, params=llama_cpp.llama_model_default_params(), verbose=verbose
        )
        self.vocab = self.handle.vocab
        self.n_vocab = self.handle.n_vocab()
        self.n_ctx_train = self.handle.n_ctx_train()
        self.n_swa = int(llama_cpp.llama_model_n_swa(self.handle.model))

    @cached_property
    def identity(self) -> str:
        """The file's identity (a whole-file digest, remembered per file version)."""
        return model_identity(self.path)

    @cached_property
    def metadata(self) -> dict[str, str]:
        return dict(self.handle.metadata())

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of `text` (a BOS is added when the model wants one and add_bos is True)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        return list(self.handle.tokenize(text.encode("utf-8"), add_bos, special))

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return self.handle.detokenize(list(tokens), special).decode("utf-8", errors="replace")

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character)."""
        return token_piece(self.vocab, token, special)

    def token_text(self, token: int) -> str | None:
        """The vocabulary's text of a token (None for a negative id: the model has no such token)."""
        return self.handle.token_get_text(token) if token >= 0 else None

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends a generation (end of text, end of turn)."""
        return bool(bindings().llama_vocab_is_eog(self.vocab, token))

    @cached_property
    def kv_bytes_per_token(self) -> int:
        """K and V bytes one token takes in a context (f16), from the GGUF metadata."""
        md = self.metadata
        arch = md.get("general.architecture", "llama")

        def num(key: str, default: int) -> int:
            try:
                return int(md.get(f"{arch}.{key}", default))
            except (TypeError, ValueError):  # a per-layer array: take the default
                return default

        n_head = num("attention.head_count", 1)
        n_embd = num("embedding_length", 0)
        head_kv = num("attention.head_count_kv", n_head)
        k = num("attention.key_length", n_embd // max(1, n_head))
        v = num("attention.value_length", k)
        return num("block_count", 1) * head_kv * (k + v) * 2

    @property
    def name(self) -> str:
        return Path(self.path).name

    def __repr__(self) -> str:
        return f"Model({self.path!r})"


__all__ = ["Model"]
