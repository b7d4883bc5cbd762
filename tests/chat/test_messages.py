"""``stoker.chat.messages``: a conversation checked once, for every surface."""

from __future__ import annotations

import pytest

from stoker.chat.messages import normalize, with_default_system, with_system_note
from stoker.errors import TemplateError


def test_roles_are_canonical_and_parts_flatten_with_images_set_aside() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is "},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                                     {"type": "text", "text": " this?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "ipython", "content": "42", "tool_call_id": "c"},
        {"role": "function", "content": "43"},
        {"role": "user", "content": "Thanks"},
    ]
    out, images = normalize(messages)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool", "tool", "user"]
    assert out[1]["content"] == "What is <image> this?"
    assert out[2]["content"] == "" and out[2]["tool_calls"][0]["function"]["name"] == "f"
    assert out[3]["tool_call_id"] == "c"
    assert images == ["data:image/png;base64,AA"]
    assert messages[0]["role"] == "developer"  # the caller's messages are left as they were


@pytest.mark.parametrize(("messages", "error"), [
    ([], "messages is empty: send at least one message with role 'user'."),
    (["hi"], "messages[0] must be an object with 'role' and 'content'."),
    ([{"role": "robot", "content": "x"}],
     "messages[0] has unknown role 'robot'; expected one of system, user, assistant, tool."),
    ([{"role": "user", "content": 5}], "messages[0].content must be a string or a list of content parts."),
    ([{"role": "user", "content": [{"type": "audio"}]}],
     "messages[0].content[0] is audio ('audio'), which Stoker does not take: no audio-language model is supported "
     "yet. Send text, images or videos."),
    ([{"role": "user", "content": [{"type": "file"}]}],
     "messages[0].content[0] has unsupported type 'file'; expected 'text', 'image_url' or 'video_url'."),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}],
     "messages[0].content[0] is a video part without a url."),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     "messages[0].content[0] is an image part without a url."),
    ([{"role": "system", "content": "x"}], "the conversation needs at least one 'user' message."),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}],
     "the conversation needs at least one 'user' message."),
])
def test_bad_conversations_name_the_message(messages: list, error: str) -> None:
    with pytest.raises(TemplateError) as exc:
        normalize(messages)
    assert exc.value.message == error and exc.value.param == "messages"


def test_system_prompts() -> None:
    user = [{"role": "user", "content": "Hi"}]
    assert with_default_system(user, "Be kind.") == [{"role": "system", "content": "Be kind."}, *user]
    assert with_default_system(user, None) == user
    own = [{"role": "system", "content": "Mine."}, *user]
    assert with_default_system(own, "Be kind.") == own  # the conversation's own system prompt wins
    assert with_system_note(own, "Use JSON.", "Be kind.")[0] == {"role": "system", "content": "Mine.\n\nUse JSON."}
    assert with_system_note(user, "Use JSON.", "Be kind.")[0] == {"role": "system", "content": "Be kind.\n\nUse JSON."}
    assert with_system_note(user, "Use JSON.", None)[0] == {"role": "system", "content": "Use JSON."}
    parts = [{"role": "system", "content": [{"type": "text", "text": "Mine."}]}, *user]
    assert with_system_note(parts, "Use JSON.", None)[0]["content"][-1] == {"type": "text", "text": "\n\nUse JSON."}
