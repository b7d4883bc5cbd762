"""From generated text to OpenAI messages (``stoker.chat.replies``), with the real built-in templates' parsers.

The demo model never writes a tool call, so tool-call and reasoning replies are given as text here. The property
that matters for streaming: the deltas of a reply, however the text is cut into pieces, add up to exactly what the
whole reply resolves to, and content is released as soon as it cannot be the start of a tool call.
"""

from __future__ import annotations

import json

import pytest

from stoker.chat.replies import (
    ReplyRules,
    ToolPolicy,
    reasoning_prefix,
    tool_constraint,
)
from stoker.templates import get_template

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
AUTO = ToolPolicy("auto", [WEATHER, TIME])
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def rules(template_name: str, policy: ToolPolicy, *, prefix: str = "") -> ReplyRules:
    template = get_template(template_name, None)

    def parse(t: str, *, tools_given: bool):
        return template.parse_reply(prefix + t, tools_given=tools_given)

    return ReplyRules(parse, template.tools, template.reasoning_markers, policy)


def streamed(template_name: str, text: str, policy: ToolPolicy, *, piece: int, finish: str = "stop",
             prefix: str = "") -> tuple[dict, list[dict]]:
    """Run ``text`` through a ReplyParser in pieces of ``piece`` characters; return the summed message and the
    deltas as they were released."""
    parser = rules(template_name, policy, prefix=prefix).parser()
    deltas = []
    for i in range(0, len(text), piece):
        part = parser.push(text[i : i + piece])
        deltas.append({"content": part.content, "reasoning": part.reasoning, "calls": [], "at": i + piece})
    rest, reply = parser.finish(finish)
    calls = [(c.name, json.loads(c.arguments)) for c in rest.tool_calls]
    deltas.append({"content": rest.content, "reasoning": rest.reasoning, "calls": calls, "at": len(text)})
    total = {
        "content": "".join(d["content"] for d in deltas),
        "reasoning": "".join(d["reasoning"] for d in deltas),
        "calls": calls,
        "finish": reply.finish_reason,
    }
    return total, deltas


def whole(template_name: str, text: str, policy: ToolPolicy, *, finish: str = "stop", prefix: str = "") -> dict:
    reply = rules(template_name, policy, prefix=prefix).reply(text, finish)
    return {
        "content": reply.content or "",
        "reasoning": reply.reasoning or "",
        "calls": [(c.name, json.loads(c.arguments)) for c in reply.tool_calls],
        "finish": reply.finish_reason,
    }


PIECES = [1, 2, 3, 7, 1000]


@pytest.mark.parametrize("piece", PIECES)
def test_tool_call_streams_like_the_whole_reply(piece: int) -> None:
    text = "Let me check.\n" + CALL
    total, deltas = streamed("qwen", text, AUTO, piece=piece)
    assert total == whole("qwen", text, AUTO) == {
        "content": "Let me check.", "reasoning": "", "calls": [("get_weather", {"city": "Paris"})],
        "finish": "tool_calls"}
    # The words before the call went out before the call was complete.
    if piece < len(text):
        released = [d for d in deltas if d["content"]]
        assert released[0]["at"] < text.index("<tool_call>") + piece


@pytest.mark.parametrize("piece", PIECES)
def test_reasoning_streams_as_it_comes(piece: int) -> None:
    text = "<think>\nThe user wants weather.\n</think>\n\nIt is sunny."
    total, deltas = streamed("qwen3", text, AUTO, piece=piece)
    assert total == whole("qwen3", text, AUTO) == {
        "content": "It is sunny.", "reasoning": "The user wants weather.", "calls": [], "finish": "stop"}
    if piece < 10:
        # Reasoning is released in several pieces while the block is open, not in one lump at the end.
        assert sum(1 for d in deltas if d["reasoning"]) > 3
        assert all(d["reasoning"] == "" for d in deltas if d["at"] > text.index("</think>") + piece)


@pytest.mark.parametrize("piece", [1, 4, 1000])
def test_reasoning_then_tool_call(piece: int) -> None:
    text = "<think>\nNeed the tool.\n</think>\n\n" + CALL
    total, _ = streamed("qwen3", text, AUTO, piece=piece)
    assert total == whole("qwen3", text, AUTO)
    assert total["reasoning"] == "Need the tool." and total["finish"] == "tool_calls" and total["content"] == ""


