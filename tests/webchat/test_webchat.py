"""The web chat's logic in-process: history to messages, rendering and escaping, and sessions on the demo model.

The browser end-to-end checks live in test_webchat_browser.py.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from stoker.errors import RequestError
from stoker.templates.base import ToolCall
from stoker.webchat.render import CUT_NOTE, chat_messages, markdown_html, turn_messages
from stoker.webchat.session import (
    ChatOptions,
    Turn,
    new_turn,
    parse_tools,
    prepare,
    stream_reply,
    to_messages,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


# --- Markdown to HTML: raw HTML is text, Markdown and code render -------------------------------------------------
@pytest.mark.parametrize(
    ("text", "html"),
    [
        ("<script>alert(1)</script>", "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"),
        ("<img src=x onerror=alert(1)>", "<p>&lt;img src=x onerror=alert(1)&gt;</p>"),
        ("Hi <b>there</b>", "<p>Hi &lt;b&gt;there&lt;/b&gt;</p>"),
        ("**bold** *it* ~~old~~ `<code>`", "<p><strong>bold</strong> <em>it</em> <s>old</s> <code>&lt;code&gt;</code></p>"),
        ("line one\nline two", "<p>line one<br />\nline two</p>"),
        ("- a\n- b", "<ul>\n<li>a</li>\n<li>b</li>\n</ul>"),
        ("| h |\n|---|\n| <i> |", "<table>\n<thead>\n<tr>\n<th>h</th>\n</tr>\n</thead>\n<tbody>\n<tr>\n<td>&lt;i&gt;</td>\n"
                                "</tr>\n</tbody>\n</table>"),
        # A fence still streaming (no closing ```) is code too, and its content is escaped.
        ("```\n<b>unclosed", "<pre><code>&lt;b&gt;unclosed</code></pre>"),
        # The info string cannot break out of the class attribute.
        ('```x"><script>\n1\n```', '<pre><code class="language-x&quot;&gt;&lt;script&gt;">1\n</code></pre>'),
        ("[docs](javascript:alert(1))", "<p>[docs](javascript:alert(1))</p>"),
        ("[docs](https://example.org/a?b=1&c=2)",
         '<p><a href="https://example.org/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer nofollow">docs</a></p>'),
        # Images are not fetched from whatever address a model writes: they show as links.
        ("![cat](https://example.org/c.png)",
         '<p>!<a href="https://example.org/c.png" target="_blank" rel="noopener noreferrer nofollow">cat</a></p>'),
    ],
)
def test_markdown_escapes_raw_html(text: str, html: str) -> None:
    assert markdown_html(text) == html


def test_code_fence_is_highlighted_and_escaped() -> None:
    out = markdown_html("```python\nprint('<b>')\n```")
    assert out == (
        '<pre><code class="language-python"><span class="nb">print</span><span class="p">(</span>'
        "<span class=\"s1\">'&lt;b&gt;'</span><span class=\"p\">)</span>\n</code></pre>"
    )


# --- turns to Chatbot messages --------------------------------------------------------------------------------
def text(role: str, body: str, **metadata: str) -> dict:
    message = {"role": role, "content": {"type": "text", "text": body}}
    if metadata:
        message["metadata"] = metadata
    return message


def test_thinking_block_is_collapsible_and_escaped() -> None:
    turn = Turn(text="Why?", reply="Because **so**.", reasoning="I think <script>x</script>", finish_reason="stop")
    assert turn_messages(turn) == [
        text("user", "<p>Why?</p>"),
        text("assistant", "<p>I think &lt;script&gt;x&lt;/script&gt;</p>", title="Thinking", status="done"),
        text("assistant", "<p>Because <strong>so</strong>.</p>"),
    ]
    # While the model is still thinking, the block shows a spinner and stays open.
    thinking = Turn(text="Why?", reasoning="Hmm")
    assert turn_messages(thinking, live=True)[1]["metadata"] == {"title": "Thinking", "status": "pending"}
    # Once the answer starts, thinking is done.
    answering = Turn(text="Why?", reasoning="Hmm", reply="Be")
    assert turn_messages(answering, live=True)[1]["metadata"] == {"title": "Thinking", "status": "done"}


def test_tool_calls_and_results_are_shown_escaped() -> None:
    call = ToolCall(name="get_<b>weather</b>", arguments='{"city": "<Paris>"}', id="call_1")
    turns = [
        Turn(text="Weather?", tool_calls=[call], finish_reason="tool_calls"),
        Turn(text='{"temp": 21}', role="tool", tool_call_id="call_1", tool_name="get_<b>weather</b>",
             reply="It is 21.", finish_reason="stop"),
    ]
    assert chat_messages(turns) == [
        text("user", "<p>Weather?</p>"),
        text("assistant", '<pre><code>{\n  "city": "&lt;Paris&gt;"\n}</code></pre>',
             title="Tool call: get_&lt;b&gt;weather&lt;/b&gt;"),
        text("user", '<pre><code>{"temp": 21}</code></pre>', title="Tool result: get_&lt;b&gt;weather&lt;/b&gt;"),
        text("assistant", "<p>It is 21.</p>"),
    ]


def test_images_and_cut_replies() -> None:
    turn = Turn(text="What is this?", images=["/tmp/a.png"], reply="A cat", finish_reason="length")
    assert turn_messages(turn) == [
        {"role": "user", "content": {"path": "/tmp/a.png"}},
        text("user", "<p>What is this?</p>"),
        text("assistant", "<p>A cat</p>"),
        text("assistant", f"<p><em>{CUT_NOTE}</em></p>"),
    ]


# --- history to the chat service's messages -------------------------------------------------------------------
def test_history_to_messages(shared_dir: Path) -> None:
    image = shared_dir / "images" / "llava" / "waterview.jpg"
    call = ToolCall(name="get_weather", arguments='{"city": "Paris"}', id="call_7")
    turns = [
        Turn(text="Hello", reply="Hi!", reasoning="greet back", finish_reason="stop"),
        Turn(text="Describe", images=[str(image)], reply="A lake.", finish_reason="stop"),
        Turn(text="Weather in Paris?", reply="", tool_calls=[call], finish_reason="tool_calls"),
        Turn(text='{"temp": 21}', role="tool", tool_call_id="call_7", tool_name="get_weather", reply="21 degrees."),
        Turn(text="Thanks"),  # the turn being answered
    ]
    data_url = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()
    assert to_messages(turns, system="Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!", "reasoning_content": "greet back"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                     {"type": "text", "text": "Describe"}]},
        {"role": "assistant", "content": "A lake."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_7", "name": "get_weather"},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "user", "content": "Thanks"},
    ]
    # A blank system box sends no system message (the config's default_system then applies).
    assert to_messages([Turn(text="Hi")], system="  ") == [{"role": "user", "content": "Hi"}]
    # A reply stopped before its first token still keeps the roles alternating.
    assert to_messages([Turn(text="A"), Turn(text="B")]) == [
        {"role": "user", "content": "A"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "B"}
    ]


def test_new_turn_checks() -> None:
    with pytest.raises(RequestError, match="the message is empty"):
        new_turn([], "  ", [], "user")
    with pytest.raises(RequestError, match="there is no tool call to answer"):
        new_turn([Turn(text="Hi", reply="Hello")], "42", [], "tool")
    calls = [ToolCall("a", "{}", "id_a"), ToolCall("b", "{}", "")]
    assert new_turn([Turn(text="x", tool_calls=calls)], "42", [], "tool") == Turn(
        text="42", role="tool", tool_call_id=None, tool_name="b"
    )


def test_parse_tools() -> None:
    assert parse_tools("") == []
    assert parse_tools(" \n") == []
    bare = {"name": "get_weather", "parameters": {"type": "object"}}
    import json

    assert parse_tools(json.dumps([WEATHER])) == [WEATHER]
    assert parse_tools(json.dumps(bare)) == [WEATHER]
    with pytest.raises(RequestError) as bad:
        parse_tools('[{"name": "x",}]')
    assert bad.value.message.startswith(
        "the tool definitions are not valid JSON (line 1, column 15: Expecting property name enclosed in double "
        "quotes). Paste a JSON list of tools, e.g. ["
    )
    with pytest.raises(RequestError, match='tool 2 has no "name"'):
        parse_tools(json.dumps([WEATHER, {"type": "function", "function": {"description": "x"}}]))


# --- sessions on the demo model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(demo_chat: Path):
    from stoker.config import load_settings
    from stoker.chat import open_chat_service

    chat = open_chat_service(load_settings(overrides={"model_name_or_path": str(demo_chat)}, env={}))
    yield chat
    chat.engine.close()


async def ask(service, turns: list[Turn], question: str, options: ChatOptions | None = None) -> list[list[Turn]]:
    """Every state the page would show while the answer streams (copies: the live turn changes in place)."""
    prepared = prepare(service, turns, question, [], options or ChatOptions())
    seen = []
    async for current in stream_reply(service, prepared):
        seen.append([Turn(**vars(t)) for t in current])
    return seen


def test_reply_streams_trained_answer_and_history_carries_over(service) -> None:
    from stoker.demo.tasks import FACTS, IDENTITY_ANSWER

    seen = asyncio.run(ask(service, [], "Who are you?"))
    final = seen[-1]
    assert [(t.text, t.reply, t.finish_reason) for t in final] == [("Who are you?", IDENTITY_ANSWER, "stop")]
    replies = [states[-1].reply for states in seen]
    # First the question alone, then the answer growing piece by piece.
    assert replies[0] == ""
    assert len(set(replies)) > 3
    assert all(IDENTITY_ANSWER.startswith(r) for r in replies)
    question = "What is the capital of Japan?"
    second = asyncio.run(ask(service, final, question))[-1]
    assert [(t.text, t.reply) for t in second] == [("Who are you?", IDENTITY_ANSWER), (question, FACTS[question])]


def test_two_sessions_stream_together_with_separate_histories(service) -> None:
    from stoker.demo.tasks import FACTS, IDENTITY_ANSWER

    count = "Count from one to ten."

    async def both() -> tuple[list[Turn], list[Turn], float]:
        steps_before = service.engine.stats()["steps_total"]
        a, b = await asyncio.gather(ask(service, [], count), ask(service, [], count))
        steps = service.engine.stats()["steps_total"] - steps_before
        return a[-1], b[-1], steps

    a, b, steps = asyncio.run(both())
    assert a[-1].reply == b[-1].reply == FACTS[count]
    # The engine decoded both in the same steps: fewer steps than answering one after the other.
    assert steps < (a[-1].completion_tokens - 1) + (b[-1].completion_tokens - 1)

    async def diverge() -> tuple[list[Turn], list[Turn]]:
        x, y = await asyncio.gather(ask(service, a, "Who are you?"), ask(service, b, "What is the capital of Italy?"))
        return x[-1], y[-1]

    x, y = asyncio.run(diverge())
    assert [(t.text, t.reply) for t in x] == [(count, FACTS[count]), ("Who are you?", IDENTITY_ANSWER)]
    assert [(t.text, t.reply) for t in y] == [(count, FACTS[count]), ("What is the capital of Italy?", "Rome.")]
    assert len(a) == len(b) == 1  # the histories a session started from are untouched


def test_stopping_keeps_partial_reply_and_frees_the_engine(service) -> None:
    from stoker.demo.tasks import FACTS

    count = "Count from one to ten."

    async def stop_early() -> list[Turn]:
        aborted_before = service.engine.stats()["requests_aborted_total"]
        prepared = prepare(service, [], count, [], ChatOptions())
        stream = stream_reply(service, prepared)
        current = []
        async for current in stream:
            if len(current[-1].reply) >= 5:
                break
        await stream.aclose()  # what Gradio's cancel does to the running event
        for _ in range(200):
            if service.engine.stats()["running_requests"] == 0:
                break
            await asyncio.sleep(0.01)
        assert service.engine.stats()["running_requests"] == 0
        assert service.engine.stats()["requests_aborted_total"] == aborted_before + 1
        return current

    turns = asyncio.run(stop_early())
    assert FACTS[count].startswith(turns[0].reply) and len(turns[0].reply) < len(FACTS[count])
    assert turns[0].finish_reason is None
    final = asyncio.run(ask(service, turns, "Who are you?"))[-1]
    assert len(final) == 2 and final[0].reply == turns[0].reply


def test_long_history_drops_oldest_turns(service) -> None:
    from stoker.demo.tasks import echo_prompt

    words = "red blue green yellow black white brown pink".split()
    old = [Turn(text=echo_prompt(words), reply=" ".join(words), finish_reason="stop") for _ in range(40)]
    options = ChatOptions(max_new_tokens=32)
    prepared = prepare(service, old, "Who are you?", [], options)
    assert 0 < prepared.dropped_turns < 40
    assert prepared.turns == [*old[prepared.dropped_turns:], Turn(text="Who are you?")]
    assert len(prepared.request.prompt_ids) + 32 <= service.max_model_len
    # One more old turn would not have fitted.
    longer = prepare(service, old[prepared.dropped_turns - 1:], "Who are you?", [], options)
    assert longer.dropped_turns == 1


def test_sampling_controls_reach_the_request(service) -> None:
    options = ChatOptions(max_new_tokens=3, temperature=0.0, top_p=0.5, top_k=7, tools=[WEATHER])
    prepared = prepare(service, [], "Who are you?", [], options)
    params = prepared.request.params
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k) == (3, 0.0, 0.5, 7)
    assert prepared.tools_given
    final = asyncio.run(ask(service, [], "Who are you?", options))[-1]
    assert final[0].finish_reason == "length"
    assert final[0].completion_tokens == 3


def test_images_are_refused_by_a_text_model(service, shared_dir: Path) -> None:
    image = str(shared_dir / "images" / "llava" / "waterview.jpg")
    with pytest.raises(RequestError, match="takes no images"):
        prepare(service, [], "What is this?", [image], ChatOptions())


def test_uploaded_image_reaches_a_vision_model(demo_models: dict[str, Path], tmp_path: Path) -> None:
    from stoker.config import load_settings
    from stoker.demo.vision_tasks import NO_IMAGE_ANSWER, answer, draw_shape
    from stoker.chat import open_chat_service

    picture = tmp_path / "shape.png"
    draw_shape("square", "blue", seed=5).save(picture)
    vision = open_chat_service(load_settings(overrides={"model_name_or_path": str(demo_models["vision"])}, env={}))
    try:
        assert vision.engine.info.vision

        async def conversation() -> tuple[list[Turn], list[Turn]]:
            first = prepare(vision, [], "What shape is this?", [str(picture)], ChatOptions())
            async for turns in stream_reply(vision, first):
                pass
            turns = (await ask(vision, turns, "What color is the shape?"))[-1]
            blind = (await ask(vision, [], "What shape is this?"))[-1]
            return turns, blind

        turns, blind = asyncio.run(conversation())
    finally:
        vision.engine.close()
    assert [(t.text, t.images, t.reply) for t in turns] == [
        ("What shape is this?", [str(picture)], answer("shape", "square", "blue")),
        ("What color is the shape?", [], answer("color", "square", "blue")),
    ]
    assert blind[0].reply == NO_IMAGE_ANSWER


def test_page_wiring(service) -> None:
    from stoker.webchat.render import CHATBOT_ID
    from stoker.webchat.ui import build_ui

    blocks = build_ui(service)
    assert blocks.analytics_enabled is False
    chat = [fn for fn in blocks.fns.values() if fn.api_name == "chat"]
    assert len(chat) == 1
    assert chat[0].concurrency_limit == service.settings.max_num_seqs
    chatbot = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == CHATBOT_ID)
    assert (chatbot.render_markdown, chatbot.sanitize_html, chatbot.allow_tags) == (False, True, False)


def test_thinking_switch_for_reasoning_templates(service) -> None:
    import dataclasses

    import gradio as gr

    from stoker.templates import get_template
    from stoker.webchat.ui import build_ui

    def thinking_box(svc) -> gr.Checkbox:
        blocks = build_ui(svc)
        return next(b for b in blocks.blocks.values() if isinstance(b, gr.Checkbox) and b.label == "Thinking")

    assert thinking_box(service).visible is False  # the demo model's template does not think
    qwen3 = dataclasses.replace(service, template=get_template("qwen3", service.tokenizer))
    assert thinking_box(qwen3).visible is True
    question = [{"role": "user", "content": "Who are you?"}]
    for enabled in (True, False):
        request = prepare(qwen3, [], "Who are you?", [], ChatOptions(enable_thinking=enabled)).request
        text = qwen3.template.render(question, enable_thinking=enabled)
        assert request.prompt_ids == qwen3.tokenizer.encode(text, add_special_tokens=False)
    assert text.endswith("<think>\n\n</think>\n\n")  # switched off: an empty, closed block


def test_host_port_and_share_come_from_settings_and_environment() -> None:
    from stoker.config import load_settings
    from stoker.webchat.ui import launch_options

    def where(**kwargs) -> tuple:
        options = launch_options(load_settings(**kwargs))
        return options["server_name"], options["server_port"], options["share"]

    assert where(env={}) == ("127.0.0.1", 7860, False)
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "8123", "GRADIO_SHARE": "true"}
    assert where(env=env) == ("0.0.0.0", 8123, True)
    assert where(overrides={"gradio_server_port": 9000}, env=env) == ("0.0.0.0", 9000, True)
    options = launch_options(load_settings(env={}))
    # Nothing of a chat is kept in the browser or exposed by Gradio's extra endpoints.
    assert (options["run_history"], options["enable_monitoring"], options["mcp_server"]) == (False, False, False)


def test_port_in_use_is_a_clear_error() -> None:
    import socket

    from stoker.errors import ConfigError
    from stoker.webchat.app import check_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            check_port("127.0.0.1", port)
    assert err.value.message == (
        f"cannot serve the web chat on 127.0.0.1:{port}: Address already in use. Pick a free port with "
        "GRADIO_SERVER_PORT (or gradio_server_port), or stop what is using it."
    )
    with pytest.raises(ConfigError, match="expected a port number from 1 to 65535"):
        check_port("127.0.0.1", 70000)
    check_port("127.0.0.1", port)  # free again once closed
