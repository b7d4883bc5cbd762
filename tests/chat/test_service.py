"""``ChatService``: a conversation in, one fitted engine request out, and the reply read back by the same rules.

On the demo chat model (its tokenizer's own ChatML template), so prompts, stop ids and budgets are the real ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from stoker.chat import ChatService, ToolPolicy, tool_policy
from stoker.chat.replies import JSON_NOTE, REQUIRED_NOTE
from stoker.errors import RequestError, TemplateError

WHO = [{"role": "user", "content": "Who are you?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def service(demo_chat: Path):
    from stoker.chat import open_chat_service
    from stoker.config import load_settings

    chat = open_chat_service(load_settings(overrides={"model_name_or_path": str(demo_chat)}, env={}))
    yield chat
    chat.close()


def with_settings(service: ChatService, **values) -> ChatService:
    return dataclasses.replace(service, settings=dataclasses.replace(service.settings, **values))


def test_the_prompt_is_the_templates_with_the_configs_system_prompt(service: ChatService) -> None:
    chat = service.prepare(WHO)
    assert chat.request.prompt_ids == service.template.encode(service.tokenizer, WHO)
    terse = with_settings(service, default_system="Be terse.")
    system = [{"role": "system", "content": "Be terse."}, *WHO]
    assert terse.prepare(WHO).request.prompt_ids == service.template.encode(service.tokenizer, system)
    # A conversation's own system prompt wins over the config's.
    own = [{"role": "system", "content": "Mine."}, *WHO]
    assert terse.prepare(own).request.prompt_ids == service.template.encode(service.tokenizer, own)


def test_stops_merge_the_requests_with_the_templates_and_the_engines(service: ChatService) -> None:
    params = service.sampling_params(stop=["END"], stop_token_ids=[7])
    request = service.prepare(WHO, params).request
    assert request.params.stop == ["END", *service.template.stop_words]
    assert request.params.stop_token_ids[0] == 7
    assert set(service.info.eos_ids) <= set(request.params.stop_token_ids)
    assert service.tokenizer.convert_tokens_to_ids("<|im_end|>") in request.params.stop_token_ids


def test_new_tokens_are_fitted_to_the_context_and_max_length(service: ChatService) -> None:
    request = service.prepare(WHO, service.sampling_params(max_new_tokens=10_000)).request
    assert request.params.max_new_tokens == service.max_model_len - len(request.prompt_ids)
    prompt_len = len(request.prompt_ids)
    capped = with_settings(service, max_length=prompt_len + 5)
    assert capped.prepare(WHO, capped.sampling_params(max_new_tokens=100)).request.params.max_new_tokens == 5
    long = [{"role": "user", "content": "red " * 600}]
    with pytest.raises(RequestError) as exc:
        service.prepare(long)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "messages"


def test_a_prompt_over_max_prompt_tokens_keeps_its_end(service: ChatService) -> None:
    long = [{"role": "user", "content": "red blue " * 100 + "Who are you?"}]
    full = service.template.encode(service.tokenizer, long)
    chat = service.prepare(long, max_prompt_tokens=20)
    assert chat.truncated and chat.request.prompt_ids == full[-20:]
    assert not service.prepare(WHO, max_prompt_tokens=20).truncated


def test_tools_and_json_mode_shape_the_prompt_and_the_rules(service: ChatService) -> None:
    from stoker.templates import get_template

    # The demo model's own template ignores tools; Qwen's writes them into the system turn.
    service = dataclasses.replace(service, template=get_template("qwen", service.tokenizer))
    plain = service.prepare(WHO)
    assert plain.rules.policy == ToolPolicy("none")
    auto = service.prepare(WHO, tools=[WEATHER])
    assert auto.rules.policy.mode == "auto" and auto.rules.policy.tools == [WEATHER]
    assert "get_weather" in service.decode(auto.request.prompt_ids)
    required = service.prepare(WHO, tools=tool_policy([WEATHER], "required"))
    assert REQUIRED_NOTE in service.decode(required.request.prompt_ids)
    json_chat = service.prepare([{"role": "user", "content": "Answer in JSON."}], json_mode=True)
    assert JSON_NOTE in service.decode(json_chat.request.prompt_ids)
    assert json_chat.request.params.structured.kind == "json_object"  # JSON mode is a decoding constraint
    with pytest.raises(RequestError, match="tools name the same function more than once"):
        service.prepare(WHO, tools=[WEATHER, WEATHER])
    with pytest.raises(TemplateError, match="needs a function with a non-empty 'name'"):
        service.prepare(WHO, tools=[{"type": "function", "function": {}}])


def test_a_prompt_that_opens_the_reasoning_block_is_read_as_reasoning(service: ChatService) -> None:
    from stoker.templates.jinja import JinjaTemplate

    opens = JinjaTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}<think>\n")
    thinking = dataclasses.replace(service, template=opens)
    parser = thinking.prepare(WHO).parser()
    first = parser.push("Let me see.")
    assert first.reasoning == "Let me see." and first.content == ""
    parser.push("\n</think>\n\nI am Stoker.")
    _, reply = parser.finish("stop")
    assert (reply.reasoning, reply.content) == ("Let me see.", "I am Stoker.")
    # Without the opener in the prompt the same text is content until a marker shows.
    plain = service.prepare(WHO).parser()
    assert plain.push("Let me see.").content == "Let me see."


def test_the_reply_is_read_the_same_whole_and_streamed(service: ChatService) -> None:
    from stoker.demo.tasks import IDENTITY_ANSWER

    chat = service.prepare(WHO)
    (completion,) = service.generate_batch([chat.request])
    whole = chat.reply(completion.choices[0].text, completion.choices[0].finish_reason)

    async def stream() -> tuple[str, str]:
        parser = chat.parser()
        shown = []
        async for delta in service.stream(chat.request):
            shown.append(parser.push(delta.text).content)
            if delta.finish_reason is not None:
                rest, reply = parser.finish(delta.finish_reason)
                shown.append(rest.content)
                return "".join(shown), reply.finish_reason
        raise AssertionError("the stream ended without a finish reason")

    assert whole.content == IDENTITY_ANSWER and whole.finish_reason == "stop"
    assert asyncio.run(stream()) == (IDENTITY_ANSWER, "stop")


def test_history_fitting_drops_whole_exchanges(service: ChatService) -> None:
    from stoker.demo.tasks import echo_prompt

    words = "red blue green yellow black white brown pink".split()
    exchange = [{"role": "user", "content": echo_prompt(words)}, {"role": "assistant", "content": " ".join(words)}]
    history = [{"role": "system", "content": "Be brief."}, *exchange * 30, *WHO]
    kept, dropped = service.fit_history(history, 64)
    assert dropped > 0 and dropped % 2 == 0
    assert kept[0] == history[0] and kept[1:] == history[1 + dropped:]
    assert len(service.prepare(kept).request.prompt_ids) <= service.max_model_len - 64


def test_banners_name_the_adapters_in_use(demo_chat: Path, demo_adapter: Path) -> None:
    from stoker.chat import open_chat_service
    from stoker.config import load_settings

    settings = load_settings(overrides={"model_name_or_path": str(demo_chat),
                                        "adapter_name_or_path": str(demo_adapter)}, env={})
    merged = open_chat_service(settings)
    try:
        assert merged.describe() == f"{demo_chat.name} + {demo_adapter.name}"
        assert merged.info.merged_adapters == [demo_adapter.name] and merged.info.adapters == []
    finally:
        merged.close()
