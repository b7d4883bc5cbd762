"""Tool calls over HTTP, end to end: a model that really writes calls, the real server, the official client.

The demo chat model never calls a tool, so this module first teaches a copy of it to: a Hermes-style chat template
(tools listed in the system turn, calls as ``<tool_call>`` JSON blocks, results as ``tool`` turns) and a short
fine-tune on six conversations, until plain ``transformers`` greedy ``generate`` writes each trained reply exactly.
The server then has to turn those replies into OpenAI's ``tool_calls`` (whole and streamed), render call and result
turns back into the same prompt the model was trained on, and follow OpenAI's finish reasons per ``tool_choice``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow  # a fine-tune of about half a minute, then one server process

from api_server import ApiServer, async_client, client, start_server, stop_server  # noqa: E402

from stoker.chat.replies import NAMED_NOTE, REQUIRED_NOTE  # noqa: E402

# ChatML with Hermes tool calls. Call arguments arrive as objects (what transformers and vLLM pass templates).
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "Tools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{%- for m in messages if m.role != 'system' %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{%- for c in m.tool_calls %}{% if not loop.first %}\n{% endif %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}'
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TRIP = {"type": "function", "function": {"name": "book_trip", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, TRIP]
PARIS_ARGS = {"city": "Paris"}
ROME_ARGS = {"city": "Rome"}
TRIP_ARGS = {"trip": {"city": "Rome", "days": [{"day": 1}, {"day": 2}]}}


def call_text(name: str, arguments: dict[str, Any]) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


PARIS = [user("What is the weather in Paris?")]
BOTH = [user("What is the weather in Paris and in Rome?")]
BOOK = [user("Book a trip to Rome for two days.")]
ABOUT = [user("Tell me about Paris.")]
RESULT = [*PARIS,
          {"role": "assistant", "content": "", "tool_calls": [
              {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS_ARGS}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]  # fmt: skip
BOTH_PREFIX = "Checking both."
RESULT_ANSWER = "It is 21 degrees in Paris."

# (messages, tools, the reply the model is trained to write). The last two carry the system notes the server adds
# for tool_choice "required" and a named function, so those prompts are trained prompts too.
TRAINED = [
    (PARIS, TOOLS, call_text("get_weather", PARIS_ARGS)),
    (BOTH, TOOLS, BOTH_PREFIX + "\n" + call_text("get_weather", PARIS_ARGS) + "\n" + call_text("get_weather", ROME_ARGS)),
    (BOOK, TOOLS, call_text("book_trip", TRIP_ARGS)),
    (RESULT, TOOLS, RESULT_ANSWER),
    ([{"role": "system", "content": REQUIRED_NOTE}, *ABOUT], TOOLS, call_text("get_weather", PARIS_ARGS)),
    ([{"role": "system", "content": NAMED_NOTE.format(name="get_weather")}, *ABOUT], [WEATHER],
     call_text("get_weather", PARIS_ARGS)),
]  # fmt: skip
MAX_STEPS = 300


def train_tool_model(demo_chat: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stoker.demo.tokenizer import save_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_chat)
    tokenizer.chat_template = TOOL_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(demo_chat, dtype=torch.float32)
    pairs = []
    for messages, tools, reply in TRAINED:
        prompt = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        pairs.append((tokenizer(prompt, add_special_tokens=False)["input_ids"],
                      tokenizer(reply + tokenizer.eos_token, add_special_tokens=False)["input_ids"]))
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)  # learn the replies only
        mask[i, : len(p) + len(r)] = 1

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-3, weight_decay=0.0)
        model.train()
        for _ in range(MAX_STEPS):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if loss.item() < 0.002:
                break
        model.eval()
        with torch.no_grad():
            for (prompt, reply), (_, _, text) in zip(pairs, TRAINED):
                got = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=len(reply) + 8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()  # fmt: skip
                assert got == reply, f"the tool fine-tune did not learn {text!r}: {tokenizer.decode(got)!r}"
    finally:
        torch.set_num_threads(previous)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    generation = json.loads((demo_chat / "generation_config.json").read_text())
    generation["max_new_tokens"] = 256  # the demo's default is sized for its short answers, not for two calls
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


@pytest.fixture(scope="module")
def tool_server(demo_chat: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    folder = tmp_path_factory.mktemp("api-tools")
    model = train_tool_model(demo_chat, folder / "tool-model")
    srv = start_server({"model_name_or_path": str(model)}, folder)
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text(), srv.log_text()


def calls_of(message: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def ask(srv: ApiServer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] = TOOLS, **kw: Any) -> Any:
    return client(srv).chat.completions.create(model="tool-model", messages=messages, tools=tools, **kw)


def streamed(srv: ApiServer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] = TOOLS, **kw: Any
             ) -> tuple[list[Any], str, list[dict[str, Any]], str | None]:
    """(chunks, content, tool-call deltas as dicts, finish_reason) of a streamed request."""
    chunks = list(ask(srv, messages, tools, stream=True, stream_options={"include_usage": True}, **kw))
    choices = [c.choices[0] for c in chunks if c.choices]
    content = "".join(ch.delta.content or "" for ch in choices)
    calls = [tc.model_dump() for ch in choices for tc in ch.delta.tool_calls or []]
    return chunks, content, calls, choices[-1].finish_reason


def test_a_call_whole_and_streamed(tool_server: ApiServer) -> None:
    whole = ask(tool_server, PARIS)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert calls_of(choice.message) == [("get_weather", PARIS_ARGS)]
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.arguments == '{"city": "Paris"}'

    chunks, content, calls, finish = streamed(tool_server, PARIS)
    assert {c.id for c in chunks} == {chunks[0].id} and {c.object for c in chunks} == {"chat.completion.chunk"}
    assert all(c.model == "tool-model" and c.created > 0 for c in chunks)
    assert content == "" and finish == "tool_calls"
    assert [(d["index"], d["type"], d["function"]["name"], d["function"]["arguments"]) for d in calls] == [
        (0, "function", "get_weather", '{"city": "Paris"}')]
    assert calls[0]["id"].startswith("call_")
    assert chunks[-1].usage == whole.usage  # the same prompt and the same reply tokens


def test_text_then_two_calls_and_parallel_off(tool_server: ApiServer) -> None:
    whole = ask(tool_server, BOTH).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == BOTH_PREFIX
    assert calls_of(whole.message) == [("get_weather", PARIS_ARGS), ("get_weather", ROME_ARGS)]
    assert len({c.id for c in whole.message.tool_calls}) == 2

    _, content, calls, finish = streamed(tool_server, BOTH)
    assert content == BOTH_PREFIX and finish == "tool_calls"
    assert [(d["index"], json.loads(d["function"]["arguments"])) for d in calls] == [(0, PARIS_ARGS), (1, ROME_ARGS)]

    single = ask(tool_server, BOTH, parallel_tool_calls=False).choices[0]
    assert calls_of(single.message) == [("get_weather", PARIS_ARGS)]


def test_nested_arguments_survive(tool_server: ApiServer) -> None:
    whole = ask(tool_server, BOOK).choices[0]
    assert calls_of(whole.message) == [("book_trip", TRIP_ARGS)]
    _, _, calls, _ = streamed(tool_server, BOOK)
    assert json.loads(calls[0]["function"]["arguments"]) == TRIP_ARGS


def test_a_tool_result_turn_renders_as_trained(tool_server: ApiServer) -> None:
    # OpenAI clients send arguments as JSON text; the template was trained on objects, so the server must convert.
    messages = [dict(m) for m in RESULT]
    messages[1] = {**messages[1], "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps(PARIS_ARGS)}}]}  # fmt: skip
    whole = ask(tool_server, messages).choices[0]
    assert (whole.message.content, whole.finish_reason, whole.message.tool_calls) == (RESULT_ANSWER, "stop", None)
    _, content, calls, finish = streamed(tool_server, messages)
    assert (content, finish, calls) == (RESULT_ANSWER, "stop", [])


@pytest.mark.parametrize(("choice", "tools", "finish"), [
    ("required", TOOLS, "tool_calls"),
    ({"type": "function", "function": {"name": "get_weather"}}, TOOLS, "stop"),  # OpenAI's finish when forced by name
])  # fmt: skip
def test_required_and_named_choices(tool_server: ApiServer, choice: Any, tools: list[Any], finish: str) -> None:
    whole = ask(tool_server, ABOUT, tools, tool_choice=choice).choices[0]
    assert whole.finish_reason == finish and calls_of(whole.message) == [("get_weather", PARIS_ARGS)]
    _, content, calls, streamed_finish = streamed(tool_server, ABOUT, tools, tool_choice=choice)
    assert streamed_finish == finish and content == ""
    assert [(d["function"]["name"], json.loads(d["function"]["arguments"])) for d in calls] == [
        ("get_weather", PARIS_ARGS)]


def test_tool_choice_none_hides_the_tools(tool_server: ApiServer) -> None:
    whole = ask(tool_server, PARIS, tool_choice="none", max_tokens=40).choices[0]
    assert whole.message.tool_calls is None and isinstance(whole.message.content, str)
    assert "<tool_call>" not in whole.message.content  # not the trained prompt: the model was never shown the tools


def test_concurrent_tool_requests_stay_unmixed(tool_server: ApiServer) -> None:
    expected = {"paris": [("get_weather", PARIS_ARGS)], "book": [("book_trip", TRIP_ARGS)],
                "both": [("get_weather", PARIS_ARGS), ("get_weather", ROME_ARGS)]}
    messages = {"paris": PARIS, "book": BOOK, "both": BOTH}

    async def run() -> list[tuple[str, list[tuple[str, dict[str, Any]]]]]:
        aclient = async_client(tool_server)
        names = list(expected) * 4

        async def one(name: str) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
            reply = await aclient.chat.completions.create(model="tool-model", messages=messages[name], tools=TOOLS)
            return name, calls_of(reply.choices[0].message)

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(n) for n in names)), timeout=120)
        finally:
            await aclient.close()

    results = asyncio.run(run())
    assert len(results) == 12
    for name, calls in results:
        assert calls == expected[name], name
