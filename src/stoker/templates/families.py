"""Families whose official templates carry logic a ``Layout`` cannot express. Each overrides as little as it can."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from typing import Any

from stoker.errors import TemplateError
from stoker.templates.base import Tool
from stoker.templates.conversation import Call, Turn
from stoker.templates.formats import ChatTemplate, join
from stoker.templates.tools import MistralFormat, checked, dumps


# ------------------------------------------------------------------------------------------------------------------
# Llama 3 / 3.1 / 4
# ------------------------------------------------------------------------------------------------------------------
class LlamaTemplate(ChatTemplate):
    """Meta's header/eot layout.

    ``date``: Llama 3.1's layout, which opens with a system turn carrying the knowledge cutoff and this date
    ("26 Jul 2024" is the official template's default when no date is passed; a fixed date keeps prompts
    reproducible). ``dated_with_tools_only``: ``llama3`` renders Llama 3's plain layout and switches to 3.1's when
    tools are given, because Llama 3 had no tool format. Tool definitions go into the first user message, the
    official default (``tools_in_user_message``).
    """

    def __init__(
        self,
        *args: Any,
        header: tuple[str, str],
        eot: str,
        trim: bool,
        date: str | None = None,
        dated_with_tools_only: bool = False,
        **kw: Any,
    ):
        super().__init__(*args, **kw)
        self.header, self.eot, self.date, self.trim = header, eot, date, trim
        self.dated_with_tools_only = dated_with_tools_only

    def turn(self, role: str, text: str) -> str:
        return f"{self.header[0]}{role}{self.header[1]}\n\n{text}{self.eot}"

    def _render(self, turns: list[Turn], tools: list[Tool], generate: bool, thinking: bool | None) -> str:
        dated = self.date is not None and (bool(tools) or not self.dated_with_tools_only)
        out = [self.bos_token]
        system = None
        if turns and turns[0].role == "system":
            system, turns = turns[0].content.strip(), turns[1:]
        if dated:
            env = "Environment: ipython\n" if tools else ""
            dates = f"Cutting Knowledge Date: December 2023\nToday Date: {self.date}\n\n"
            out.append(self.turn("system", env + dates + (system or "")))
        elif system is not None:
            env = "Environment: ipython\n" if tools else ""
            out.append(self.turn("system", env + system))
        if tools:
            if not turns:
                raise TemplateError(f"template {self.name!r} puts tool definitions in the first user message: add one.")
            first, turns = turns[0], turns[1:]
            out.append(self.turn("user", self.tools.definitions(tools) + first.content.strip()))
        for turn in turns:
            if turn.role == "tool":
                # The official templates `tojson` tool output (a string comes out quoted); so does Stoker.
                out.append(self.turn("ipython", json.dumps(turn.content, ensure_ascii=False)))
            elif turn.role == "assistant" and turn.tool_calls:
                out.append(self.tool_call_turn(turn))
            else:
                out.append(self.turn(turn.role, turn.content.strip() if self.trim else turn.content))
        if generate:
            out.append(f"{self.header[0]}assistant{self.header[1]}\n\n")
        return "".join(out)

    def tool_call_turn(self, turn: Turn) -> str:
        # Llama 3.1 writes only the call (the official template drops any text beside it).
        return self.turn("assistant", self.tools.calls(turn.tool_calls))


class Llama4Template(LlamaTemplate):
    def tool_call_turn(self, turn: Turn) -> str:
        calls = self.tools.calls(turn.tool_calls)
        return self.turn("assistant", "<|python_start|>" + turn.content + "<|python_end|>" + calls)


# ------------------------------------------------------------------------------------------------------------------
# Mistral
# ------------------------------------------------------------------------------------------------------------------
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")


def mistral_call_id(raw: str, fallback: str) -> str:
    """Mistral tokenizers require 9-character alphanumeric call ids; other ids (OpenAI's "call_...") are mapped to
    one deterministically, so a call and its result keep matching."""
    if _MISTRAL_ID.fullmatch(raw or ""):
        return raw
    return hashlib.sha256((raw or fallback).encode()).hexdigest()[:9]


class MistralTemplate(ChatTemplate):
    """Mistral's instruct layouts, one per tokenizer version, following mistral-common (Mistral's reference
    tokenizer, whose token-id goldens the tests replay) where it and the Hugging Face templates disagree:

    * several system messages are joined with a blank line;
    * v2+ put the system prompt (and the tool list) before the *last* user message; v1 before the first;
    * v2 drops tool calls and results that come before the last user message;
    * tool results that are JSON are re-serialized, other text is a JSON string (the HF templates paste the raw
      text, which is not valid JSON unless it already was).

    ``version``: "v1", "v2", "v3" (sentencepiece, spaces after control tokens), "v3t" (tekken, no spaces: Nemo,
    Ministral) or "v7t" (tekken with [SYSTEM_PROMPT]: Mistral Small 3).
    """

    def __init__(self, *args: Any, version: str, **kw: Any):
        super().__init__(*args, **kw)
        self.version = version
        self.sp = " " if version in ("v1", "v2", "v3") else ""
        if version != "v1":
            self.tools = MistralFormat(space=bool(self.sp), ids=version != "v2")

    @property
    def default_system(self) -> str | None:
        if self._default_system is None:
            return None
        # Mistral Small 3's official template writes today's date into its default system prompt.
        return self._default_system.replace("{today}", datetime.now().strftime("%Y-%m-%d"))

    @default_system.setter
    def default_system(self, value: str | None) -> None:
        self._default_system = value

    def _render(self, turns: list[Turn], tools: list[Tool], generate: bool, thinking: bool | None) -> str:
        if self.version == "v1":
            return self._render_v1(turns, tools)
        out = [self.bos_token]
        if self.version == "v7t":
            if not turns or turns[0].role != "system":
                out.append(f"[SYSTEM_PROMPT]{self.default_system}[/SYSTEM_PROMPT]")
            system = None
        else:
            parts = [t.content for t in turns if t.role == "system"]
            system = "\n\n".join(parts) if parts else None
            turns = [t for t in turns if t.role != "system"]
        users = [i for i, t in enumerate(turns) if t.role == "user"]
        last_user = users[-1] if users else -1
        ids = self._call_ids(turns)
        i = 0
        while i < len(turns):
            turn = turns[i]
            if self.version == "v2" and i < last_user and (turn.role == "tool" or turn.tool_calls):
                i += 1
                continue
            if turn.role == "system":
                out.append(f"[SYSTEM_PROMPT]{turn.content}[/SYSTEM_PROMPT]")
            elif turn.role == "user":
                if i == last_user and tools:
                    out.append(self._tool_list(tools))
                head = system + "\n\n" if (i == last_user and system) else ""
                out.append(f"[INST]{self.sp}{head}{turn.content}[/INST]")
            elif turn.role == "assistant":
                out.append(self._assistant(turn, ids[i]))
            elif self.version == "v2":
                end = i
                while end < len(turns) and turns[end].role == "tool":
                    end += 1
                items = [{"name": t.name or "", "content": _json_or_text(t.content)} for t in turns[i:end]]
                out.append(f"[TOOL_RESULTS] {dumps(items)}[/TOOL_RESULTS]")
                i = end
                continue
            else:
                out.append(self._tool_result(turn, ids[i]))
            i += 1
        return "".join(out)

    def _tool_list(self, tools: list[Tool]) -> str:
        if self.version == "v7t":
            return "[AVAILABLE_TOOLS]" + dumps(checked(tools)) + "[/AVAILABLE_TOOLS]"
        return self.tools.definitions(tools)

    def _assistant(self, turn: Turn, ids: list[str]) -> str:
        if turn.tool_calls:
            calls = [Call(c.name, c.arguments, c.parsed, ids[k], c.type) for k, c in enumerate(turn.tool_calls)]
            text = self.tools.calls(calls)
            # v2/v3 write text or calls, never both (the HF template keeps only the calls); v7 allows both.
            if self.version == "v7t":
                text = turn.content + text
            return text + self.eos_token
        if self.version == "v3t" or self.version == "v7t":
            return turn.content + self.eos_token
        return " " + turn.content.strip() + self.eos_token

    def _tool_result(self, turn: Turn, call_id: str) -> str:
        if self.version == "v7t":
            return f"[TOOL_RESULTS]{call_id}[TOOL_CONTENT]{turn.content}[/TOOL_RESULTS]"
        body = dumps({"content": _json_or_text(turn.content), "call_id": call_id})
        return f"[TOOL_RESULTS]{self.sp}{body}[/TOOL_RESULTS]"

    def _call_ids(self, turns: list[Turn]) -> list[Any]:
        """Per turn: the 9-character ids of an assistant's calls, or the id a tool result answers."""
        out: list[Any] = []
        pending: list[str] = []
        for i, turn in enumerate(turns):
            if turn.role == "assistant":
                ids = [mistral_call_id(c.id, f"{i}:{k}") for k, c in enumerate(turn.tool_calls)]
                pending = list(ids)
                out.append(ids)
            elif turn.role == "tool":
                if turn.tool_call_id:
                    call_id = mistral_call_id(str(turn.tool_call_id), "")
                else:
                    call_id = pending[0] if pending else mistral_call_id("", f"{i}:result")
                if call_id in pending:
                    pending.remove(call_id)
                out.append(call_id)
            else:
                out.append(None)
        return out

    def _render_v1(self, turns: list[Turn], tools: list[Tool]) -> str:
        # v1 has no tool tokens: tool definitions join the system prompt, results are user turns.
        parts = [t.content for t in turns if t.role == "system"]
        system = join("\n\n".join(parts) if parts else None, self.tools.definitions(tools) if tools else None)
        out = [self.bos_token]
        for turn in (t for t in turns if t.role != "system"):
            if turn.role == "assistant":
                calls = self.tools.calls(turn.tool_calls) if turn.tool_calls else None
                out.append(" " + (join(turn.content, calls, sep="\n") or "") + self.eos_token)
            else:
                head = system + "\n\n" if system else ""
                system = None
                out.append(f" [INST] {head}{turn.content} [/INST]")
        return "".join(out)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


