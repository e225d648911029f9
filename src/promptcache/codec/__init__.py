"""State codecs: how an engine's state for a token sequence is cut into token ranges and joined back.

A codec never stores anything and never hashes; PromptCache decides which ranges to keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from promptcache.errors import CodecError


@runtime_checkable
class StateCodec(Protocol):
    """Cuts a state covering tokens [0, n) into segments and joins segments back.

    `splittable` False means the state is opaque: only whole entries can be reused (exact match).
    """

    name: str
    splittable: bool

    def n_tokens(self, state: bytes) -> int:
        """How many tokens `state` covers. Raises CodecError if it cannot be parsed."""
        ...

    def split(self, state: bytes, bounds: Sequence[int]) -> list[bytes]:
        """Segments for [bounds[0], bounds[1]), [bounds[1], bounds[2]), ... Raises CodecError."""
        ...

    def join(self, segments: Sequence[bytes]) -> bytes:
        """The state covering the concatenated segments, in order. Raises CodecError."""
        ...

    def cut(self, segment: bytes, n: int) -> bytes:
        """The first n tokens of one segment. Raises CodecError."""
        ...


class OpaqueCodec:
    """States that cannot be cut (sliding-window or recurrent models, unknown layouts): whole entries only."""

    name = "opaque"
    splittable = False

    def n_tokens(self, state: bytes) -> int:
        raise CodecError("an opaque state does not say how many tokens it covers")

    def split(self, state: bytes, bounds: Sequence[int]) -> list[bytes]:
        raise CodecError("an opaque state cannot be split; store it whole")

    def join(self, segments: Sequence[bytes]) -> bytes:
        if len(segments) != 1:
            raise CodecError("an opaque state is one segment")
        return bytes(segments[0])

    def cut(self, segment: bytes, n: int) -> bytes:
        raise CodecError("an opaque state cannot be cut")


class FixedWidthCodec:
    """States of a fixed number of bytes per token, laid out token after token.

    Real for engines that keep per-token rows contiguously; also what the demo and the
    core's tests use before an engine is loaded.
    """

    splittable = True

    def __init__(self, bytes_per_token: int) -> None:
        if not isinstance(bytes_per_token, int) or bytes_per_token <= 0:
            raise ValueError("bytes_per_token must be a positive int")
        self.bytes_per_token = bytes_per_token
        self.name = f"fixed{bytes_per_token}"

    def n_tokens(self, state: bytes) -> int:
        n, rest = divmod(len(state), self.bytes_per_token)
        if rest:
            raise CodecError(
                f"state of {len(state)} bytes is not a multiple of {self.bytes_per_token}"
            )
        return n

    def split(self, state: bytes, bounds: Sequence[int]) -> list[bytes]:
        n = self.n_tokens(state)
        if list(bounds) != sorted(bounds) or not bounds or bounds[0] < 0 or bounds[-1] > n:
            raise CodecError(f"bounds {list(bounds)[:4]}... do not fit a state of {n} tokens")
        view = memoryview(state)
        w = self.bytes_per_token
        return [bytes(view[a * w : b * w]) for a, b in zip(bounds, bounds[1:])]

    def join(self, segments: Sequence[bytes]) -> bytes:
        for seg in segments:
            self.n_tokens(seg)
        return b"".join(segments)

    def cut(self, segment: bytes, n: int) -> bytes:
        if not 0 <= n <= self.n_tokens(segment):
            raise CodecError(f"cannot cut {n} tokens from a segment of {self.n_tokens(segment)}")
        return bytes(segment[: n * self.bytes_per_token])
