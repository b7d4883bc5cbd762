"""From generated text to an OpenAI assistant message: content, reasoning and tool calls, whole or streamed.

The model's text is parsed by the chat template (``ChatService.parse``). On top of that the API applies the
request's rules:

- ``tool_choice``: ``none`` renders no tools and parses none; ``auto`` parses whatever the model called; ``required``
  and a named function are asked for in the prompt and checked here. A reply whose calls name a function the request
  did not offer (or not the one it forced) is not a tool call: it is returned as plain content with finish reason
  ``stop``, never an error.
- ``response_format: json_object``: the reply must hold one JSON object (a code fence around it is removed).

``ReplyStreamer`` gives the same result in pieces: reasoning and content stream as the template parses them, while
the text cannot be the start of a tool call; from the first tool-call marker on, the rest is held and resolved when
the choice ends.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from stoker.errors import StokerError
from stoker.templates.base import ParsedReply, ToolCall

ToolMode = Literal["none", "auto", "required", "named"]
Parse = Callable[..., ParsedReply]

# Strings that open a tool call or a reasoning block in the families Stoker knows. A template may name its own
# (``tool_call_markers`` / ``reasoning_markers``); these cover the rest. Held-back text is resolved at the end of the
# choice, so a false alarm only delays text, it never changes it.
TOOL_CALL_MARKERS = (
    "<tool_call>",
    "<tool_calls>",
    "[TOOL_CALLS]",
    "<|python_tag|>",
    "<function=",
    "<|tool_call|>",
    "<|tool_calls_section_begin|>",
    "<｜tool▁calls▁begin｜>",
    "✿FUNCTION✿",
    "functools[",
    '{"name"',
    '[{"name"',
)
REASONING_MARKERS = ("<think>", "</think>")


class InvalidOutputError(StokerError):
    """The model's reply breaks a rule the request set (e.g. ``response_format: json_object``)."""

    http_status = 422
    error_type = "invalid_response_error"


@dataclass
class ToolPolicy:
    mode: ToolMode = "none"
    tools: list[dict[str, Any]] = field(default_factory=list)  # as rendered into the prompt
    forced: str | None = None  # the named function of tool_choice
    parallel: bool = True

    @property
    def active(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}


@dataclass
class Reply:
    content: str | None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"


def resolve_reply(parse: Parse, text: str, finish_reason: str, policy: ToolPolicy, json_mode: bool) -> Reply:
    """The final assistant message for one choice's whole generated text."""
    parsed = parse(text, tools_given=policy.active)
    calls = list(parsed.tool_calls) if policy.active and finish_reason == "stop" else []
    if calls and _acceptable(calls, policy):
        if not policy.parallel:
            calls = calls[:1]
        for call in calls:
            call.id = call.id or f"call_{uuid.uuid4().hex[:24]}"
        # OpenAI ends a call the request forced by name with "stop"; only calls the model chose end with "tool_calls".
        return Reply(parsed.content or None, parsed.reasoning or None, calls, "stop" if policy.forced else "tool_calls")
    if parsed.tool_calls:
        # Not a call this request allows: the model's text is the answer. Re-parse without tools so reasoning is
        # still split off but the call markup stays in the content.
        parsed = parse(text, tools_given=False)
    content = parsed.content
    if json_mode and finish_reason == "stop":
        content = json_object_text(content)
    return Reply(content, parsed.reasoning or None, [], finish_reason)


def _acceptable(calls: Sequence[ToolCall], policy: ToolPolicy) -> bool:
    allowed = {policy.forced} if policy.forced else policy.names
    for call in calls:
        if call.name not in allowed:
            return False
        try:
            if not isinstance(json.loads(call.arguments or "{}"), dict):
                return False
        except json.JSONDecodeError:
            return False
    return True


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


