"""From generated text to an assistant message: content, reasoning and tool calls, whole or as the text streams.

The model's text is parsed by the chat template, whose formats own the details: the tool format finds calls (and
says where one begins), the reasoning format splits off the thinking block. On top of that a request sets rules:

- tools (``ToolPolicy``): ``none`` renders no tools and parses none; ``auto`` parses whatever the model called;
  ``required`` and a named function are asked for in the prompt and decoded under a grammar (``tool_constraint``):
  one call in the template's own tool format. A reply whose calls name a function the request did not offer (or
  not the one it forced) is not a tool call: it is returned as plain content with finish reason ``stop``.

``ReplyParser`` is the one way every surface reads a reply: fed one choice's text deltas, it yields content and
reasoning as they can be shown, and on ``finish`` the rest plus the whole ``Reply``. The pieces add up to exactly
what the whole text resolves to, so a generation reads the same in the terminal, the browser, the API and predict.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from stoker.engines.stops import held_tail
from stoker.engines.structured import StructuredOutput
from stoker.errors import RequestError
from stoker.templates.base import Template
from stoker.templates.tools import ToolFormat, wrapped
from stoker.templates.types import ParsedReply, Tool, ToolCall

ToolMode = Literal["none", "auto", "required", "named"]
Parse = Callable[..., ParsedReply]  # (text, *, tools_given) -> ParsedReply, the template's parse_reply


@dataclass(frozen=True)
class ToolPolicy:
    mode: ToolMode = "none"
    tools: list[Tool] = field(default_factory=list)  # as rendered into the prompt
    forced: str | None = None  # the named function of tool_choice
    parallel: bool = True

    @property
    def active(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}


NO_TOOLS = ToolPolicy()


def tool_policy(tools: Sequence[Tool], choice: str | None = None, *, forced: str | None = None,
                parallel: bool = True) -> ToolPolicy:
    """The policy for a request's ``tools`` and ``tool_choice`` (``none``, ``auto``, ``required``, or a function's
    name in ``forced``); ``RequestError`` for combinations that cannot work."""
    tools = [wrapped(t, i) for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise RequestError(f"tools name the same function more than once: {dupes}; give each a unique name.",
                           param="tools")
    if (choice is not None and choice != "none" or forced is not None) and not tools:
        raise RequestError("tool_choice is set but no tools were given: send tools, or drop tool_choice.",
                           param="tool_choice")
    if choice == "none" or not tools:
        return NO_TOOLS
    if forced is not None:
        if forced not in names:
            raise RequestError(f"tool_choice names the function {forced!r}, which is not among the tools: {names}.",
                               param="tool_choice")
        # Only the forced function is shown to the model: nothing else may be called.
        return ToolPolicy("named", [t for t in tools if t["function"]["name"] == forced], forced=forced,
                          parallel=parallel)
    return ToolPolicy("required" if choice == "required" else "auto", tools, parallel=parallel)


REQUIRED_NOTE = "Answer by calling one or more of the provided tools."
NAMED_NOTE = "Answer by calling the tool {name!r}."
JSON_NOTE = "Reply with one valid JSON object and nothing else."


def system_notes(policy: ToolPolicy, json_mode: bool) -> str:
    """What the system prompt adds so the model can follow the request's rules ("" when there are none)."""
    notes = []
    if policy.mode == "required":
        notes.append(REQUIRED_NOTE)
    elif policy.mode == "named":
        notes.append(NAMED_NOTE.format(name=policy.forced))
    if json_mode:
        notes.append(JSON_NOTE)
    return " ".join(notes)


def tool_constraint(policy: ToolPolicy, tool_format: ToolFormat) -> StructuredOutput | None:
    """The shape a forced call is decoded in: one call, written in the model's own tool format (the one it was
    tuned on), to the named function or, for ``required``, to one of the offered functions, with arguments valid
    against the function's parameters schema. None when nothing is forced, or when the format does not write the
    arguments as one JSON object (then the prompt's instruction alone asks for the call)."""
    if policy.mode not in ("named", "required") or not policy.tools:
        return None
    frames = []
    for tool in policy.tools:
        function = tool["function"]
        frame = tool_format.call_frame(function["name"])
        if frame is None:
            return None
        schema = StructuredOutput.json_schema(function.get("parameters") or {"type": "object"},
                                              param=f"tools[{function['name']}].function.parameters")
        frames.append((frame[0], schema.spec, frame[1]))
    from stoker.engines.grammar import framed_json_grammar

    return StructuredOutput("grammar", framed_json_grammar(frames), "tool_choice")


@dataclass
class Reply:
    content: str | None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"


@dataclass
class ReplyDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


