"""ChatFormat: messages into prompt text and tokens under a GGUF's chat template, or a plain fallback.

Owns rendering conversations (the model's Jinja template through llama-cpp-python's formatter; for a
GGUF without one, a role-prefixed format, logged once) and the tokens every next turn starts with;
never evaluates anything.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from promptcache.engines.llama_cpp.model import Model
from promptcache.engines.llama_cpp.plan import common_prefix

log = logging.getLogger(__name__)

# The fallback for a GGUF without `tokenizer.chat_template` (the gemma3-270m package's, for one):
# each message as "Role: content" on its own line, then "Assistant:" opens the reply; a reply ends
# where the model starts the user's next line.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOPS = ["\nUser:", "\nSystem:"]


def check_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` as a list. Raises ValueError unless it is a non-empty list of dicts with str
    'role' and str 'content'."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError("each message needs a str 'role' and a str 'content'")
    return list(messages)


class ChatFormat:
    """The chat format of `model`: its template, or FALLBACK_TEMPLATE when it has none."""

    def __init__(self, model: Model) -> None:
        self.model = model
        template = model.metadata.get("tokenizer.chat_template")
        self.fallback = not template
        self.template = template or FALLBACK_TEMPLATE
        self._formatters: dict[bool, Any] = {}
        self._warned = False

    def _formatter(self, generation_prompt: bool) -> Any:
        formatter = self._formatters.get(generation_prompt)
        if formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            m = self.model.handle
            bos = m.token_get_text(m.token_bos()) if m.token_bos() >= 0 else ""
            eos = m.token_get_text(m.token_eos()) if m.token_eos() >= 0 else ""
            formatter = Jinja2ChatFormatter(
                self.template, eos_token=eos, bos_token=bos, add_generation_prompt=generation_prompt
            )
            self._formatters[generation_prompt] = formatter
        return formatter

    def apply(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> tuple[str, list[str]]:
        """The prompt text for `messages` (with the assistant turn opened unless told otherwise) and
        the template's stop strings. continue_final_message: the text ends right after the final
        message's content, so the reply continues it (as vLLM and transformers cut it; it excludes
        add_generation_prompt). Raises ValueError for malformed messages, for both options at once or
        a final message the template does not reproduce, and whatever the template raises for a
        conversation it refuses."""
        messages = check_messages(messages)
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt cannot both be true: set "
                "add_generation_prompt to false to continue the final message"
            )
        if self.fallback and not self._warned:
            log.warning(
                "%s has no chat template; chat uses a plain 'Role: content' format",
                self.model.name,
            )
            self._warned = True
        formatted = self._formatter(add_generation_prompt)(messages=messages)
        text = formatted.prompt
        if continue_final_message:
            text = _cut_after_final(text, messages[-1]["content"])
        stop = formatted.stop
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if self.fallback:
            stops += FALLBACK_STOPS
        return text, stops

    def tokens(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """The prompt tokens for `messages` (the template writes any BOS itself)."""
        return self.render(messages, add_generation_prompt=add_generation_prompt)[0]

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
    ) -> tuple[list[int], list[str]]:
        """The prompt tokens for `messages` and the stop strings (apply, then tokenize: a template
        writes its own BOS; the fallback gets the model's, and so does add_special_tokens, as
        vLLM's chat adds the tokenizer's special tokens to the rendered text)."""
        text, stops = self.apply(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        add_bos = self.fallback or add_special_tokens
        return self.model.tokenize(text, add_bos=add_bos, special=True), stops

    def next_turn_prefix(self, messages: Sequence[dict[str, Any]], reply: str) -> list[int] | None:
        """The tokens every next turn of this chat starts with (prompt, reply, turn separator), found
        by rendering the template with two different next user messages; None when the template
        refuses the conversation."""
        if not reply:
            return None
        history = [*messages, {"role": "assistant", "content": reply}]
        try:
            a = self.tokens([*history, {"role": "user", "content": "A"}])
            b = self.tokens([*history, {"role": "user", "content": "B"}])
        except Exception as exc:  # noqa: BLE001 - a template may refuse the conversation: no read-ahead
            log.debug("no next-turn prefix: %s", exc)
            return None
        return a[: common_prefix(a, b)]


def _cut_after_final(text: str, final: str) -> str:
    """`text` cut right after the last place the final message's content appears (transformers'
    continue_final_message: a template that strips the content's spaces is followed, one that
    drops part of it is a ValueError)."""
    if final.strip() not in text:
        raise ValueError(
            "continue_final_message: the final message does not appear in the rendered chat "
            "(the chat template changes it)"
        )
    at = text.rindex(final.strip())
    kept = final.lstrip()
    if text[at : at + len(kept)] != kept:
        kept = final.strip()  # the template trimmed the content's trailing spaces
    return text[: at + len(kept)]


__all__ = ["ChatFormat", "FALLBACK_STOPS", "FALLBACK_TEMPLATE", "check_messages"]