def json_object_text(text: str) -> str:
    """The reply as the text of one JSON object, or ``InvalidOutputError`` saying why it is not one."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        problem = f"it is not valid JSON ({exc.msg} at position {exc.pos})"
    else:
        if isinstance(value, dict):
            return body
        problem = f"it is JSON but a {type(value).__name__}, not an object"
    shown = text if len(text) <= 200 else text[:200] + "..."
    raise InvalidOutputError(
        f"response_format is json_object, but the model's reply is not a JSON object: {problem}. The reply was "
        f"{shown!r}. Ask for JSON more explicitly in the messages, or drop response_format to get the raw text.",
        param="response_format",
        code="invalid_json_output",
    )


def tool_call_dicts(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def stream_markers(template: Any, policy: ToolPolicy) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """(reasoning markers, tool-call markers) of the template; the latter empty without tools in play.

    Tool-call markers None means "hold everything": the template's tool format has no marker (GLM's bare
    "name\n{args}"). Templates name their markers; the fallbacks cover templates that do not.
    """
    reasoning = getattr(template, "reasoning_markers", None)
    reasoning = REASONING_MARKERS if reasoning is None else tuple(reasoning)
    if not policy.active:
        return reasoning, ()
    tools = getattr(template, "tool_call_markers", None)
    tools = TOOL_CALL_MARKERS if tools is None else tuple(tools)
    return reasoning, tools or None


def reasoning_prefix(template: Any, prompt_tail: str) -> str:
    """The reasoning opener when the prompt itself opened the block (DeepSeek-R1 style), else "".

    Such a reply starts inside the block; parsing it with the opener in front lets a streamed reply show as
    reasoning from its first token, and changes nothing for the whole reply (the closer decides there).
    """
    markers = tuple(getattr(template, "reasoning_markers", None) or ())
    if markers and prompt_tail.rstrip().endswith(markers[0]):
        return markers[0]
    return ""


# --------------------------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ReplyDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


class ReplyStreamer:
    """One choice's text in, OpenAI message deltas out, adding up to what ``resolve_reply`` gives for the whole text.

    Reasoning and content are what the template's parser makes of the text so far, sent as they grow; trailing
    whitespace, and a tail that could grow into a marker, wait for the text that follows. From the first tool-call
    marker on, everything is held and resolved when the choice ends. ``tool_markers=None`` or ``json_mode`` hold
    everything to the end (JSON mode checks the whole reply before any of it is sent).
    """

    def __init__(
        self,
        parse: Parse,
        policy: ToolPolicy,
        *,
        reasoning_markers: Sequence[str] = (),
        tool_markers: Sequence[str] | None = (),
        json_mode: bool = False,
    ):
        self._parse = parse
        self._policy = policy
        self._json_mode = json_mode
        self._tool_markers = tuple(m for m in tool_markers or () if m)
        self._all_markers = self._tool_markers + tuple(m for m in reasoning_markers if m)
        self._longest = max((len(m) for m in self._all_markers), default=0)
        self._text = ""
        self._sent_content = ""
        self._sent_reasoning = ""
        self._holding = json_mode or tool_markers is None

    def push(self, text: str) -> ReplyDelta:
        self._text += text
        if self._holding or not text:
            return ReplyDelta()
        found = [i for i in (self._text.find(m) for m in self._tool_markers) if i >= 0]
        if found:
            self._holding = True
            visible = self._text[: min(found)]
        else:
            visible = self._text[: len(self._text) - self._partial_marker(self._text)]
        if not visible:
            return ReplyDelta()
        parsed = self._parse(visible, tools_given=False)
        # Trailing whitespace waits for what follows: tool formats trim it from the text before a call.
        return ReplyDelta(
            content=self._grow("_sent_content", (parsed.content or "").rstrip()),
            reasoning=self._grow("_sent_reasoning", (parsed.reasoning or "").rstrip()),
        )

    def finish(self, finish_reason: str) -> tuple[ReplyDelta, str]:
        """The rest of the message and the choice's finish reason. Raises ``InvalidOutputError`` in JSON mode."""
        reply = resolve_reply(self._parse, self._text, finish_reason, self._policy, self._json_mode)
        rest = ReplyDelta(
            content=self._grow("_sent_content", reply.content or ""),
            reasoning=self._grow("_sent_reasoning", reply.reasoning or ""),
            tool_calls=reply.tool_calls,
        )
        return rest, reply.finish_reason

    def _grow(self, attr: str, now: str) -> str:
        """The new end of ``now`` if it extends what was sent. Otherwise nothing: what was sent cannot be taken
        back (a template that rewrites earlier text once later text arrives would do that)."""
        sent = getattr(self, attr)
        if len(now) <= len(sent) or not now.startswith(sent):
            return ""
        setattr(self, attr, now)
        return now[len(sent) :]

    def _partial_marker(self, text: str) -> int:
        """Length of the longest tail of ``text`` that could grow into a marker."""
        for size in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-size:]
            if any(m.startswith(tail) for m in self._all_markers):
                return size
        return 0
