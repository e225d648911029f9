"""Prompts of the server: what a request asks to evaluate (text, token ids or chat messages) and its tokens.

Owns the request -> Prompt -> tokens steps shared by generation and sessions; never runs a model
past tokenizing and never touches HTTP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from promptcache.engines.llama_cpp import LLM
from promptcache.errors import PromptCacheError
from promptcache.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatTemplateFields,
    CompletionRequest,
    message_text,
)


@dataclass
class Prompt:
    """What a worker turns into prompt tokens: text, token ids, or chat messages (and user stop
    strings). Chat messages are rendered as vLLM renders them: add_generation_prompt opens the
    reply, continue_final_message ends the text inside the final message; add_special_tokens adds
    the tokenizer's BOS (None: the endpoint's default, yes for text and no for messages)."""

    text: str | None = None
    tokens: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    stops: list[str] = field(default_factory=list)
    param: str = "prompt"
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None

    @property
    def opens_reply(self) -> bool:
        """Whether the prompt opens a new assistant turn (so a reply's next turn can be read ahead)."""
        return self.add_generation_prompt and not self.continue_final_message


def prompt_tokens(llm: LLM, prompt: Prompt) -> tuple[list[int], list[str]]:
    """Prompt tokens and stop strings (the chat template's plus the request's); runs in a worker.
    Raises ApiError 400 for an empty prompt or messages the chat template cannot render."""
    tokens, stops = render_prompt(llm, prompt)
    if not tokens:
        raise ApiError(400, "the prompt is empty: give at least one token", param=prompt.param)
    return tokens, stops


def render_prompt(llm: LLM, prompt: Prompt) -> tuple[list[int], list[str]]:
    """The tokens a generation evaluates for `prompt` (none for an empty text) and the stop strings:
    the one rendering /v1/*/completions, /tokenize and the render endpoints share. Runs on any thread
    (it reads only the vocabulary and the chat template). Raises ApiError 400 for messages the chat
    template cannot render."""
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
            tokens, template_stops = llm.chat_format.render(
                prompt.messages,
                add_generation_prompt=prompt.add_generation_prompt,
                continue_final_message=prompt.continue_final_message,
                add_special_tokens=bool(prompt.add_special_tokens),
            )
        except PromptCacheError as exc:
            raise ApiError(400, str(exc), param="messages", code="no_chat_template") from None
        except Exception as exc:  # noqa: BLE001 - a Jinja template may reject a conversation it cannot render
            raise ApiError(
                400, f"the chat template rejected these messages: {exc}", param="messages"
            ) from None
        stops = template_stops + stops
    elif prompt.text is not None:
        add_bos = prompt.add_special_tokens is not False
        tokens = llm.tokenize(prompt.text, add_bos=add_bos) if prompt.text else []
    else:
        tokens = list(prompt.tokens or [])
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


def chat_prompt(req: ChatTemplateFields) -> Prompt:
    """The Prompt of a conversation (a chat completion, or its /tokenize or render); a 400 naming
    continue_final_message when add_generation_prompt is true too (vLLM refuses the pair)."""
    if req.continue_final_message and req.add_generation_prompt:
        raise ApiError(
            400,
            "continue_final_message needs add_generation_prompt: false (the reply either continues "
            "the final message or opens a new one)",
            param="continue_final_message",
            code="invalid_value",
        )
    return Prompt(
        messages=chat_messages(req),
        stops=req.stops() if isinstance(req, ChatCompletionRequest) else [],
        param="messages",
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        add_special_tokens=req.add_special_tokens,
    )


def chat_messages(req: ChatTemplateFields) -> list[dict[str, str]]:
    """The request's messages as the chat template takes them."""
    # The chat templates of small models know system, user and assistant; OpenAI's "developer" is a system turn.
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
        for i, m in enumerate(req.messages)
    ]


def logit_bias(req: CompletionRequest | ChatCompletionRequest, n_vocab: int) -> dict[int, float]:
    """The request's logit_bias as {token id: bias}; a key that is no token id, or a bias outside
    [-100, 100], is a 400 naming it."""
    out: dict[int, float] = {}
    for key, bias in (req.logit_bias or {}).items():
        if not key.strip().isdigit() or not 0 <= int(key) < n_vocab:
            raise ApiError(
                400,
                f"logit_bias keys are token ids in [0, {n_vocab}), not {key!r}",
                param="logit_bias",
                code="invalid_value",
            )
        if not -100 <= bias <= 100:
            raise ApiError(
                400,
                "logit_bias values must be in [-100, 100]",
                param="logit_bias",
                code="invalid_value",
            )
        out[int(key)] = bias
    return out


def response_grammar(response_format: dict[str, Any] | None) -> str | None:
    """The llama.cpp grammar (GBNF) for a response_format, as llama-cpp-python's server builds it:
    any JSON object for json_object (or its "schema" when given), the schema's grammar for
    json_schema; None for text. Anything else is a 400 naming response_format."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if not response_format:
        return None
    kind = response_format.get("type")
    schema: Any = None
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        if schema is None:
            return JSON_GBNF
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(
                400,
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                param="response_format",
                code="invalid_value",
            )
    else:
        raise ApiError(
            400,
            f"response_format type {kind!r} is not supported: use text, json_object or json_schema",
            param="response_format",
            code="unsupported_parameter",
        )
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001 - the converter raises bare exceptions on schemas it cannot express
        raise ApiError(
            400,
            f"this JSON schema cannot be turned into a grammar: {exc}",
            param="response_format",
            code="invalid_value",
        ) from None
