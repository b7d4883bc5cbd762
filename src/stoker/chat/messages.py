"""A conversation as surfaces send it, checked once: roles canonical, content parts flattened, images and videos
set aside.

Every surface's messages pass through ``normalize`` before anything is rendered, so the terminal, the browser, the
API and predict refuse the same conversations with the same messages.
"""

from __future__ import annotations

from typing import Any

from stoker.errors import TemplateError
from stoker.media import IMAGE_PLACEHOLDER
from stoker.media.video import VIDEO_PLACEHOLDER, VideoRef
from stoker.templates.conversation import canonical_role
from stoker.templates.types import Message


def normalize(messages: list[Message]) -> tuple[list[Message], list[Any]]:
    """Validate roles and flatten content parts to text; image and video parts become placeholders plus refs (a
    video's as ``VideoRef``)."""
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
        elif kind in ("image_url", "image", "video_url", "video"):
            noun = kind.removesuffix("_url")
            ref = part.get(f"{noun}_url", part.get(noun))
            if isinstance(ref, dict):
                ref = ref.get("url")
            if not ref:
                raise TemplateError(f"{where}.content[{j}] is {'an' if noun == 'image' else 'a'} {noun} part without "
                                    "a url.", param="messages")
            images.append(ref if noun == "image" else VideoRef(ref))
            chunks.append(IMAGE_PLACEHOLDER if noun == "image" else VIDEO_PLACEHOLDER)
        elif kind in ("input_audio", "audio_url", "audio"):
            raise TemplateError(
                f"{where}.content[{j}] is audio ({kind!r}), which Stoker does not take: no audio-language model is "
                "supported yet. Send text, images or videos.", param="messages")
        else:
            raise TemplateError(
                f"{where}.content[{j}] has unsupported type {kind!r}; expected 'text', 'image_url' or 'video_url'.",
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
