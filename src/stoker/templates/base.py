"""What a chat template is, as the rest of Stoker sees it.

A template turns OpenAI-style messages (plus tool definitions) into the exact prompt text a model was trained
on, says which strings and token ids end a reply, and parses a generated reply back into content, reasoning
and tool calls. Templates are pure string and token logic: no torch here.

Messages are dicts in OpenAI's shape: ``{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}``;
assistant messages may carry ``tool_calls`` (``[{"id", "type": "function", "function": {"name", "arguments"}}]``)
and ``reasoning_content``; tool messages may carry ``tool_call_id`` and ``name``. Content is always a string by
the time it reaches a template (the chat service flattens content parts and places image tokens).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
Tool = dict[str, Any]  # OpenAI tool definition: {"type": "function", "function": {"name", "description", "parameters"}}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = ""


@dataclass
class ParsedReply:
    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


class Template(abc.ABC):
    name: str
    default_system: str | None = None
    # Strings that end a reply; the engine cuts the text before them.
    stop_words: list[str] = []
    # The placeholder a vision family expects in text where an image goes, or None for text-only families.
    image_token: str | None = None

    @abc.abstractmethod
    def render(
        self,
        messages: list[Message],
        *,
        tools: list[Tool] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> str:
        """The prompt text, BOS included as text where the family's template writes it."""

    @abc.abstractmethod
    def encode(
        self,
        tokenizer: Any,
        messages: list[Message],
        *,
        tools: list[Tool] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> list[int]:
        """Prompt token ids, identical to what the family's official template tokenizes to."""

    @abc.abstractmethod
    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Token ids that end a reply (eos and the family's end-of-turn tokens)."""

    @abc.abstractmethod
    def parse_reply(self, text: str, *, tools_given: bool = False) -> ParsedReply:
        """Split generated text into reasoning, content and tool calls. Invalid tool JSON stays plain content."""