@dataclass(frozen=True)
class ReplyRules:
    """How one request's replies are read: the template's parser and formats, and the request's rules."""

    parse: Parse  # the template's reply parser, seeing the reply as the template does
    tool_format: ToolFormat
    reasoning_markers: tuple[str, ...] = ()
    policy: ToolPolicy = NO_TOOLS

    def parser(self) -> ReplyParser:
        return ReplyParser(self)

    def reply(self, text: str, finish_reason: str) -> Reply:
        """The final assistant message for one choice's whole generated text."""
        policy = self.policy
        parsed = self.parse(text, tools_given=policy.active)
        calls = list(parsed.tool_calls) if policy.active and finish_reason == "stop" else []
        if calls and _acceptable(calls, policy):
            if not policy.parallel:
                calls = calls[:1]
            for call in calls:
                call.id = call.id or f"call_{uuid.uuid4().hex[:24]}"
            # OpenAI ends a call the request forced by name with "stop"; only calls the model chose end "tool_calls".
            reason = "stop" if policy.forced else "tool_calls"
            return Reply(parsed.content or None, parsed.reasoning or None, calls, reason)
        if parsed.tool_calls:
            # Not a call this request allows: the model's text is the answer. Re-parse without tools so reasoning is
            # still split off but the call markup stays in the content.
            parsed = self.parse(text, tools_given=False)
        return Reply(parsed.content, parsed.reasoning or None, [], finish_reason)


class ReplyParser:
    """One choice's text deltas in, reply deltas out, adding up to what ``ReplyRules.reply`` gives the whole text.

    Reasoning and content are what the template's parser makes of the text so far, sent as they grow; trailing
    whitespace, and a tail that could grow into a marker, wait for the text that follows. From where the tool format
    says a call begins, everything is held and resolved when the choice ends. JSON mode holds everything to the end
    (it checks the whole reply before any of it is sent).
    """

    def __init__(self, rules: ReplyRules):
        self._rules = rules
        active = rules.policy.active
        self._tools = rules.tool_format if active else None
        tool_markers = rules.tool_format.markers if active else ()
        self._markers = tuple(m for m in (*tool_markers, *rules.reasoning_markers) if m)
        self._text = ""
        self._sent_content = ""
        self._sent_reasoning = ""
        self._holding = False

    @property
    def text(self) -> str:
        """The choice's text so far, as generated."""
        return self._text

    def push(self, text: str) -> ReplyDelta:
        self._text += text
        if self._holding or not text:
            return ReplyDelta()
        start = self._tools.call_start(self._text) if self._tools is not None else None
        if start is not None:
            self._holding = True
            visible = self._text[:start]
        else:
            visible = self._text[: len(self._text) - held_tail(self._text, self._markers)]
        if not visible:
            return ReplyDelta()
        parsed = self._rules.parse(visible, tools_given=False)
        # Trailing whitespace waits for what follows: tool formats trim it from the text before a call.
        return ReplyDelta(
            content=self._grow("_sent_content", (parsed.content or "").rstrip()),
            reasoning=self._grow("_sent_reasoning", (parsed.reasoning or "").rstrip()),
        )

    def finish(self, finish_reason: str) -> tuple[ReplyDelta, Reply]:
        """The rest of the message and the whole reply."""
        reply = self._rules.reply(self._text, finish_reason)
        rest = ReplyDelta(
            content=self._grow("_sent_content", reply.content or ""),
            reasoning=self._grow("_sent_reasoning", reply.reasoning or ""),
            tool_calls=reply.tool_calls,
        )
        return rest, reply

    def _grow(self, attr: str, now: str) -> str:
        """The new end of ``now`` if it extends what was sent. Otherwise nothing: what was sent cannot be taken
        back (a template that rewrites earlier text once later text arrives would do that)."""
        sent = getattr(self, attr)
        if len(now) <= len(sent) or not now.startswith(sent):
            return ""
        setattr(self, attr, now)
        return now[len(sent) :]


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


def check_json_mode(messages: Sequence[Any]) -> None:
    """OpenAI's rule for JSON mode: a model not told to write JSON may emit whitespace forever when forced into it."""
    if "json" not in json.dumps([m.get("content") for m in messages], ensure_ascii=False).lower():
        raise RequestError(
            "response_format json_object needs the word 'JSON' in the messages: ask the model for JSON there.",
            param="messages",
        )


def tool_call_dicts(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def reasoning_prefix(template: Template, prompt_tail: str) -> str:
    """The reasoning opener when the prompt itself opened the block (DeepSeek-R1 style), else "".

    Such a reply starts inside the block; parsing it with the opener in front lets a streamed reply show as
    reasoning from its first token, and changes nothing for the whole reply (the closer decides there).
    """
    markers = template.reasoning_markers
    if markers and prompt_tail.rstrip().endswith(markers[0]):
        return markers[0]
    return ""
