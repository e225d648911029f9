"""ModelCache: derived model files (assembled GGUF, requantized GGUF, safetensors exports), stored once, opened memory-mapped.

Owns model-artefact keys and how each kind is built; never loads a model for inference and never unpickles.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.artefacts.base import KeyedHousekeeping
from promptcache.artefacts.identity import artefact_key
from promptcache.errors import CorruptEntryError, PromptCacheError
from promptcache.model import model_identity

GGUF_MAGIC = b"GGUF"

# safetensors dtype names -> numpy (https://github.com/huggingface/safetensors, "Format"); bf16 has no numpy type.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def _llama_cpp() -> Any:
    """The llama_cpp bindings with their stderr logging silenced (as the engine does)."""
    import llama_cpp
    import llama_cpp._logger

    if llama_cpp._logger.logger.level == 0:
        llama_cpp._logger.set_verbose(False)
    return llama_cpp


class ModelCache(KeyedHousekeeping):
    """Model files derived from other files, keyed by what produced them, evicted by policy within capacity_bytes.

    Each artefact is one file in its own directory. Keys hash the sources' identities (a digest of each whole
    file, promptcache.model.model_identity, hashed once per file version), the transform, its
    parameters and the library versions. `path(key)` gives the file (hand a GGUF to
    `llama_cpp.Llama(model_path=...)`, which memory-maps it), `open(key)` a read-only mmap of it,
    `open_safetensors(key)` numpy views over an mmap of a safetensors file (no copy).

    Defaults follow the model cache users know: capacity 1 GiB, policy "lru". The seed's
    `compression: true` is not offered: a compressed file cannot be memory-mapped.
    """

    default_dir = "models"

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        capacity_bytes: int = 1 << 30,
        *,
        policy: str = "lru",
        max_age: float | None = None,
        eviction_threshold: float = 0.9,
        fsync: bool = True,
        **store_options: Any,
    ) -> None:
        """Open the cache at `path` (default: the user cache dir / "models"). Raises ValueError, StoreUnavailableError."""
        super().__init__(
            path, capacity_bytes, policy, max_age, eviction_threshold, fsync, store_options
        )

    # -- generic --------------------------------------------------------------------------------

    def put(self, key: str, filename: str, build: Callable[[Path], None]) -> Path:
        """Store the file `build(path)` writes at `path` as artefact `key` (unless stored); returns the stored file.

        Raises ValueError (malformed key or filename), CapacityError, StoreUnavailableError, whatever build raises
        (nothing is stored then), and PromptCacheError when build wrote no file.
        """
        if not filename or "/" in filename or filename.startswith("."):
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        found = self.path(key)
        if found is not None:
            return found
        with self.store.writing(key) as tmp:
            build(tmp / filename)
            if not (tmp / filename).is_file():
                raise PromptCacheError(f"building artefact {key} wrote no file {filename}")
        stored = self.path(key)
        if (
            stored is None
        ):  # evicted by another process right away: capacity is too small for the workload
            raise PromptCacheError(
                f"artefact {key} was evicted as soon as it was stored; raise capacity_bytes"
            )
        return stored

    def path(self, key: str) -> Path | None:
        """The stored file of artefact `key`, or None on a miss. Raises ValueError for a malformed key."""
        found = self.store.get(key)
        if found is None:
            return None
        files = [p for p in found.iterdir() if p.is_file()]
        return files[0] if len(files) == 1 else None

    def open(self, key: str) -> mmap.mmap | None:
        """A read-only memory map of artefact `key`'s file, or None on a miss. Raises ValueError, OSError."""
        file = self.path(key)
        if file is None:
            return None
        with open(file, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    # -- kinds ----------------------------------------------------------------------------------

    def key(
        self, sources: Sequence[str | os.PathLike[str]], transform: str, params: Any = None
    ) -> str:
        """The key of `transform` with `params` applied to the files `sources`. Raises OSError for a missing source."""
        return artefact_key("model", [model_identity(s) for s in sources], transform, params)

    def assemble(
        self, parts: Sequence[str | os.PathLike[str]], *, filename: str = "model.gguf"
    ) -> Path:
        """One GGUF made by concatenating `parts` in order (a model downloaded in byte ranges), stored once.

        (Shards written by llama.cpp's gguf-split are separate GGUFs, not byte ranges: llama.cpp loads those
        from the first shard directly.) Raises ValueError when there are no parts, CorruptEntryError when the
        result does not start with the GGUF magic, OSError for unreadable parts, and put's errors.
        """
        if not parts:
            raise ValueError("assemble needs at least one part")
        key = self.key(parts, "concatenate")

        def build(target: Path) -> None:
            with open(target, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 8 << 20)
            with open(target, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise CorruptEntryError(
                        f"the parts {[str(p) for p in parts]} do not assemble into a GGUF"
                    )

        return self.put(key, filename, build)

    def quantize(
        self,
        source: str | os.PathLike[str],
        ftype: str | int = "Q8_0",
        *,
        allow_requantize: bool = True,
        only_copy: bool = False,
        nthread: int = 0,
        filename: str = "model.gguf",
    ) -> Path:
        """`source` quantized to `ftype` ("Q8_0", "Q4_0", ... or a LLAMA_FTYPE_* int) by llama.cpp's quantize API.

        only_copy copies tensors as they are (llama.cpp's --copy): a re-written GGUF. nthread 0 uses every core.
        Raises ValueError for an unknown ftype, PromptCacheError when llama.cpp reports failure, and put's errors.
        """
        llama_cpp = _llama_cpp()
        if isinstance(ftype, str):
            code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}", None)
            if code is None:
                raise ValueError(
                    f"unknown ftype {ftype!r}; use a llama_cpp.LLAMA_FTYPE_MOSTLY_* suffix such as Q8_0"
                )
            ftype = int(code)
        params = {"ftype": int(ftype), "allow_requantize": allow_requantize, "only_copy": only_copy}
        key = self.key([source], "llama_model_quantize", params)

        def build(target: Path) -> None:
            qparams = llama_cpp.llama_model_quantize_default_params()
            qparams.ftype = params["ftype"]
            qparams.allow_requantize = allow_requantize
            qparams.only_copy = only_copy
            qparams.nthread = nthread
            rc = llama_cpp.llama_model_quantize(
                os.fsencode(source), os.fsencode(target), ctypes.byref(qparams)
            )
            if rc != 0:
                raise PromptCacheError(
                    f"llama_model_quantize({source}, ftype={ftype}) failed with code {rc}"
                )

        return self.put(key, filename, build)

    def export_safetensors(
        self,
        tensors: Mapping[str, np.ndarray],
        *,
        source: Any,
        transform: str = "export",
        params: Any = None,
        metadata: Mapping[str, str] | None = None,
        filename: str = "model.safetensors",
    ) -> Path:
        """Store `tensors` as a safetensors file, keyed by `source` (what they were derived from), transform and params.

        `tensors` are only read when the key is a miss; pass a dict built cheaply or compute the key first.
        Raises TypeError for an unidentifiable source, and put's and safetensors' errors.
        """
        key = artefact_key("model", source, transform, params)

        def build(target: Path) -> None:
            from safetensors.numpy import save_file

            save_file(
                {k: np.ascontiguousarray(v) for k, v in tensors.items()},
                str(target),
                metadata=dict(metadata or {}),
            )

        return self.put(key, filename, build)

    def open_safetensors(self, key: str) -> dict[str, np.ndarray] | None:
        """The tensors of safetensors artefact `key` as read-only numpy views over a memory map; None on a miss.

        Raises CorruptEntryError when the file is not valid safetensors (or holds a dtype numpy lacks, bf16).
        """
        mapped = self.open(key)
        if mapped is None:
            return None
        try:
            (header_len,) = struct.unpack_from("<Q", mapped, 0)
            header = json.loads(mapped[8 : 8 + header_len])
            base = 8 + header_len
            views: dict[str, np.ndarray] = {}
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
                begin, end = entry["data_offsets"]
                count = (end - begin) // dtype.itemsize
                if base + end > len(mapped) or count != int(
                    np.prod(entry["shape"], dtype=np.int64)
                ):
                    raise ValueError(
                        f"tensor {name} lies outside the file or does not match its shape"
                    )
                views[name] = np.frombuffer(
                    mapped, dtype=dtype, count=count, offset=base + begin
                ).reshape(entry["shape"])
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            raise CorruptEntryError(
                f"model artefact {key} is not valid safetensors: {exc}"
            ) from None
        return views
