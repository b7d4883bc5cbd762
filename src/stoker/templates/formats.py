"""The built-in template engine: a family is a ``Layout`` (format strings per role) plus a few settings.

Most families are fully described by their layout. The few whose official templates have real logic (Llama 3.1
tools, Mistral's tokenizer versions, Qwen3 reasoning, DeepSeek tool blocks) subclass ``ChatTemplate`` in
``families.py`` and override one hook each.

Format strings use ``{content}``, ``{system}``, ``{bos}`` and ``{eos}``. ``{bos}``/``{eos}`` are the tokenizer's
tokens as text, exactly as official Jinja templates write ``bos_token``/``eos_token``; tokens a family's template
writes literally (``<|im_end|>``) are literal here too.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stoker.templates.base import Message, Template, Tool, continued
from stoker.templates.conversation import Turn, normalize
from stoker.templates.reasoning import Thinking
from stoker.templates.tools import FORMATS, ToolFormat

_SLOT = re.compile(r"\{(content|system|bos|eos)\}")


def fill(fmt: str, **values: str) -> str:
    """Substitute slots in one pass, so text inside ``content`` is never itself treated as a slot."""
    return _SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), fmt)


def join(*parts: str | None, sep: str = "\n\n") -> str | None:
    """Non-empty parts joined by ``sep``; None when every part is None."""
    if all(p is None for p in parts):
        return None
    return sep.join(p for p in parts if p)


@dataclass(frozen=True)
class Layout:
    prefix: str = ""  # written once, before everything
    system: str | None = "{content}"  # None: no system turn; the system text is folded into the first user turn
    fold: str = "{system}\n\n{content}"  # how a folded system prompt joins the first user message
    fold_then_strip: bool = False  # trim the folded text as a whole (Llama 2) instead of only the user's part (Gemma 3)
    user: str = "{content}"
    assistant: str = "{content}"  # a whole assistant turn, header and end-of-turn included
    generation: str = ""  # what add_generation_prompt appends
    tool: str | None = None  # one tool result; None renders it as a user turn (LLaMA-Factory's observation default)
    tool_open: str = ""  # around each run of consecutive tool results (Qwen wraps them in one user turn)
    tool_close: str = ""
    strip: frozenset[str] = frozenset()  # roles whose content the official template trims (Jinja's |trim)
    skip_empty_system: bool = False  # an empty system message renders nothing (Phi-3.5)


@dataclass(frozen=True)
class Official:
    """An official template in ``shared/chat_templates`` this family is proven byte-identical against.

    ``aspects`` limits the comparison (None: every case). ``deviations`` maps an aspect (or "a+b": cases with
    both) to the reason Stoker renders it differently on purpose; the tests skip those cases with that reason and
    check the difference is real. Aspects: system, no_system, closed, text, tools, tool_calls, parallel_calls,
    thinking_on, thinking_off, whitespace, reasoning. ``arguments`` is how tool-call arguments are handed to the
    official template ("object", Hugging Face's convention, or "text" for templates that concatenate them).
    """

    file: str
    aspects: frozenset[str] | None = None
    deviations: Mapping[str, str] = field(default_factory=dict)
    arguments: str = "object"


class ChatTemplate(Template):
    """A built-in template. Instances are immutable family descriptions; ``bind`` makes a copy with a tokenizer's
    bos/eos text and stop ids."""

    def __init__(
        self,
        name: str,
        layout: Layout,
        *,
        description: str,
        default_system: str | None = None,
        stop_words: Sequence[str] = (),
        tool_format: str | ToolFormat = "default",
        thinking: Thinking | None = None,
        image_token: str | None = None,
        bos: str = "",
        eos: str = "",
        official: Sequence[Official] = (),
        tokenizer_specials: bool = False,
    ):
        self.name = name
        self.layout = layout
        self.description = description
        self.default_system = default_system
        self.stop_words = list(stop_words)
        self.tools = FORMATS[tool_format] if isinstance(tool_format, str) else tool_format
        self.thinking = thinking
        self.image_token = image_token
        self.bos_token = bos
        self.eos_token = eos
        self.official = tuple(official)
        self.extra_stop_ids: list[int] = []
        # True: encode lets the tokenizer add its own special tokens (BOS) instead of the layout writing them.
        self.tokenizer_specials = tokenizer_specials

    def __repr__(self) -> str:
        return f"<template {self.name}>"

    def bind(self, tokenizer: Any | None, *, extra_stop_ids: Sequence[int] = ()) -> ChatTemplate:
        """A copy writing this tokenizer's bos/eos text (what its Jinja template sees as bos_token/eos_token)."""
        new = copy.copy(self)
        if tokenizer is not None:
            new.bos_token = getattr(tokenizer, "bos_token", None) or ""
            new.eos_token = getattr(tokenizer, "eos_token", None) or ""
        new.extra_stop_ids = list(dict.fromkeys([*self.extra_stop_ids, *extra_stop_ids]))
        return new

    # --- Template API --------------------------------------------------------------------------------------------
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
        turns = normalize(messages, image_token=self.image_token)
        if continue_final_message:
            return continued(self._render(turns, list(tools or []), False, enable_thinking), messages)
        return self._render(turns, list(tools or []), add_generation_prompt, enable_thinking)

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
        # Exactly what transformers' apply_chat_template(tokenize=True) does with the official template: the text
        # already holds BOS where the family writes it, so the tokenizer must not add another.
        text = self.bind(tokenizer).render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
            continue_final_message=continue_final_message,
        )
        return list(tokenizer.encode(text, add_special_tokens=self.tokenizer_specials))

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        ids: list[int] = []
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            ids.append(eos)
        for word in self.stop_words:
            token_id = single_token_id(tokenizer, word)
            if token_id is not None:
                ids.append(token_id)
        ids += self.extra_stop_ids
        return list(dict.fromkeys(ids))

    # --- rendering hooks -----------------------------------------------------------------------------------------
    def fill(self, fmt: str, **values: str) -> str:
        return fill(fmt, bos=self.bos_token, eos=self.eos_token, **values)

    def strip(self, role: str, text: str) -> str:
        return text.strip() if role in self.layout.strip else text

    def take_system(self, turns: list[Turn]) -> tuple[str | None, list[Turn]]:
        """The system prompt (a leading system message, else the default) and the turns after it."""
        if turns and turns[0].role == "system":
            return turns[0].content, turns[1:]
        return self.default_system, turns

    def system_text(self, system: str | None, tools: list[Tool]) -> str | None:
        return join(system, self.tools.definitions(tools) if tools else None)

    def _render(self, turns: list[Turn], tools: list[Tool], generate: bool, thinking: bool | None) -> str:
        lay = self.layout
        system, turns = self.take_system(turns)
        system = self.system_text(system, tools)
        out = [self.fill(lay.prefix)]
        fold: str | None = None
        if system is not None:
            if lay.system is None:
                fold = system
            elif system or not lay.skip_empty_system:
                out.append(self.fill(lay.system, content=self.strip("system", system)))
        i = 0
        while i < len(turns):
            turn = turns[i]
            if turn.role == "tool":
                end = i
                while end < len(turns) and turns[end].role == "tool":
                    end += 1
                out.append(self.tool_results(turns[i:end]))
                i = end
                continue
            if turn.role == "system":
                if lay.system is None:
                    fold = join(fold, turn.content)
                elif turn.content or not lay.skip_empty_system:
                    out.append(self.fill(lay.system, content=self.strip("system", turn.content)))
            elif turn.role == "user":
                out.append(self.fill(lay.user, content=self.user_content(turn, fold)))
                fold = None
            else:
                out.append(self.assistant(turn, i, turns))
            i += 1
        if generate:
            out.append(self.generation(thinking))
        return "".join(out)

    def user_content(self, turn: Turn, fold: str | None) -> str:
        if fold is None:
            return self.strip("user", turn.content)
        if self.layout.fold_then_strip:
            return self.strip("user", fill(self.layout.fold, system=fold, content=turn.content))
        return fill(self.layout.fold, system=fold, content=self.strip("user", turn.content))

    def assistant(self, turn: Turn, index: int, turns: list[Turn]) -> str:
        content = turn.content
        if turn.tool_calls:
            content = join(content, self.tools.calls(turn.tool_calls), sep=self.tools.joiner) or ""
        return self.fill(self.layout.assistant, content=self.strip("assistant", content))

    def tool_results(self, run: list[Turn]) -> str:
        lay = self.layout
        fmt = lay.tool if lay.tool is not None else lay.user
        return lay.tool_open + "".join(self.fill(fmt, content=t.content) for t in run) + lay.tool_close

    def generation(self, thinking: bool | None) -> str:
        off = self.thinking.off if self.thinking is not None and thinking is False else ""
        return self.fill(self.layout.generation) + off



def single_token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` when it is one token of the vocabulary (not the unknown token), else None."""
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is None or not token:
        return None
    try:
        token_id = convert(token)
    except Exception:  # noqa: BLE001 - tokenizers differ in how they refuse unknown tokens
        return None
    if not isinstance(token_id, int) or token_id < 0:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and token_id == unk and token != getattr(tokenizer, "unk_token", None):
        return None
    return token_id
