"""One dataset row as predict sees it: an OpenAI-style prompt conversation, plus the reference answer (the label).

The prompt is the conversation without its last assistant turn; the label is that turn. Rows in the alpaca,
sharegpt and openai formattings of LLaMA-Factory all become the same ``Example``:

- alpaca: ``history`` pairs, then ``prompt`` and ``query`` joined by a newline as the last user turn, ``response`` as
  the label, the ``system`` column as a system message;
- sharegpt: role tags map to roles; ``observation`` turns become ``tool`` messages and ``function_call`` turns become
  assistant messages with ``tool_calls`` (their value is ``{"name", "arguments"}`` JSON, or a list of them);
- openai: messages are already in that shape; assistant ``tool_calls`` are kept.

Media placeholders (``<image>``) stay in the text, as LLaMA-Factory writes them, and the media paths are listed on
the example; the chat service places them. A row that cannot become an example raises ``RowProblem``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoker.predict.dataset_info import DatasetSpec
from stoker.predict.readers import UnreadableRow

Message = dict[str, Any]
Tool = dict[str, Any]
RowKey = tuple[str, int]

# LLaMA-Factory's media placeholders.
MEDIA_PLACEHOLDERS = {"images": "<image>", "videos": "<video>", "audios": "<audio>"}


class RowProblem(ValueError):
    """Why one row cannot become an example (the caller adds the dataset name and row number)."""


@dataclass
class Example:
    dataset: str  # the dataset's name in dataset_info.json
    index: int  # the row's position in the dataset (0-based, counting every row read, bad ones included)
    messages: list[Message]  # the prompt: optional system message, then turns ending with a user or tool turn
    label: str | None  # the last assistant turn's text; None when the dataset has no answers (no response column)
    label_tool_calls: list[dict[str, Any]] | None = None  # set when the last assistant turn is a tool call
    tools: list[Tool] | None = None  # OpenAI tool definitions offered to the model
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    audios: list[Any] = field(default_factory=list)

    @property
    def key(self) -> RowKey:
        return (self.dataset, self.index)


@dataclass(frozen=True)
class MediaResolver:
    """Resolves relative media paths against ``base`` (media_dir, else dataset_dir), as LLaMA-Factory does."""

    base: Path | None

    def __call__(self, ref: Any, what: str) -> Any:
        if not isinstance(ref, str):
            return ref  # already-decoded media from a hub dataset (e.g. {"bytes": ..., "path": ...})
        if ref.startswith(("http://", "https://", "data:")):
            return ref
        if self.base is None:
            return ref
        candidate = Path(ref) if Path(ref).is_absolute() else self.base / ref
        if candidate.is_file():
            return str(candidate.resolve())
        if Path(ref).is_file():  # LLaMA-Factory falls back to the path as written (relative to the working dir)
            return str(Path(ref).resolve())
        raise RowProblem(f"{what} file {ref!r} not found (looked in {self.base}); set media_dir to its folder")


def convert_row(row: Any, index: int, spec: DatasetSpec, media: MediaResolver) -> Example:
    """Turn one raw row into an ``Example``; raises ``RowProblem`` when the row is malformed."""
    if isinstance(row, UnreadableRow):
        raise RowProblem(row.reason)
    if not isinstance(row, dict):
        raise RowProblem(f"a row must be a JSON object, got {type(row).__name__}")
    system, turns, answer_text = _CONVERTERS[spec.formatting](row, spec)
    if not turns or turns[-1]["role"] != "assistant":
        raise RowProblem("the conversation must end with an assistant turn (the answer to compare against)")
    *prompt, answer = turns
    example = Example(
        dataset=spec.name,
        index=index,
        messages=([{"role": "system", "content": system}] if system else []) + prompt,
        label=answer_text,
        label_tool_calls=answer.get("tool_calls") or None,
        tools=_tools(row, spec),
    )
    for kind, placeholder in MEDIA_PLACEHOLDERS.items():
        refs = _media_list(row, spec, kind)
        if refs is None:
            continue
        count = sum(m["content"].count(placeholder) for m in turns)
        if count != len(refs):
            raise RowProblem(
                f"{len(refs)} {kind} given but the conversation has {count} {placeholder} placeholders; "
                "they must match one to one"
            )
        setattr(example, kind, [media(ref, kind[:-1]) for ref in refs])
    return example


# --- formattings ---------------------------------------------------------------------------------------------------
# Each returns (system prompt, turns in OpenAI shape, the last turn's text as the dataset writes it or None).


def _alpaca(row: dict[str, Any], spec: DatasetSpec) -> tuple[str, list[Message], str | None]:
    turns: list[Message] = []
    history_col = spec.column("history")
    history = _get(row, history_col, optional=True, parse_json=True)
    if history is not None:
        if not isinstance(history, list):
            raise RowProblem(f"column {history_col!r} must be a list of [prompt, response] pairs")
        for n, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise RowProblem(f"column {history_col!r}: item {n} is not a [prompt, response] pair of strings")
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]

    prompt_col, query_col, response_col = spec.column("prompt"), spec.column("query"), spec.column("response")
    if prompt_col is None:
        raise RowProblem('dataset_info.json maps no prompt column ("columns": {"prompt": ...})')
    parts = [_get(row, prompt_col, optional=False), _get(row, query_col, optional=True)]
    turns.append({"role": "user", "content": "\n".join(p for p in parts if p)})
    # No response column means an unlabeled dataset (e.g. pretraining text): generate, with nothing to compare.
    answer = None if response_col is None else _get(row, response_col, optional=False)
    turns.append({"role": "assistant", "content": answer or ""})
    system = _get(row, spec.column("system"), optional=True) or ""
    return system, turns, answer


def _sharegpt(row: dict[str, Any], spec: DatasetSpec) -> tuple[str, list[Message], str | None]:
    raw = _messages(row, spec)
    role_tag, content_tag = spec.tag("role_tag"), spec.tag("content_tag")
    roles = _role_map(spec)
    system, raw = _leading_system(row, raw, spec)

    turns: list[Message] = []
    text = None
    call_ids: list[str] = []
    for n, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise RowProblem(f"turn {n} must be an object, got {type(msg).__name__}")
        tag = msg.get(role_tag)
        if tag not in roles:
            raise RowProblem(f"turn {n} has role {tag!r}; dataset_info.json maps only {_names(roles)}")
        text = msg.get(content_tag)
        if not isinstance(text, str):
            raise RowProblem(f"turn {n} ({tag}) has no text under {content_tag!r}")
        role = roles[tag]
        _check_position(n, role, tag)
        if role == "function":
            calls = _parse_function_call(text, n)
            call_ids = [c["id"] for c in calls]
            turns.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif role == "tool":
            tool_msg: Message = {"role": "tool", "content": text}
            if len(call_ids) == 1:
                tool_msg["tool_call_id"] = call_ids[0]
            turns.append(tool_msg)
        else:
            call_ids = []
            turns.append({"role": role, "content": text})
    return system, turns, text


def _openai(row: dict[str, Any], spec: DatasetSpec) -> tuple[str, list[Message], str | None]:
    raw = _messages(row, spec)
    role_tag, content_tag = spec.tag("role_tag"), spec.tag("content_tag")
    roles = _role_map(spec)
    system, raw = _leading_system(row, raw, spec)

    turns: list[Message] = []
    text = None
    position = 0  # consecutive tool results count as one turn, as LLaMA-Factory merges them
    for n, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise RowProblem(f"message {n} must be an object, got {type(msg).__name__}")
        tag = msg.get(role_tag)
        if tag not in roles:
            raise RowProblem(f"message {n} has role {tag!r}; dataset_info.json maps only {_names(roles)}")
        role = roles[tag]
        content = msg.get(content_tag)
        items = msg.get("tool_calls") if role in ("assistant", "function") else None
        if role == "tool" and turns and turns[-1]["role"] == "tool":
            position -= 1
        if items:
            _check_position(position, "function", tag)
            calls = _tool_calls(items, n)
            turns.append({"role": "assistant", "content": _content_text(content, n), "tool_calls": calls})
            text = json.dumps([c["function"] for c in calls], ensure_ascii=False)
        elif role == "function":  # a function role without tool_calls: its content is the call, as in sharegpt
            _check_position(position, "function", tag)
            text = _content_text(content, n)
            turns.append({"role": "assistant", "content": "", "tool_calls": _parse_function_call(text, n)})
        else:
            if content is None:
                raise RowProblem(f"message {n} ({tag}) has no {content_tag!r}")
            _check_position(position, role, tag)
            text = _content_text(content, n)
            out: Message = {"role": role, "content": text}
            for extra in ("tool_call_id", "name", "reasoning_content"):
                if extra in msg:
                    out[extra] = msg[extra]
            turns.append(out)
        position += 1
    return system, turns, text


_CONVERTERS: dict[str, Callable[[dict[str, Any], DatasetSpec], tuple[str, list[Message], str | None]]] = {
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "openai": _openai,
}


# --- helpers -------------------------------------------------------------------------------------------------------


def _role_map(spec: DatasetSpec) -> dict[Any, str]:
    """Dataset role names to roles; a system message only counts as one in first place (see ``_leading_system``)."""
    roles = {
        spec.tag("user_tag"): "user",
        spec.tag("assistant_tag"): "assistant",
        spec.tag("observation_tag"): "tool",
        spec.tag("function_tag"): "function",
        spec.tag("system_tag"): "system",
    }
    roles.pop(None, None)
    return roles


def _names(roles: dict[Any, str]) -> str:
    return ", ".join(repr(k) for k in roles)


def _check_position(n: int, role: str, tag: Any) -> None:
    """LLaMA-Factory's order rule: user or tool turns at even positions, assistant or tool-call turns at odd ones."""
    expected = ("user", "tool") if n % 2 == 0 else ("assistant", "function")
    if role not in expected:
        want = "a user or observation turn" if n % 2 == 0 else "an assistant or function_call turn"
        raise RowProblem(f"turn {n} has role {tag!r} where {want} is expected (roles must alternate)")


