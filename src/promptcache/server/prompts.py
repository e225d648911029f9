"""Prompts of the server: what a request asks to evaluate (text, token ids or chat messages) and its tokens.

Owns the request -> Prompt -> tokens steps shared by generation and sessions; never runs a model
past tokenizing and never touches HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from promptcache.engines.llama_cpp import LLM
from promptcache.errors import PromptCacheError
from promptcache.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    message_text,
)


@dataclass
class Prompt:
    """What a worker turns into prompt tokens: text, token ids, or chat messages (and user stop strings)."""

    text: str | None = None
    tokens: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    stops: list[str] = field(default_factory=list)
    param: str = "prompt"


def prompt_tokens(llm: LLM, prompt: Prompt) -> tuple[list[int], list[str]]:
    """Prompt tokens and stop strings (the chat template's plus the request's); runs in a worker.
    Raises ApiError 400 for an empty prompt or messages the chat template cannot render."""
    try:
        return _prompt_tokens(llm, prompt)
    except (
        UnicodeEncodeError
    ) as exc:  # JSON may carry lone surrogates ("\udc80"), which no tokenizer takes
        raise ApiError(
            400,
            f"the prompt is not valid Unicode text: {exc.reason} at position {exc.start}",
            param=prompt.param,
            code="invalid_value",
        ) from None


def _prompt_tokens(llm: LLM, prompt: Prompt) -> tuple[list[int], list[str]]:
    stops = list(prompt.stops)
    if prompt.messages is not None:
        try:
            text, template_stops = llm.apply_chat_template(prompt.messages)
        except PromptCacheError as exc:
            raise ApiError(400, str(exc), param="messages", code="no_chat_template") from None
        except Exception as exc:  # noqa: BLE001 - a Jinja template may reject a conversation it cannot render
            raise ApiError(
                400, f"the chat template rejected these messages: {exc}", param="messages"
            ) from None
        tokens = llm.tokenize(text, add_bos=False, special=True)
        stops = template_stops + stops
    elif prompt.text is not None:
        tokens = llm.tokenize(prompt.text) if prompt.text else []
    else:
        tokens = list(prompt.tokens or [])
    if not tokens:
        raise ApiError(400, "the prompt is empty: give at least one token", param=prompt.param)
    return tokens, stops


def context_error(n_ctx: int, n_prompt: int, max_tokens: int, param: str) -> ApiError:
    """OpenAI's 400 context_length_exceeded, worded as OpenAI words it."""
    return ApiError(
        400,
        f"This model's maximum context length is {n_ctx} tokens. However, you requested "
        f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the completion). "
        "Please reduce the length of the prompt or of max_tokens.",
        param=param,
        code="context_length_exceeded",
    )


def completion_prompt(req: CompletionRequest, n_vocab: int) -> Prompt:
    """The prompt of /v1/completions: one text or one list of token ids in [0, n_vocab)."""
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(
                400,
                "send one prompt per request (batched prompts are not supported)",
                param="prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        return Prompt(text=prompt, stops=req.stops())
    if not prompt:
        raise ApiError(400, "the prompt is empty: give at least one token", param="prompt")
    if min(prompt) < 0 or max(prompt) >= n_vocab:
        raise ApiError(
            400, f"token ids must be in [0, {n_vocab})", param="prompt", code="invalid_value"
        )
    return Prompt(tokens=list(prompt), stops=req.stops())


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The request's messages as the chat template takes them."""
    # The chat templates of small models know system, user and assistant; OpenAI's "developer" is a system turn.
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
        for i, m in enumerate(req.messages)
    ]