@pytest.mark.parametrize("piece", [1, 5])
def test_prompt_opened_reasoning(piece: int) -> None:
    template = get_template("qwen3", None)
    assert reasoning_prefix(template, "<|im_start|>assistant\n<think>\n") == "<think>"
    assert reasoning_prefix(template, "<|im_start|>assistant\n<think>\n\n</think>\n\n") == ""
    assert reasoning_prefix(get_template("qwen", None), "<think>\n") == ""  # the family has no reasoning
    text = "Thinking hard.\n</think>\n\nDone."
    total, deltas = streamed("qwen3", text, AUTO, piece=piece, prefix="<think>")
    assert total == whole("qwen3", text, AUTO, prefix="<think>")
    assert total["reasoning"] == "Thinking hard." and total["content"] == "Done."
    assert deltas[0]["reasoning"] or deltas[1]["reasoning"]  # shown as reasoning from the first pieces


@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_plain_text_with_marker_lookalikes_is_content(piece: int) -> None:
    text = "Use <tool> tags and <tool_c ideas, 3 < 4."
    total, deltas = streamed("qwen", text, AUTO, piece=piece)
    assert total == {"content": text, "reasoning": "", "calls": [], "finish": "stop"}
    if piece == 1:
        # Held back only while the tail could still become "<tool_call>".
        assert "".join(d["content"] for d in deltas[:-1]) == text


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ('<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>', AUTO),  # not an offered function
        (CALL.replace("get_weather", "get_time"), ToolPolicy("named", [WEATHER], forced="get_weather")),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', AUTO),  # broken JSON
        (CALL, ToolPolicy("none")),  # tool_choice none: nothing is a call
    ],
)
def test_calls_the_request_does_not_allow_are_content(text: str, policy: ToolPolicy) -> None:
    expected = {"content": text, "reasoning": "", "calls": [], "finish": "stop"}
    assert whole("qwen", text, policy) == expected
    for piece in (1, 6, 1000):
        assert streamed("qwen", text, policy, piece=piece)[0] == expected


@pytest.mark.parametrize(("policy", "finish"), [
    (AUTO, "tool_calls"),
    (ToolPolicy("required", [WEATHER, TIME]), "tool_calls"),
    (ToolPolicy("named", [WEATHER], forced="get_weather"), "stop"),  # OpenAI's finish for a call forced by name
])
def test_finish_reason_of_a_call_follows_openai(policy: ToolPolicy, finish: str) -> None:
    assert whole("qwen", CALL, policy)["finish"] == finish
    for piece in (1, 1000):
        total, _ = streamed("qwen", CALL, policy, piece=piece)
        assert total["finish"] == finish and total["calls"] == [("get_weather", {"city": "Paris"})]


def test_parallel_calls_and_parallel_off() -> None:
    text = CALL + "\n" + CALL.replace("get_weather", "get_time")
    total, _ = streamed("qwen", text, AUTO, piece=3)
    assert [name for name, _ in total["calls"]] == ["get_weather", "get_time"]
    single = ToolPolicy("auto", [WEATHER, TIME], parallel=False)
    assert [name for name, _ in whole("qwen", text, single)["calls"]] == ["get_weather"]


def test_length_cut_call_is_content() -> None:
    text = CALL[:30]
    assert whole("qwen", text, AUTO, finish="length") == {"content": text, "reasoning": "", "calls": [],
                                                        "finish": "length"}


def test_other_families() -> None:
    llama = '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    for piece in (1, 1000):
        assert streamed("llama3_1", llama, AUTO, piece=piece)[0] == whole("llama3_1", llama, AUTO) == {
            "content": "", "reasoning": "", "calls": [("get_weather", {"city": "Rome"})], "finish": "tool_calls"}
    mistral = 'Sure.[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]'
    assert streamed("mistral", mistral, AUTO, piece=2)[0] == whole("mistral", mistral, AUTO)
    assert whole("mistral", mistral, AUTO)["calls"] == [("get_time", {})]
    # GLM writes a call as a bare "name\n{args}": no marker, so with tools the whole reply is held to the end.
    glm = 'get_weather\n{"city": "Oslo"}'
    total, deltas = streamed("glm4", glm, AUTO, piece=1)
    assert total == whole("glm4", glm, AUTO) and total["calls"] == [("get_weather", {"city": "Oslo"})]
    assert all(not d["content"] for d in deltas[:-1])