def _get(row: dict[str, Any], column: str | None, *, optional: bool, parse_json: bool = False) -> Any:
    """A column's value: a string (or a list for history); missing optional columns and nulls read as None."""
    if column is None:
        return None
    if column not in row or row[column] is None:
        if optional:
            return None
        raise RowProblem(f"missing column {column!r}")
    value = row[column]
    if parse_json:
        if isinstance(value, str):  # csv and some parquet files store lists as JSON text
            if not value.strip():
                return None
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise RowProblem(f"column {column!r} is not valid JSON ({exc.msg})") from exc
        return value
    if not isinstance(value, str):
        raise RowProblem(f"column {column!r} must be a string, got {type(value).__name__}")
    return value


def _messages(row: dict[str, Any], spec: DatasetSpec) -> list[Any]:
    column = spec.column("messages")
    if column is None:
        raise RowProblem("dataset_info.json maps no messages column (\"columns\": {\"messages\": ...})")
    messages = _get(row, column, optional=False, parse_json=True)
    if not isinstance(messages, list):
        raise RowProblem(f"column {column!r} must be a list of messages, got {type(messages).__name__}")
    return messages


def _leading_system(row: dict[str, Any], raw: list[Any], spec: DatasetSpec) -> tuple[str, list[Any]]:
    """A first message with the system tag is the system prompt; otherwise the system column, if any."""
    system_tag = spec.tag("system_tag")
    if system_tag and raw and isinstance(raw[0], dict) and raw[0].get(spec.tag("role_tag")) == system_tag:
        content = raw[0].get(spec.tag("content_tag"))
        if not isinstance(content, (str, list)):
            raise RowProblem("the system message has no text")
        return _content_text(content, 0), raw[1:]
    return _get(row, spec.column("system"), optional=True) or "", raw


