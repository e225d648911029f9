"""The OpenAI wire format: request models (validated strictly), error bodies and response/chunk bodies.

Knows JSON shapes only; it never touches a model, a worker or the network.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from promptcache.engines.llama_cpp.generation import TOP_LOGPROBS_MAX, TokenLogprob

MAX_CHOICES = 16  # n: each choice is sampled in turn after one prefill


class ApiError(Exception):
    """An error answered to the client as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ------------------------------------------------------------------------------------ requests


class _Strict(BaseModel):
    # Strict: "0.5" is not a temperature and true is not a max_tokens, as with OpenAI's API.
    # Unknown fields are ignored: clients send many (user, metadata, ...) that change nothing here.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatTemplateFields(_Strict):
    """vLLM's chat-template fields: chat completions, /tokenize and the render endpoints take them
    alike (routers such as vllm-router send them), so each renders a conversation the same way."""

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False


class ChatCompletionRequest(_GenerationRequest, ChatTemplateFields):
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)
    tools: list[Any] | None = None


class TokenizeChatRequest(ChatTemplateFields):
    """vLLM's /tokenize of a conversation."""

    model: str | None = None


class TokenizeCompletionRequest(_Strict):
    """vLLM's /tokenize of a text (lm-evaluation-harness sends this one)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


def _param(loc: tuple[int | str, ...]) -> str:
    """'messages[0].content' from pydantic's location, without the union-member tags it adds."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (
            "[" in part
            or part in ("str", "int", "float", "bool", "list", "dict", "none")
            or "-" in part
        ):
            break
        else:
            out += f".{part}" if out else part
    return out


def parse_request(model: type[_Strict], body: dict[str, Any]) -> Any:
    """Validate `body` as `model`; a wrong or missing field is an ApiError 400 naming it."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(tuple(first["loc"]))
        what = f"'{param}': " if param else ""
        raise ApiError(
            400,
            f"invalid value for {what}{first['msg']}",
            param=param or None,
            code="invalid_value",
        ) from None


def parse_json(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; anything else is an ApiError 400."""

    def reject_constant(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(
            400,
            f"we could not parse the JSON body of your request ({exc}); send valid JSON",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def message_text(message: ChatMessage, index: int) -> str:
    """A message's content as one string; only text parts are understood."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise ApiError(
                400,
                f"content parts of type {part.type!r} are not supported: this server takes text only",
                param=f"messages[{index}].content",
                code="unsupported_content",
            )
        texts.append(part.text)
    return "".join(texts)


# ------------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int, source: str | None = None
) -> dict[str, Any]:
    """OpenAI's usage block; cached_tokens counts the prompt tokens reused (live context or cache)
    by the prompt's first evaluation (the n choices of a request share it), and (an extension)
    cached_tokens_source where they came from: live (a sequence this server holds), memory, disk or
    redis."""
    details: dict[str, Any] = {"cached_tokens": cached_tokens}
    if cached_tokens and source:
        details["cached_tokens_source"] = source
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": details,
    }


Piece = Callable[[int], bytes]  # a token's bytes


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def completion_logprobs(
    entries: Sequence[TokenLogprob | None], tokens: Sequence[int], piece: Piece, offset: int
) -> dict[str, Any]:
    """Completions' logprobs for `tokens` (entries[i] is tokens[i]'s, None for an echoed first
    token): {tokens, token_logprobs, top_logprobs, text_offset}, offsets counted from `offset`."""
    out: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for token, entry in zip(tokens, entries, strict=True):
        text = _text(piece(token))
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            out["token_logprobs"].append(entry.logprob)
            top: dict[str, float] = {}
            for t, lp in entry.top:
                top.setdefault(_text(piece(t)), lp)
            out["top_logprobs"].append(top)
    return out


def chat_logprobs(entries: Sequence[TokenLogprob], piece: Piece) -> dict[str, Any]:
    """Chat's logprobs: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        raw = piece(token)
        return {"token": _text(raw), "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [
            {**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }


def merge_logprobs(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two logprobs blocks of one choice as one (lists concatenated)."""
    if a is None or b is None:
        return a or b
    return {key: a[key] + b[key] for key in a}


class Envelope:
    """The fields every response and chunk of one request shares."""

    def __init__(
        self, kind: Literal["completion", "chat"], model: str, system_fingerprint: str
    ) -> None:
        self.kind = kind
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        self.model = model
        self.system_fingerprint = system_fingerprint

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }

    def response(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
        """The whole response; each choice is {text, finish_reason, logprobs}, in index order."""
        out = []
        for index, c in enumerate(choices):
            if self.kind == "chat":
                choice: dict[str, Any] = {
                    "index": index,
                    "message": {"role": "assistant", "content": c["text"]},
                }
            else:
                choice = {"index": index, "text": c["text"]}
            choice.update(logprobs=c.get("logprobs"), finish_reason=c["finish_reason"])
            out.append(choice)
        body = self._head("chat.completion" if self.kind == "chat" else "text_completion")
        body.update(choices=out, usage=usage)
        return body

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        *,
        role: bool = False,
        index: int = 0,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One streamed choice delta (chat) or text piece (completion)."""
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta}
            body = self._head("chat.completion.chunk")
        else:
            choice = {"index": index, "text": text or ""}
            body = self._head("text_completion")
        choice.update(logprobs=logprobs, finish_reason=finish_reason)
        body.update(choices=[choice], usage=None)
        return body

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage is set: no choices, the usage."""
        body = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body.update(choices=[], usage=usage)
        return body


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
