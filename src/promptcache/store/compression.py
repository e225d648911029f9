"""Value compression for persisted entries (disk, Redis): zstd or lz4, named by the envelope's flags.

Owns the codecs and their flags; never touches files or sockets, never decides what to store.

A reader decompresses by the flags an entry carries, whatever it would write itself, so processes
with different settings share one cache. A value that does not shrink by at least MIN_SAVING is
stored raw (flags 0): f16 KV states barely compress (lz4 saves 0.1%, zstd-1 7%: BENCHMARKS.md,
"Tiers"), and reading raw bytes costs no decompression.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import lz4.frame
import zstandard

from promptcache.errors import CorruptEntryError
from promptcache.store.envelope import FLAG_LZ4, FLAG_ZSTD

CODECS = ("none", "zstd", "lz4")
DEFAULT_LEVELS = {"none": 0, "zstd": 3, "lz4": 0}
# Accepted levels: zstd's fast negative levels up to its maximum; lz4.frame's 0 (fast) to 16 (HC max).
LEVELS = {"none": (0, 0), "zstd": (-7, 22), "lz4": (0, 16)}
_FLAGS = FLAG_ZSTD | FLAG_LZ4
MIN_SAVING = 0.02
"""Smallest fraction of a value compression must save for the compressed form to be stored."""


@dataclass(frozen=True)
class Compressor:
    """Compresses values with one codec at one level; thread-safe.

    name: "none", "zstd" or "lz4"; level: the codec's level (None: zstd 3, lz4 0).
    Raises ValueError (naming the accepted values) for an unknown codec or a level out of range.
    """

    name: str = "none"
    level: int | None = None
    _local: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown compression {self.name!r}; use one of {', '.join(CODECS)}")
        if self.level is None:
            object.__setattr__(self, "level", DEFAULT_LEVELS[self.name])
        low, high = LEVELS[self.name]
        if (
            not isinstance(self.level, int)
            or isinstance(self.level, bool)
            or not low <= self.level <= high
        ):
            raise ValueError(
                f"compression_level {self.level!r} is out of range for {self.name}; use an int from {low} to {high}"
            )

    @property
    def flag(self) -> int:
        return {"none": 0, "zstd": FLAG_ZSTD, "lz4": FLAG_LZ4}[self.name]

    def compress(
        self, value: bytes | bytearray | memoryview
    ) -> tuple[bytes | bytearray | memoryview, int]:
        """(payload, envelope flags): the compressed value, or the value itself (flags 0) when
        compression saves less than MIN_SAVING of it."""
        if self.name == "none" or not len(value):
            return value, 0
        if self.name == "zstd":
            # A ZstdCompressor must not be used by two threads at once: one per thread.
            cctx = getattr(self._local, "cctx", None)
            if cctx is None:
                cctx = self._local.cctx = zstandard.ZstdCompressor(
                    level=self.level, write_content_size=True
                )
            packed = cctx.compress(value)
        else:
            packed = lz4.frame.compress(value, compression_level=self.level, store_size=True)
        if len(packed) > len(value) * (1 - MIN_SAVING):
            return value, 0
        return packed, self.flag


_zstd_local = threading.local()


def decompress(payload: bytes, flags: int) -> bytes:
    """The value of an entry payload written with `flags`.

    Raises CorruptEntryError when the flags name no known codec or the payload does not decompress.
    """
    codec = flags & _FLAGS
    if flags & ~_FLAGS:
        raise CorruptEntryError(
            f"entry flags {flags:#x} name a feature this promptcache does not know"
        )
    if codec == 0:
        return payload
    try:
        if codec == FLAG_ZSTD:
            dctx = getattr(_zstd_local, "dctx", None)
            if dctx is None:
                dctx = _zstd_local.dctx = zstandard.ZstdDecompressor()
            return dctx.decompress(payload)
        if codec == FLAG_LZ4:
            return lz4.frame.decompress(payload)
    except (zstandard.ZstdError, RuntimeError, ValueError) as exc:
        raise CorruptEntryError(f"compressed entry does not decompress: {exc}") from None
    raise CorruptEntryError(f"entry flags {flags:#x} name two codecs at once")


def get_compressor(compression: str | Compressor | None, level: int | None = None) -> Compressor:
    """A Compressor from a name (None means "none") or an existing one. Raises ValueError."""
    if isinstance(compression, Compressor):
        return compression
    return Compressor(compression or "none", level)


__all__ = ["CODECS", "Compressor", "decompress", "get_compressor"]
