"""What a chat template is, as the rest of Stoker sees it.

A template turns OpenAI-style messages (plus tool definitions) into the exact prompt text a model was trained
on, says which strings and token ids end a reply, and parses a generated reply back into content, reasoning
and tool calls. Templates are pure string and token logic: no torch here.

Messages are dicts in OpenAI's shape: ``{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}``;
assistant messages may carry ``tool_calls`` (``[{"id", "type": "function", "function": {"name", "arguments"}}]``)
and ``reasoning_content``; tool messages may carry ``tool_call_id`` and ``name``. Content is always a string by
the time it reaches a template (the chat service flattens content parts and places image tokens).

A template's reply formats are two objects it holds: ``tools`` (a ``ToolFormat``) and ``thinking`` (a ``Thinking``
block, or None). Each owns its whole-text parse and the markers a streaming reply is watched for.
"""

from __future__ import annotations

import abc
from typing import Any

from stoker.templates.reasoning import Thinking
from stoker.templates.tools import ToolFormat, find_calls
from stoker.templates.types import Message, ParsedReply, Tool, ToolCall

__all__ = ["Message", "ParsedReply", "Template", "Thinking", "Tool", "ToolCall", "ToolFormat"]


class Template(abc.ABC):
    name: str
    description: str = ""
    default_system: str | None = None
    # Strings that end a reply; the engine cuts the text before them.
    stop_words: list[str] = []
    # The placeholder a vision family expects in text where an image goes, or None for text-only families.
    image_token: str | None = None
    eos_token: str = ""  # the tokenizer's eos as text, cut from a reply that still holds it
    tools: ToolFormat  # how tool definitions and calls are written, and how calls are found in a reply
    thinking: Thinking | None = None  # the reasoning block, for families that think before answering
    # Keep the reasoning of earlier assistant turns in the prompt (LLaMA-Factory's preserve_thinking); families that
    # think drop it by default, as their official templates do.
    preserve_thinking: bool = False

    @abc.abstractmethod
    def render(
        self,
        messages: list[Message],
        *,
        tools: list[Tool] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        continue_final_message: bool = False,
        variables: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text, BOS included as text where the family's template writes it.

        ``continue_final_message``: the prompt ends inside the last (assistant) message, so the model goes on
        writing it (see ``continued``). ``variables``: more template variables (vLLM's ``chat_template_kwargs``),
        which a Jinja template reads; built-in families read ``enable_thinking`` only."""

    @abc.abstractmethod
    def encode(
        self,
        tokenizer: Any,
        messages: list[Message],
        *,
        tools: list[Tool] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        continue_final_message: bool = False,
        variables: dict[str, Any] | None = None,
    ) -> list[int]:
        """Prompt token ids, identical to what the family's official template tokenizes to."""

    @abc.abstractmethod
    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Token ids that end a reply (eos and the family's end-of-turn tokens)."""

    @property
    def tool_call_markers(self) -> tuple[str, ...]:
        """Text that opens a tool call in a reply; empty when the format has none (then a call may start anywhere)."""
        return self.tools.markers

    @property
    def reasoning_markers(self) -> tuple[str, ...]:
        """The strings that open and close a reasoning block; empty for families that do not think aloud."""
        return self.thinking.markers if self.thinking is not None else ()

    def parse_reply(self, text: str, *, tools_given: bool = False) -> ParsedReply:
        """Split generated text into reasoning, content and tool calls. Invalid tool JSON stays plain content."""
        text = self.cut_stops(text)
        reasoning = None
        if self.thinking is not None:
            reasoning, text = self.thinking.split(text)
        calls: list[ToolCall] = []
        if tools_given:
            parsed = find_calls(self.tools, text)
            if parsed is not None:
                text, calls = parsed
        return ParsedReply(content=text, reasoning=reasoning, tool_calls=calls)

    def cut_stops(self, text: str) -> str:
        """Cut at the first stop word and at eos, in case the engine left them in the text."""
        for word in (*self.stop_words, self.eos_token):
            if word and word in text:
                text = text[: text.index(word)]
        return text


def continued(text: str, messages: list[Message]) -> str:
    """The rendered conversation cut right after the last message's text, as transformers' apply_chat_template does
    for ``continue_final_message``: what the template writes after it (end of turn) is dropped."""
    from stoker.errors import TemplateError

    final = messages[-1].get("content") if messages else None
    if not isinstance(final, str) or not messages or messages[-1].get("role") != "assistant":
        raise TemplateError("continue_final_message needs the conversation to end with an assistant message (the "
                            "text to continue).")
    for probe in (final, final.strip()):
        if probe and probe in text:
            return text[: text.rindex(probe) + len(probe)]
    raise TemplateError("continue_final_message: the chat template does not write the last message's text as it "
                        "is, so there is no place to continue it from.")
