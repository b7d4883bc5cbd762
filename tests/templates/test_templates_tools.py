"""Tool calling and reasoning: every family renders tool definitions, writes calls, and parses the calls a model
trained on that layout would generate; invalid tool JSON comes back as text; reasoning follows enable_thinking."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stoker.templates import get_template, list_templates
from stoker.templates.registry import TEMPLATES

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string", "description": "City name"}},
                "required": ["location"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_trip",
            "description": "Book a trip",
            "parameters": {"type": "object", "properties": {"plan": {"type": "object", "description": "the plan"}}},
        },
    },
]
ASK = {"role": "user", "content": "Weather in Paris, and book me a trip to Lyon."}
WEATHER = {"location": "Paris"}
NESTED = {"plan": {"to": "Lyon", "legs": [{"mode": "train", "seats": 2}, {"mode": "bus"}], "notes": "é ✓"}}


def calls_turn(*calls: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": f"call{i:05d}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
            for i, (n, a) in enumerate(calls)
        ],
    }


def generated_reply(name: str, turn: dict[str, Any]) -> str:
    """What a model trained on the family's layout generates for ``turn``: the rendered conversation with the
    turn, after the prompt that asks for it (end-of-turn tokens stay; the engine stops there)."""
    template = get_template(name)
    prompt = template.render([ASK], tools=TOOLS, add_generation_prompt=True, enable_thinking=False)
    full = template.render([ASK, turn], tools=TOOLS, add_generation_prompt=False, enable_thinking=False)
    if full.startswith(prompt):
        return full[len(prompt):]
    # Layouts whose call turn does not extend the generation prompt (Llama 3.1 ends its prompt with the header it
    # then writes again) still generate exactly the calls the tool format writes.
    from stoker.templates.conversation import normalize

    return template.tools.calls(normalize([turn])[0].tool_calls)


@pytest.mark.parametrize("name", list_templates())
def test_tool_definitions_are_in_the_prompt(name: str) -> None:
    prompt = get_template(name).render([ASK], tools=TOOLS)
    assert "get_weather" in prompt and "book_trip" in prompt and "Get the current weather in a city" in prompt


@pytest.mark.parametrize("name", list_templates())
def test_one_call_round_trip(name: str) -> None:
    reply = generated_reply(name, calls_turn(("get_weather", WEATHER)))
    parsed = get_template(name).parse_reply(reply, tools_given=True)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", WEATHER)]
    assert parsed.content.strip() == ""


@pytest.mark.parametrize("name", list_templates())
def test_several_calls_with_nested_arguments_round_trip(name: str) -> None:
    reply = generated_reply(name, calls_turn(("get_weather", WEATHER), ("book_trip", NESTED)))
    parsed = get_template(name).parse_reply(reply, tools_given=True)
    got = [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]
    assert got == [("get_weather", WEATHER), ("book_trip", NESTED)]


@pytest.mark.parametrize("name", list_templates())
def test_invalid_tool_json_is_plain_text(name: str) -> None:
    reply = generated_reply(name, calls_turn(("get_weather", WEATHER)))
    broken = reply.replace('"Paris"', '"Paris', 1)
    assert broken != reply
    template = get_template(name)
    parsed = template.parse_reply(broken, tools_given=True)
    assert parsed.tool_calls == []
    assert '"Paris' in parsed.content


@pytest.mark.parametrize("name", list_templates())
def test_runaway_nesting_is_plain_text(name: str) -> None:
    # A model stuck on "[" nests deeper than Python's recursion limit; the reply must still come back as text.
    reply = generated_reply(name, calls_turn(("get_weather", WEATHER)))
    runaway = reply.replace('"Paris"', "[" * 5000, 1)
    assert runaway != reply
    parsed = get_template(name).parse_reply(runaway, tools_given=True)
    assert parsed.tool_calls == [] and "[" * 5000 in parsed.content


@pytest.mark.parametrize("name", list_templates())
def test_no_tools_no_parsing(name: str) -> None:
    reply = generated_reply(name, calls_turn(("get_weather", WEATHER)))
    parsed = get_template(name).parse_reply(reply, tools_given=False)
    assert parsed.tool_calls == []
    assert "get_weather" in parsed.content


@pytest.mark.parametrize(
    ("name", "text", "content", "calls"),
    [
        ("qwen", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n'
                 "</tool_call>", "Let me check.", [("get_weather", WEATHER)]),
        ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"location": "Paris"}}; '
                   '{"name": "book_trip", "parameters": ' + json.dumps(NESTED) + "}",
         "", [("get_weather", WEATHER), ("book_trip", NESTED)]),
        # [TOOL_CALLS] is a control token: decoding with skip_special_tokens drops it.
        ("mistral", '[{"name": "get_weather", "arguments": {"location": "Paris"}, "id": "a1b2c3d4e"}]',
         "", [("get_weather", WEATHER)]),
        ("glm4", 'get_weather\n{"location": "Paris"}', "", [("get_weather", WEATHER)]),
        ("default", 'Action: get_weather\nAction Input: {"location": "Paris"}\nAction: book_trip\nAction Input: '
                    + json.dumps(NESTED), "", [("get_weather", WEATHER), ("book_trip", NESTED)]),
        ("deepseek3", "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                      '```json\n{"location": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
         "Checking.", [("get_weather", WEATHER)]),
    ],
)
def test_parse_model_output(name: str, text: str, content: str, calls: list[tuple[str, Any]]) -> None:
    parsed = get_template(name).parse_reply(text, tools_given=True)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == calls


def test_mistral_keeps_call_ids() -> None:
    reply = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Paris"}, "id": "a1b2c3d4e"}]'
    parsed = get_template("mistral").parse_reply(reply, tools_given=True)
    assert [c.id for c in parsed.tool_calls] == ["a1b2c3d4e"]


def test_mistral_maps_openai_call_ids_to_nine_characters() -> None:
    openai_call = {"id": "call_Xk2P9", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}}
    messages = [ASK, {"role": "assistant", "content": None, "tool_calls": [openai_call]},
                {"role": "tool", "tool_call_id": "call_Xk2P9", "content": "sunny"}]
    text = get_template("mistral").render(messages, tools=TOOLS)
    ids = {part.split('"')[0] for key in ('"id": "', '"call_id": "') for part in text.split(key)[1:]}
    assert len(ids) == 1 and len(ids.pop()) == 9
    # A text tool result is a JSON string, as mistral-common writes it.
    assert '[TOOL_RESULTS] {"content": "sunny", "call_id": "' in text


# --------------------------------------------------------------------------------------------------------------------
# Reasoning
# --------------------------------------------------------------------------------------------------------------------
THINKING = [n for n in list_templates() if TEMPLATES[n].thinking is not None]


def test_reasoning_families() -> None:
    assert THINKING == ["deepseekr1", "qwen3", "qwen3_vl"]


@pytest.mark.parametrize(
    ("name", "on", "off"),
    [
        ("qwen3", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        ("qwen3_vl", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        ("deepseekr1", "<｜Assistant｜>", "<｜Assistant｜><think>\n\n</think>\n\n"),
    ],
)
def test_enable_thinking_in_the_prompt(name: str, on: str, off: str) -> None:
    template = get_template(name)
    assert template.render([ASK]).endswith(ASK["content"] + on)
    assert template.render([ASK], enable_thinking=True).endswith(ASK["content"] + on)
    assert template.render([ASK], enable_thinking=False).endswith(ASK["content"] + off)


@pytest.mark.parametrize("name", [n for n in list_templates() if n not in THINKING])
def test_enable_thinking_is_ignored_by_other_families(name: str) -> None:
    template = get_template(name)
    assert template.render([ASK], enable_thinking=False) == template.render([ASK], enable_thinking=True)


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("<think>\nThe user wants weather.\n</think>\n\nIt is sunny.", "The user wants weather.", "It is sunny."),
        ("The user wants weather.\n</think>\n\nIt is sunny.", "The user wants weather.", "It is sunny."),
        ("<think>\nStill thinking when the length ran out", "Still thinking when the length ran out", ""),
        ("It is sunny.", None, "It is sunny."),
    ],
)
@pytest.mark.parametrize("name", THINKING)
def test_parse_reasoning(name: str, text: str, reasoning: str | None, content: str) -> None:
    parsed = get_template(name).parse_reply(text)
    assert (parsed.reasoning, parsed.content) == (reasoning, content)


def test_reasoning_then_tool_call() -> None:
    text = ('<think>\nI need the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"location": "Paris"}}\n</tool_call>')
    parsed = get_template("qwen3").parse_reply(text, tools_given=True)
    assert parsed.reasoning == "I need the tool."
    assert parsed.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", WEATHER)]


def test_qwen3_keeps_reasoning_only_after_the_last_query() -> None:
    template = get_template("qwen3")
    earlier = {"role": "assistant", "content": "Hi!", "reasoning_content": "greeting"}
    current = {**calls_turn(("get_weather", WEATHER)), "reasoning_content": "I need the tool."}
    text = template.render([{"role": "user", "content": "Hello"}, earlier, ASK, current,
                            {"role": "tool", "content": "sunny"}])
    assert "greeting" not in text
    assert "<|im_start|>assistant\n<think>\nI need the tool.\n</think>\n\n<tool_call>" in text


def test_reasoning_is_cut_from_history() -> None:
    history = [{"role": "user", "content": "Hello"},
               {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHi!"}, ASK]
    for name in THINKING:
        text = get_template(name).render(history)
        assert "hmm" not in text and "Hi!" in text, name