# ------------------------------------------------------------------------------------------------------------------
# Qwen3
# ------------------------------------------------------------------------------------------------------------------
class Qwen3Template(ChatTemplate):
    """Qwen3: reasoning of assistant turns after the last real user query is kept as a <think> block (the last
    turn always gets one, empty if need be); earlier reasoning is dropped."""

    @staticmethod
    def last_query(turns: list[Turn]) -> int:
        """The last user turn that is a real query, not tool output passed back as a user message."""
        for i in range(len(turns) - 1, -1, -1):
            t = turns[i]
            wrapped_output = t.content.startswith("<tool_response>") and t.content.endswith("</tool_response>")
            if t.role == "user" and not wrapped_output:
                return i
        return len(turns) - 1

    def assistant(self, turn: Turn, index: int, turns: list[Turn]) -> str:
        content = turn.content
        reasoning = turn.reasoning
        if reasoning is None:
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        kept = self.preserve_thinking and bool(reasoning)
        if kept or (index > self.last_query(turns) and (index == len(turns) - 1 or reasoning)):
            text = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
        else:
            text = content
        for k, call in enumerate(turn.tool_calls):
            if k > 0 or content:
                text += "\n"
            text += self.tools.render_call(call)
        return f"<|im_start|>assistant\n{text}<|im_end|>\n"


