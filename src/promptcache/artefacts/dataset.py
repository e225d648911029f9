"""DatasetCache: processed Hugging Face datasets stored as Arrow (save_to_disk), reopened memory-mapped, streamed.

Owns dataset keys, the preprocess semantics and streaming with prefetch; never reads an artefact's files
itself (datasets does, memory-mapped) and never loads a pickle.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptcache.artefacts.base import KeyedHousekeeping
from promptcache.artefacts.identity import artefact_key, function_identity, value_identity
from promptcache.artefacts.stream import BatchStream

log = logging.getLogger(__name__)

PreprocessFn = Callable[[dict[str, Any]], dict[str, Any]]
"""A row in, a row out (batched=False); a dict of column lists in and out (batched=True)."""

# Bump when what an artefact holds for the same inputs changes (the preprocess semantics below).
_SEMANTICS = "map/2"

_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_restore = False


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence datasets' progress bars (they write to stderr) for the calls inside; nests across threads."""
    global _quiet_depth, _quiet_restore
    from datasets.utils import logging as ds_logging

    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_restore = ds_logging.is_progress_bar_enabled()
            ds_logging.disable_progress_bar()
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_restore:
                ds_logging.enable_progress_bar()


RECORD_BATCH_BYTES = 8 << 20
"""Bytes per Arrow record batch in a saved artefact (datasets writes 1,000 rows a batch). Opening a
memory-mapped Arrow stream reads every batch's header, and each read maps the page cache around it
(the kernel's 64 KiB fault-around): with 1,000-row batches of 100k short tokenized rows, opening
mapped about 60% of the file into RSS (shared page cache, not copies); with 8 MiB batches, about 1%."""

_config_lock = threading.Lock()


def _save(dataset: Any, path: Path) -> None:
    """dataset.save_to_disk(path), quietly, with record batches of about RECORD_BATCH_BYTES."""
    from datasets import config

    nbytes = dataset.data.nbytes
    rows = max(1000, len(dataset) * RECORD_BATCH_BYTES // nbytes) if nbytes else 1000
    with _quiet(), _config_lock:  # a datasets-wide setting: changed only around this call
        before = config.DEFAULT_MAX_BATCH_SIZE
        config.DEFAULT_MAX_BATCH_SIZE = rows
        try:
            dataset.save_to_disk(str(path))
        finally:
            config.DEFAULT_MAX_BATCH_SIZE = before


def _require_dataset(dataset: Any) -> Any:
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"expected a datasets.Dataset, got {type(dataset).__qualname__}; "
            "build one with Dataset.from_dict / from_list / from_generator"
        )
    return dataset


@dataclass(frozen=True)
class _Preprocess:
    """What cache_dataset and stream_dataset do to a source's rows: one Dataset.map call.

    artefact: the key of what it makes, which names the map's result for datasets' fingerprint."""

    fn: PreprocessFn | None
    batched: bool
    remove_columns: Sequence[str] | None
    artefact: str

    def apply(self, dataset: Any, batch_size: int, cache_file: Path | None) -> Any:
        """`dataset` mapped, into `cache_file` (None: in memory). Raises what the function raises."""
        dataset = dataset.with_format(None)
        if self.fn is None and not self.remove_columns:
            return dataset
        return dataset.map(
            self.fn,
            batched=self.batched,
            batch_size=batch_size,
            remove_columns=list(self.remove_columns) if self.remove_columns else None,
            load_from_cache_file=False,
            keep_in_memory=cache_file is None,
            cache_file_name=None if cache_file is None else str(cache_file),
            new_fingerprint=self.artefact.replace("dataset-", "")[:64],
        )


