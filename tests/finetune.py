"""Another model of the same shape: a copy of a GGUF with one byte of tensor data changed in its middle.

Owns making such copies for the identity tests; never loads a model (the tests do, to check it loads).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import gguf


def changed_byte_offset(path: Path) -> int:
    """The file's middle byte, checked to lie inside a tensor's data (far from header and tail)."""
    middle = os.path.getsize(path) // 2
    reader = gguf.GGUFReader(path)
    inside = [t for t in reader.tensors if t.data_offset <= middle < t.data_offset + t.n_bytes]
    assert middle > reader.data_offset and len(inside) == 1, (middle, reader.data_offset)
    return middle


def finetune_copy(source: Path, target: Path) -> Path:
    """`target`: `source` with the lowest bit of the byte at changed_byte_offset flipped, its mtime
    an hour ago (as a downloaded model's: settled, so model_identity remembers it)."""
    offset = changed_byte_offset(source)
    shutil.copyfile(source, target)
    with open(target, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))
    settle(target)
    return target


def settle(path: Path) -> None:
    """Set `path`'s mtime an hour back: older than promptcache.model.SETTLE_SECONDS."""
    past = time.time() - 3600
    os.utime(path, (past, past))
