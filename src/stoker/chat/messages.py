"""A conversation as surfaces send it, checked once: roles canonical, content parts flattened, images set aside.

Every surface's messages pass through ``normalize`` before anything is rendered, so the terminal, the browser, the
API and predict refuse the same conversations with the same messages.
"""

from __future__ import annotations

from typing import Any

from stoker.errors import TemplateError
from stoker.media import IMAGE_PLACEHOLDER
from stoker.templates.conversation import canonical_role
from stoker.templates.types import Message


def normalize(messages: list[Message]) -> tuple[list[Message], list[Any]]:
    """Validate roles and flatten content parts to text; image parts become placeholders plus image refs."""
    if not messages:
        raise TemplateError("messages is empty: send at least one message with role 'user'.", param="messages")
    out: list[Message] = []
    images: list[Any] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise TemplateError(f"messages[{i}] must be an object with 'role' and 'content'.", param="messages")
        role = canonical_role(msg, f"messages[{i}]")
        content = msg.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = _flatten_parts(content, images, where=f"messages[{i}]")
        else:
            raise TemplateError(
                f"messages[{i}].content must be a string or a list of content parts.", param="messages"
            )
        new = {k: v for k, v in msg.items() if k != "content"}
        new["role"] = role
        new["content"] = text
        out.append(new)
    if out[-1]["role"] == "system" or not any(m["role"] == "user" for m in out):
        raise TemplateError("the conversation needs at least one 'user' message.", param="messages")
    return out, images


def _flatten_parts(parts: list[Any], images: list[Any], *, where: str) -> str:
    chunks: list[str] = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            chunks.append(str(part.get("text", "")))
        elif kind in ("image_url", "image"):
            ref = part.get("image_url", part.get("image"))
            if isinstance(ref, dict):
                ref = ref.get("url")
            if not ref:
                raise TemplateError(f"{where}.content[{j}] is an image part without a url.", param="messages")
            images.append(ref)
            chunks.append(IMAGE_PLACEHOLDER)
        else:
            raise TemplateError(
                f"{where}.content[{j}] has unsupported type {kind!r}; expected 'text' or 'image_url'.",
                param="messages",
            )
    return "".join(chunks)


def with_default_system(messages: list[Message], default_system: str | None) -> list[Message]:
    if default_system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": default_system}, *messages]
    return messages


def with_system_note(messages: list[Message], note: str, default_system: str | None) -> list[Message]:
    """Append ``note`` to the system message, creating one (from the config's default system prompt) if needed."""
    if messages and messages[0].get("role") in ("system", "developer"):
        first = dict(messages[0])
        content = first.get("content")
        if isinstance(content, list):
            first["content"] = [*content, {"type": "text", "text": "\n\n" + note}]
        else:
            first["content"] = f"{content}\n\n{note}" if content else note
        return [first, *messages[1:]]
    system = f"{default_system}\n\n{note}" if default_system else note
    return [{"role": "system", "content": system}, *messages]
