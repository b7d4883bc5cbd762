"""One checked, normalized view of an OpenAI-style conversation, shared by every template.

Templates never look at raw message dicts: they get ``Turn`` objects whose content is a string, whose tool calls
carry both the argument text and the parsed object, and whose roles are one of four. Malformed input is a
``TemplateError`` that names the message, never a ``KeyError`` deep inside a template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from stoker.errors import TemplateError

ROLES = ("system", "user", "assistant", "tool")
# Names other tools use for the same roles (Llama 3.1 calls tool results "ipython").
ROLE_ALIASES = {"developer": "system", "function": "tool", "ipython": "tool", "observation": "tool"}


@dataclass(frozen=True)
class Call:
    """One tool call of an assistant turn."""

    name: str
    arguments: str  # the JSON text exactly as the caller gave it (or dumped from the object it gave)
    parsed: Any  # the arguments as an object; None when ``arguments`` is not valid JSON
    id: str = ""
    type: str = "function"

    def arguments_json(self) -> str:
        """The arguments as ``json.dumps`` writes them (what ``| tojson`` gives a Jinja template), else the raw text."""
        if self.parsed is None:
            return self.arguments
        return json.dumps(self.parsed, ensure_ascii=False)


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    content: str
    content_given: bool = True  # False when the message had no content (None), e.g. a pure tool-call turn
    tool_calls: tuple[Call, ...] = ()
    reasoning: str | None = None  # assistant ``reasoning_content``
    tool_call_id: str | None = None  # tool results
    name: str | None = None  # tool results: the function's name
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def flatten_content(content: Any, *, where: str, image_token: str | None = None) -> str:
    """String content as is; a list of OpenAI content parts joined, images replaced by the family's placeholder."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        chunks: list[str] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                chunks.append(str(part.get("text", "")))
            elif kind in ("image", "image_url") and image_token is not None:
                chunks.append(image_token)
            elif kind in ("image", "image_url"):
                raise TemplateError(
                    f"{where}.content[{j}] is an image, but this template has no image placeholder: "
                    "use a vision-language template (e.g. qwen2_vl, llava, gemma3)."
                )
            else:
                raise TemplateError(f"{where}.content[{j}] has unsupported type {kind!r}; expected 'text'.")
        return "".join(chunks)
    raise TemplateError(
        f"{where}.content must be a string, null or a list of content parts, not {type(content).__name__}."
    )


def parse_arguments(arguments: Any, *, where: str) -> tuple[str, Any]:
    """(text, object) for tool-call arguments given as JSON text (OpenAI) or as an object (Hugging Face)."""
    if arguments is None:
        return "{}", {}
    if isinstance(arguments, str):
        try:
            return arguments, json.loads(arguments)
        except json.JSONDecodeError:
            return arguments, None
    if isinstance(arguments, (dict, list)):
        return json.dumps(arguments, ensure_ascii=False), arguments
    raise TemplateError(f"{where}.function.arguments must be a JSON string or an object.")


def _calls(raw: Any, *, where: str) -> tuple[Call, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise TemplateError(f"{where}.tool_calls must be a list.")
    calls = []
    for k, item in enumerate(raw):
        at = f"{where}.tool_calls[{k}]"
        if not isinstance(item, dict):
            raise TemplateError(f"{at} must be an object with a 'function'.")
        fn = item.get("function", item)  # tolerate the flat {"name", "arguments"} shape
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise TemplateError(f"{at}.function.name must be a non-empty string.")
        text, parsed = parse_arguments(fn.get("arguments"), where=at)
        calls.append(Call(name=fn["name"], arguments=text, parsed=parsed, id=str(item.get("id") or ""),
                          type=str(item.get("type") or "function")))
    return tuple(calls)


def canonical_role(msg: dict[str, Any], where: str) -> str:
    """The message's role as one of ``ROLES`` (aliases mapped), or a ``TemplateError`` naming the message."""
    role = msg.get("role")
    role = ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        raise TemplateError(f"{where} has unknown role {msg.get('role')!r}; expected one of {', '.join(ROLES)}.",
                            param="messages")
    return role


def normalize(messages: list[dict[str, Any]], *, image_token: str | None = None) -> list[Turn]:
    if not isinstance(messages, list) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role', 'content'} objects.")
    turns = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise TemplateError(f"{where} must be an object with 'role' and 'content'.")
        role = canonical_role(msg, where)
        content = msg.get("content")
        calls = _calls(msg.get("tool_calls"), where=where) if role == "assistant" else ()
        reasoning = msg.get("reasoning_content")
        turns.append(
            Turn(
                role=role,
                content=flatten_content(content, where=where, image_token=image_token),
                content_given=content is not None,
                tool_calls=calls,
                reasoning=reasoning if isinstance(reasoning, str) else None,
                tool_call_id=msg.get("tool_call_id"),
                name=msg.get("name"),
                raw=msg,
            )
        )
    return turns


def to_hf_messages(messages: list[dict[str, Any]], *, arguments_as: str = "object") -> list[dict[str, Any]]:
    """Messages in the shape Hugging Face chat templates expect: tool-call arguments as objects (as vLLM passes
    them), or left as JSON text for templates that concatenate them (``arguments_as="text"``)."""
    out = []
    for msg in messages:
        msg = dict(msg)
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                call = dict(call)
                fn = dict(call.get("function", {}))
                text, parsed = parse_arguments(fn.get("arguments"), where="tool_call")
                fn["arguments"] = parsed if arguments_as == "object" and parsed is not None else text
                call["function"] = fn
                calls.append(call)
            msg["tool_calls"] = calls
        elif "tool_calls" in msg and not msg.get("tool_calls"):
            # Several official templates test `'tool_calls' in message`; an empty list must not count as a call.
            msg.pop("tool_calls")
        out.append(msg)
    return out