def _content_text(content: Any, n: int) -> str:
    """Text of an OpenAI content value: a string, or a list of parts whose text parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                texts.append(part)
            else:
                raise RowProblem(f"message {n} has a content part that is not text where only text is allowed")
        return "".join(texts)
    raise RowProblem(f"message {n} has content of type {type(content).__name__}; expected a string")


def _parse_function_call(text: str, n: int) -> list[dict[str, Any]]:
    """A function_call turn's value (``{"name", "arguments"}`` or a list of them) as OpenAI tool calls."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RowProblem(f"turn {n} (function call) is not valid JSON ({exc.msg})") from exc
    items = value if isinstance(value, list) else [value]
    return _tool_calls(items, n)


def _tool_calls(items: Any, n: int) -> list[dict[str, Any]]:
    if not isinstance(items, list) or not items:
        raise RowProblem(f"turn {n}: tool calls must be a non-empty list")
    calls = []
    for k, item in enumerate(items):
        fn = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowProblem(f"turn {n}: tool call {k} needs a \"name\"")
        args = fn.get("arguments", {})
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        call_id = item.get("id") if isinstance(item.get("id"), str) else f"call_{n}_{k}"
        calls.append({"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return calls


def _tools(row: dict[str, Any], spec: DatasetSpec) -> list[Tool] | None:
    """The tools column (JSON text or a list) as OpenAI tool definitions; empty means no tools."""
    column = spec.column("tools")
    value = _get(row, column, optional=True, parse_json=True)
    if value in (None, "", [], {}):
        return None
    items = value if isinstance(value, list) else [value]
    tools = []
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            raise RowProblem(f"column {column!r}: tool {k} must be an object")
        fn = item["function"] if item.get("type") == "function" and isinstance(item.get("function"), dict) else item
        if not isinstance(fn.get("name"), str):
            raise RowProblem(f"column {column!r}: tool {k} needs a \"name\"")
        tools.append({"type": "function", "function": fn})
    return tools


def _media_list(row: dict[str, Any], spec: DatasetSpec, kind: str) -> list[Any] | None:
    column = spec.column(kind)
    value = _get(row, column, optional=True, parse_json=True)
    if value is None:
        return None
    return value if isinstance(value, list) else [value]