def test_a_forced_call_is_constrained_to_the_models_own_format_and_schema() -> None:
    xgr = pytest.importorskip("xgrammar")
    city = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo([chr(i) for i in range(32, 127)] + ["\n"]))

    def accepts(spec: str, text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiler.compile_grammar(spec))
        return matcher.accept_string(text) and matcher.is_completed()

    qwen = get_template("qwen", None).tools
    required = tool_constraint(ToolPolicy("required", [city, TIME]), qwen)
    assert required.kind == "grammar" and required.param == "tool_choice"
    assert accepts(required.spec, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert accepts(required.spec, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert not accepts(required.spec, '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>')
    assert not accepts(required.spec, "It is sunny.")
    named = tool_constraint(ToolPolicy("named", [city], forced="get_weather"), get_template("llama3", None).tools)
    assert accepts(named.spec, '{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert not accepts(named.spec, '{"name": "get_time", "parameters": {}}')
    assert tool_constraint(AUTO, qwen) is None and tool_constraint(ToolPolicy("none"), qwen) is None


# --------------------------------------------------------------------------------------------------------------------
# Every built-in template's formats, however the text is cut into deltas
# --------------------------------------------------------------------------------------------------------------------
# Formats whose call is the whole reply: text before it makes it prose (Llama 3's JSON call, GLM's bare name\n{args}).
WHOLE_REPLY_CALLS = {"llama3", "llama4", "glm4"}


def _call_text(name: str) -> tuple[str, str, str]:
    """A reply in the template's own formats: (text, the content before the call, the reasoning)."""
    from stoker.templates.conversation import Call

    template = get_template(name, None)
    call = Call(name="get_weather", arguments='{"city": "Paris"}', parsed={"city": "Paris"}, id="call_1")
    content = "" if template.tools.name in WHOLE_REPLY_CALLS else "Checking."
    text = content + (template.tools.joiner if content else "") + template.tools.calls([call])
    reasoning = ""
    if template.thinking is not None:
        reasoning = "I should look it up."
        text = f"{template.thinking.open}\n{reasoning}\n{template.thinking.close}\n\n{text}"
    return text, content, reasoning


def _all_templates() -> list[str]:
    from stoker.templates import list_templates

    return list_templates()


@pytest.mark.parametrize("name", _all_templates())
def test_every_format_streams_to_its_whole_reply(name: str) -> None:
    text, content, reasoning = _call_text(name)
    expected = {"content": content, "reasoning": reasoning, "calls": [("get_weather", {"city": "Paris"})],
                "finish": "tool_calls"}
    assert whole(name, text, AUTO) == expected
    for piece in (1, 2, 3, 5, 1000):
        assert streamed(name, text, AUTO, piece=piece)[0] == expected


@pytest.mark.parametrize("name", _all_templates())
def test_every_format_without_tools_keeps_the_call_as_content(name: str) -> None:
    text, _, reasoning = _call_text(name)
    reply = whole(name, text, ToolPolicy("none"))
    assert reply["calls"] == [] and reply["reasoning"] == reasoning and reply["finish"] == "stop"
    for piece in (1, 4, 1000):
        assert streamed(name, text, ToolPolicy("none"), piece=piece)[0] == reply


@pytest.mark.parametrize("name", [n for n in _all_templates() if get_template(n, None).thinking is not None])
def test_markers_split_across_deltas_never_show_as_text(name: str) -> None:
    template = get_template(name, None)
    open_, close = template.reasoning_markers
    call_marker = template.tool_call_markers[0]
    text = f"{open_}\nplan\n{close}\n\nSure.\n{call_marker}"
    # Cut every marker in two, at each position: no delta may ever carry part of a marker as content or reasoning.
    for marker in (open_, close, call_marker):
        start = text.index(marker)
        for cut in range(1, len(marker)):
            pieces = [text[: start + cut], text[start + cut :]]
            parser = rules(name, AUTO).parser()
            shown = [parser.push(p) for p in pieces]
            for part in shown:
                assert not any(m[:2] in part.content or m[:2] in part.reasoning
                               for m in (open_, close, call_marker)), (marker, cut, part)