# ------------------------------------------------------------------------------------------------------------------
# DeepSeek V3 / R1
# ------------------------------------------------------------------------------------------------------------------
class DeepSeekTemplate(ChatTemplate):
    """DeepSeek V3's layout: tool outputs sit between <｜tool▁outputs▁begin｜> and <｜tool▁outputs▁end｜>, and
    the reply after them continues without a new <｜Assistant｜>. Reasoning (</think>) is cut from history."""

    eot = "<｜end▁of▁sentence｜>"

    def _render(self, turns: list[Turn], tools: list[Tool], generate: bool, thinking: bool | None) -> str:
        systems = [t.content for t in turns if t.role == "system"]
        system = join("\n\n".join(systems) if systems else self.default_system,
                      self.tools.definitions(tools) if tools else None)
        out = [self.bos_token, system or ""]
        in_tool = False
        first_output = True
        for turn in turns:
            if turn.role == "user":
                in_tool = False
                out.append("<｜User｜>" + turn.content)
            elif turn.role == "assistant" and turn.tool_calls:
                if in_tool:
                    out.append("<｜tool▁outputs▁end｜>")
                in_tool = False
                out.append("<｜Assistant｜>" + turn.content + self.tools.calls(turn.tool_calls) + self.eot)
            elif turn.role == "assistant":
                content = turn.content
                if in_tool:
                    out.append("<｜tool▁outputs▁end｜>" + content + self.eot)
                    in_tool = False
                else:
                    answer = content.split("</think>")[-1]
                    reasoning = turn.reasoning if turn.reasoning is not None else (
                        content.split("</think>")[0].split("<think>")[-1].strip("\n") if "</think>" in content else "")
                    if self.preserve_thinking and reasoning:
                        answer = f"<think>\n{reasoning}\n</think>\n\n{answer.lstrip()}"
                    out.append("<｜Assistant｜>" + answer + self.eot)
            elif turn.role == "tool":
                if not in_tool:
                    first_output = True
                in_tool = True
                begin = "<｜tool▁outputs▁begin｜>" if first_output else ""
                first_output = False
                out.append(f"{begin}<｜tool▁output▁begin｜>{turn.content}<｜tool▁output▁end｜>")
        if in_tool:
            out.append("<｜tool▁outputs▁end｜>")
        elif generate:
            off = self.thinking.off if self.thinking is not None and thinking is False else ""
            out.append("<｜Assistant｜>" + off)
        return "".join(out)


# ------------------------------------------------------------------------------------------------------------------
# DBRX, GLM
# ------------------------------------------------------------------------------------------------------------------
class DbrxTemplate(ChatTemplate):
    """DBRX joins turns with a newline instead of ending each with one: no newline after the last turn."""

    def _render(self, turns: list[Turn], tools: list[Tool], generate: bool, thinking: bool | None) -> str:
        text = super()._render(turns, tools, generate, thinking)
        return text if generate else text.removesuffix("\n")


class GlmTemplate(ChatTemplate):
    """GLM-4 / ChatGLM3 write each tool call as its own assistant turn: <|assistant|>name\\n{arguments}."""

    def assistant(self, turn: Turn, index: int, turns: list[Turn]) -> str:
        if not turn.tool_calls:
            return super().assistant(turn, index, turns)
        text = f"<|assistant|>\n{turn.content}" if turn.content else ""
        return text + "".join("<|assistant|>" + self.tools.render_call(c) for c in turn.tool_calls)