class DatasetCache(KeyedHousekeeping):
    """Processed datasets, keyed by what produced them, stored as Arrow and reopened memory-mapped.

    `cache_dataset(dataset, preprocess_fn)` maps `preprocess_fn` over `dataset` as `Dataset.map`
    does: with batched=False (the default) it takes one row (a dict of values) and returns one row,
    with batched=True it takes a dict of column lists and returns a dict of column lists; the
    columns it returns are added to the input columns or replace those of the same name, and
    `remove_columns` drops input columns. It saves the result with `Dataset.save_to_disk` and returns its key;
    `get_dataset(key)` reopens it with `load_from_disk`, memory-mapped (not copied into RAM);
    `stream_dataset(...)` yields batches from the cache, or computes, yields and caches them.

    The key is a blake2b hash over: the source (its datasets fingerprint, a hash of its content for
    in-memory datasets and of its files and transforms for loaded ones, or `source=` if given); the
    function's identity (promptcache.artefacts.identity: source, bytecode, closure and globals, or
    `version=` if given: a model or tokenizer in its closure is keyed by its file's or vocabulary's
    digest); `batched`; remove_columns; and the versions of promptcache, datasets, pyarrow,
    llama-cpp-python, numpy and python. A change to any of them is a miss, never a stale hit. The batch
    size is not in the key: preprocess_fn must give the same rows however rows are grouped.

    Defaults follow the training cache users know: capacity 512 MiB, policy "fifo", batch_buffer 32
    (processed batches held before they are appended to the artefact being filled), prefetch 4
    (batches made ahead by a background thread).
    Artefacts live in an ArtefactStore (placed atomically; see its docstring for crash safety).
    """

    default_dir = "datasets"

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        capacity_bytes: int = 512 << 20,
        *,
        policy: str = "fifo",
        max_age: float | None = None,
        eviction_threshold: float = 0.9,
        batch_buffer: int = 32,
        prefetch: int = 4,
        fsync: bool = True,
        **store_options: Any,
    ) -> None:
        """Open the cache at `path` (default: the user cache dir / "datasets").

        Raises ValueError for bad sizes or policy, StoreUnavailableError when the directory cannot be used.
        """
        if not isinstance(batch_buffer, int) or batch_buffer < 1:
            raise ValueError(f"batch_buffer must be an int >= 1, got {batch_buffer!r}")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
        super().__init__(
            path, capacity_bytes, policy, max_age, eviction_threshold, fsync, store_options
        )
        self.batch_buffer = batch_buffer
        self.prefetch = prefetch

    # -- keys -----------------------------------------------------------------------------------

    def dataset_key(
        self,
        dataset: Any,
        preprocess_fn: PreprocessFn | None = None,
        *,
        version: str | int | None = None,
        source: Any = None,
        remove_columns: Sequence[str] | None = None,
        batched: bool = False,
    ) -> str:
        """The key cache_dataset and stream_dataset use for these arguments (see the class docstring).

        Raises TypeError when `dataset` is no datasets.Dataset or a value the function uses cannot be identified.
        """
        _require_dataset(dataset)
        transform = None if preprocess_fn is None else function_identity(preprocess_fn, version)
        params = {
            "semantics": _SEMANTICS,
            "batched": bool(batched),
            "remove_columns": sorted(remove_columns) if remove_columns else None,
        }
        return artefact_key(
            "dataset", value_identity(dataset if source is None else source), transform, params
        )

    def _preprocess(
        self,
        dataset: Any,
        fn: PreprocessFn | None,
        name: str | None,
        version: str | int | None,
        source: Any,
        remove_columns: Sequence[str] | None,
        batched: bool,
    ) -> _Preprocess:
        """The map a call asks for, with its artefact key; checks the name it gives. Raises as dataset_key, ValueError."""
        artefact = self.dataset_key(
            dataset,
            fn,
            version=version,
            source=source,
            remove_columns=remove_columns,
            batched=batched,
        )
        if name is not None:
            self.store.check_key(name)
        return _Preprocess(fn, batched, remove_columns, artefact)

    # -- caching --------------------------------------------------------------------------------

    def cache_dataset(
        self,
        dataset: Any,
        preprocess_fn: PreprocessFn | None = None,
        key: str | None = None,
        *,
        version: str | int | None = None,
        source: Any = None,
        remove_columns: Sequence[str] | None = None,
        batched: bool = False,
        batch_size: int = 1000,
    ) -> str:
        """Process `dataset` with `preprocess_fn` (unless already cached) and store it; returns its artefact key.

        batched and batch_size as in Dataset.map: False (the default) calls preprocess_fn with one
        row, True with a dict of up to batch_size rows' column lists.
        key: a name (1 to 200 characters of [0-9a-z_.:-]) that get_dataset will also accept; it is
        an alias that follows the latest cache_dataset call under it, never part of the artefact key.
        Raises TypeError (not a Dataset, unidentifiable function input), ValueError (malformed key),
        CapacityError (the result is larger than the whole cache), StoreUnavailableError, and
        whatever preprocess_fn raises (nothing is stored then).
        """
        preprocess = self._preprocess(
            dataset, preprocess_fn, key, version, source, remove_columns, batched
        )
        artefact = preprocess.artefact
        if self.store.get(artefact) is None:
            with self.store.writing(artefact) as tmp:
                # Beside tmp and named after it (our pid): a dead writer's is removed with its temp dir.
                map_file = Path(f"{tmp}.map.arrow")
                try:
                    with _quiet():
                        result = preprocess.apply(dataset, batch_size, map_file)
                    _save(result, tmp)
                finally:
                    map_file.unlink(missing_ok=True)
        if key is not None:
            self.store.name(key, artefact)
        return artefact

    def get_dataset(self, key: str) -> Any:
        """The cached datasets.Dataset under `key` (an artefact key or a name), memory-mapped; None on a miss.

        An artefact that datasets cannot open is a logged miss and is removed. Raises ValueError for a malformed key.
        """
        path = self.store.get(key)
        if path is None:
            return None
        from datasets import Dataset

        try:
            return Dataset.load_from_disk(str(path), keep_in_memory=False)
        except Exception as exc:  # noqa: BLE001 - datasets and pyarrow raise many types for damaged files
            log.warning("cached dataset %s cannot be opened, removing it: %s", key, exc)
            self.store.remove(key)
            return None

    def stream_dataset(
        self,
        dataset: Any,
        batch_size: int = 32,
        preprocess_fn: PreprocessFn | None = None,
        *,
        key: str | None = None,
        version: str | int | None = None,
        source: Any = None,
        remove_columns: Sequence[str] | None = None,
        batched: bool = False,
        format: str | None = None,
        columns: Sequence[str] | None = None,
        prefetch: int | None = None,
        batch_buffer: int | None = None,
    ) -> BatchStream[Any]:
        """Batches of `batch_size` rows of the processed dataset, from the cache or computed and cached on the way.

        On a hit the batches are read from the memory-mapped artefact; on a miss each batch of the
        source is processed and yielded, and every batch_buffer processed batches are appended to an
        Arrow file, which becomes the artefact (the same key as cache_dataset's) once the last batch
        is made. A stream closed early, or failing, stores nothing.
        Batches are dicts of column lists (`format`, e.g. "numpy", and `columns` as in Dataset.with_format);
        preprocess_fn is called per row (batched=False, the default) or per batch (batched=True).
        prefetch (default: the cache's) batches are made ahead by a background thread; use the
        stream in a `with` block or close() it when leaving it early.
        Raises (at once) TypeError and ValueError as cache_dataset; during iteration, whatever
        preprocess_fn raises, CapacityError and StoreUnavailableError.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        preprocess = self._preprocess(
            dataset, preprocess_fn, key, version, source, remove_columns, batched
        )
        artefact = preprocess.artefact
        prefetch = self.prefetch if prefetch is None else prefetch
        buffer = self.batch_buffer if batch_buffer is None else batch_buffer
        if not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"batch_buffer must be an int >= 1, got {buffer!r}")
        cached = self.get_dataset(artefact)
        if cached is not None:
            if key is not None:
                self.store.name(key, artefact)
            source_batches = _read_batches(cached, batch_size, format, columns)
        else:
            source_batches = self._fill(
                dataset,
                preprocess,
                key,
                batch_size,
                buffer,
                format,
                columns,
            )
        stream: BatchStream[Any] = BatchStream(
            source_batches, prefetch, key=artefact, from_cache=cached is not None
        )
        return stream

    def _fill(
        self,
        dataset: Any,
        preprocess: _Preprocess,
        name: str | None,
        batch_size: int,
        batch_buffer: int,
        format: str | None,
        columns: Sequence[str] | None,
    ) -> Iterator[Any]:
        import pyarrow as pa
        from datasets import Dataset
        from datasets.arrow_writer import ArrowWriter

        artefact = preprocess.artefact
        dataset = dataset.with_format(None)
        with self.store.writing(artefact) as tmp:
            arrow_file = Path(f"{tmp}.stream.arrow")
            writer = None
            pending: list[Any] = []  # processed batches not yet written: at most batch_buffer
            try:
                for start in range(0, len(dataset), batch_size):
                    rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
                    with _quiet():
                        batch = preprocess.apply(rows, batch_size, None)
                    if writer is None:
                        writer = ArrowWriter(features=batch.features, path=str(arrow_file))
                    pending.append(batch.data.table)
                    if len(pending) >= batch_buffer:
                        writer.write_table(pa.concat_tables(pending))
                        pending = []
                    yield next(_read_batches(batch, batch_size, format, columns))
                if pending:
                    writer.write_table(pa.concat_tables(pending))
                if writer is None:  # an empty source: its (empty) processed form is an artefact too
                    with _quiet():
                        result = preprocess.apply(dataset, batch_size, None)
                else:
                    writer.finalize()
                    writer.close()
                    writer = None
                    result = Dataset.from_file(str(arrow_file), in_memory=False)
                _save(result, tmp)
            finally:
                if writer is not None:
                    writer.close()
                arrow_file.unlink(missing_ok=True)
        if name is not None:
            self.store.name(name, artefact)


def _read_batches(
    dataset: Any, batch_size: int, format: str | None, columns: Sequence[str] | None
) -> Iterator[Any]:
    view = dataset.with_format(format, columns=list(columns) if columns else None)
    for start in range(0, len(view), batch_size):
        yield view[start : start + batch_size]
