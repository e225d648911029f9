"""The events a job hands from its worker thread to the event loop, as typed values.

Owns their shapes only; jobs emit them, responses.py turns them into OpenAI bodies and server-sent events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Started:
    """The job is running: its prompt has `prompt_tokens` tokens (errors after this are in-stream)."""

    prompt_tokens: int


@dataclass(frozen=True)
class Piece:
    """New text of choice `index`, with the OpenAI logprobs object of the tokens it completes."""

    index: int
    text: str
    logprobs: dict[str, Any] | None = None


@dataclass(frozen=True)
class Done:
    """Choice `index` has finished for `finish_reason` (stop or length)."""

    index: int
    finish_reason: str


@dataclass(frozen=True)
class Usage:
    """The request's OpenAI usage object (the last event of a generation before End)."""

    usage: dict[str, Any]


@dataclass(frozen=True)
class Result:
    """The JSON body of a job that is not a generation (sessions)."""

    body: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    """The job failed with `error`; an ApiError's status is answered as it is."""

    error: BaseException


@dataclass(frozen=True)
class End:
    """Nothing follows (a job that was cancelled may end without Done or Usage)."""


END = End()

Event = Started | Piece | Done | Usage | Result | Failed | End

__all__ = ["END", "Done", "End", "Event", "Failed", "Piece", "Result", "Started", "Usage"]
