"""Structured outputs and vLLM's sampling extensions on the real server (huggingface engine, the real SmolLM2 demo
model), called with the official client: the output is constrained while decoding, so every reply validates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from api_server import ApiServer, client, start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.slow  # one server process

from structured_cases import ASK, SCHEMAS, check_sampling_extensions, response_format  # noqa: E402

@pytest.fixture(scope="module")
def server(demo_smol: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    srv = start_server({"model_name_or_path": str(demo_smol), "template": "auto", "max_new_tokens": 96},
                       tmp_path_factory.mktemp("structured"))
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text(), srv.log_text()


def replies_for(api, schema: dict) -> dict[str, list]:
    """One schema's replies: greedy whole, greedy streamed (its text), and two sampled choices."""
    fmt = response_format(schema)
    whole = api.chat.completions.create(model="m", messages=ASK, max_tokens=160, temperature=0, response_format=fmt)
    chunks = api.chat.completions.create(model="m", messages=ASK, max_tokens=160, temperature=0, stream=True,
                                         response_format=fmt)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    sampled = api.chat.completions.create(model="m", messages=ASK, max_tokens=160, temperature=1.0, seed=7, n=2,
                                          response_format=fmt)
    return {"whole": [whole.choices[0]], "streamed": [streamed], "sampled": list(sampled.choices)}


def test_twenty_schemas_validate_whole_streamed_and_sampled(server: ApiServer) -> None:
    """All twenty at once (one batch): every reply ends by itself, parses and validates; streaming changes nothing."""
    import concurrent.futures

    api = client(server)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda s: replies_for(api, s), SCHEMAS))
    failures = []
    for i, (schema, got) in enumerate(zip(SCHEMAS, results, strict=True)):
        for choice in [*got["whole"], *got["sampled"]]:
            try:
                assert choice.finish_reason == "stop", choice.finish_reason
                jsonschema.validate(json.loads(choice.message.content), schema)
            except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
                failures.append((i + 1, choice.message.content, str(exc)[:200]))
        if got["streamed"][0] != got["whole"][0].message.content:
            failures.append((i + 1, got["streamed"][0], "streamed differs from whole"))
    assert not failures, failures


def test_constrained_and_free_requests_share_a_batch(server: ApiServer) -> None:
    import concurrent.futures

    api = client(server)
    free = api.chat.completions.create(model="m", messages=ASK, max_tokens=24, temperature=0)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(api.chat.completions.create, model="m", messages=ASK, max_tokens=96, temperature=0,
                            response_format=response_format(SCHEMAS[5])) for _ in range(3)]
        jobs.append(pool.submit(api.chat.completions.create, model="m", messages=ASK, max_tokens=24, temperature=0))
        results = [j.result() for j in jobs]
    texts = {r.choices[0].message.content for r in results[:3]}
    assert len(texts) == 1
    jsonschema.validate(json.loads(texts.pop()), SCHEMAS[5])
    assert results[3].choices[0].message.content == free.choices[0].message.content  # the free row is untouched


def test_structured_outputs_choice_regex_and_grammar(server: ApiServer) -> None:
    api = client(server)
    ask = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    reply = api.chat.completions.create(model="m", messages=ask, max_tokens=8, temperature=0,
                                        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert reply.choices[0].message.content in ("yes", "no", "maybe")
    phone = api.completions.create(model="m", prompt="Call me at", max_tokens=16, temperature=0,
                                   extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})
    assert __import__("re").fullmatch("[0-9]{3}-[0-9]{4}", phone.choices[0].text)
    grammar = 'root ::= "The answer is " ("one" | "two") "."'
    ebnf = api.chat.completions.create(model="m", messages=ask, max_tokens=16, temperature=0,
                                       extra_body={"guided_grammar": grammar})
    assert ebnf.choices[0].message.content in ("The answer is one.", "The answer is two.")
    lark = api.chat.completions.create(model="m", messages=ask, max_tokens=8, temperature=0,
                                       extra_body={"structured_outputs": {"grammar": 'start: "yes" | "no"'}})
    assert lark.choices[0].message.content in ("yes", "no")  # vLLM takes Lark grammars as well as EBNF


def test_a_named_tool_choice_is_decoded_in_its_schema(server: ApiServer) -> None:
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "unit": {"enum": ["celsius", "fahrenheit"]}},
              "required": ["city", "unit"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client(server).chat.completions.create(
        model="m", messages=ask, tools=tools, max_tokens=64, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), params)
    required = client(server).chat.completions.create(model="m", messages=ask, tools=tools, max_tokens=64,
                                                      temperature=0, tool_choice="required",
                                                      parallel_tool_calls=False)  # one call: the array is closed
    assert required.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(required.choices[0].message.tool_calls[0].function.arguments), params)


def test_sampling_extensions_do_what_vllm_says(server: ApiServer, demo_smol: Path) -> None:
    from transformers import AutoTokenizer

    check_sampling_extensions(client(server), AutoTokenizer.from_pretrained(demo_smol))


@pytest.mark.parametrize("extra, needle", [
    ({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= nothing_here"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "set exactly one"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "not valid JSON Schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs json_schema.schema"),
    ({"logit_bias": {"abc": 1}}, "not an integer"),
    ({"min_tokens": 500, "max_tokens": 10}, "min_tokens"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
])
def test_bad_constraints_are_400s_that_say_why(server: ApiServer, extra: dict, needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(model="m", messages=ASK, extra_body=extra)
    assert needle in err.value.body["message"], err.value.body


# --------------------------------------------------------------------------------------------------------------------
# The prompt's shape: add_generation_prompt, continue_final_message, chat_template_kwargs, include_reasoning

def test_continue_final_message_continues_the_assistant_text(server: ApiServer, demo_smol: Path) -> None:
    import httpx
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_smol)
    started = [{"role": "user", "content": "Count from one to ten."}, {"role": "assistant", "content": "One, two,"}]
    ids = httpx.post(server.url + "/tokenize", json={"messages": started, "add_generation_prompt": False,
                                                      "continue_final_message": True}, timeout=30).json()["tokens"]
    expected = tok.apply_chat_template(started, tokenize=True, add_generation_prompt=False,
                                       continue_final_message=True)
    assert ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    api = client(server)
    reply = api.chat.completions.create(model="m", messages=started, max_tokens=12, temperature=0,
                                        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    # The continuation of exactly that prompt, which a text completion of the same ids also gives.
    same = api.completions.create(model="m", prompt=ids, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == same.choices[0].text and reply.choices[0].message.content.strip()
    assert reply.usage.prompt_tokens == len(ids)
    # Without the generation prompt, a conversation ending on the user's turn renders without the assistant opener.
    bare = httpx.post(server.url + "/tokenize", json={"messages": started[:1], "add_generation_prompt": False},
                      timeout=30).json()["tokens"]
    assert tok.decode(bare) == tok.apply_chat_template(started[:1], tokenize=False, add_generation_prompt=False)
    for extra, needle in [({"continue_final_message": True}, "set add_generation_prompt to false"),
                          ({"chat_template_kwargs": {"messages": []}}, "cannot set messages")]:
        with pytest.raises(openai.BadRequestError) as err:
            api.chat.completions.create(model="m", messages=started, extra_body=extra)
        assert needle in err.value.body["message"], err.value.body


def test_include_reasoning_false_leaves_the_reasoning_out(demo_smol: Path,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    """SmolLM2 writes ChatML, as Qwen3 does; under a grammar it writes a Qwen3 reasoning block, which the qwen3
    template splits off as reasoning_content unless the request says include_reasoning: false."""
    srv = start_server({"model_name_or_path": str(demo_smol), "template": "qwen3"},
                       tmp_path_factory.mktemp("reasoning"))
    try:
        api = client(srv)
        grammar = 'root ::= "<think>\\nThe sky is blue.\\n</think>\\n\\n" ("yes" | "no")'
        ask = [{"role": "user", "content": "Is the sky blue?"}]
        for stream in (False, True):
            kept, dropped = (api.chat.completions.create(
                model="m", messages=ask, max_tokens=24, temperature=0, stream=stream,
                extra_body={"guided_grammar": grammar, "include_reasoning": include}) for include in (True, False))
            if stream:
                kept_parts = [c.choices[0].delta for c in kept if c.choices]
                dropped_parts = [c.choices[0].delta for c in dropped if c.choices]
                assert "".join(getattr(d, "reasoning_content", None) or "" for d in kept_parts) == "The sky is blue."
                assert not any(getattr(d, "reasoning_content", None) for d in dropped_parts)
                assert "".join(d.content or "" for d in dropped_parts) in ("yes", "no")
            else:
                assert kept.choices[0].message.reasoning_content == "The sky is blue."
                assert getattr(dropped.choices[0].message, "reasoning_content", None) is None
                assert dropped.choices[0].message.content == kept.choices[0].message.content in ("yes", "no")
    finally:
        stop_server(srv)


# --------------------------------------------------------------------------------------------------------------------
# prompt_logprobs, and echo with logprobs

def reference_prompt_logprobs(demo_smol: Path, ids: list[int]) -> list[float]:
    """Plain transformers: log-softmax of the logits at each position, read at the next prompt token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_smol, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


def test_prompt_logprobs_and_echo_with_logprobs(server: ApiServer, demo_smol: Path) -> None:
    import httpx

    prompt = "Once upon a time there was a little"
    ids = httpx.post(server.url + "/tokenize", json={"prompt": prompt}, timeout=30).json()["tokens"]
    expected = reference_prompt_logprobs(demo_smol, ids)
    body = {"model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0, "prompt_logprobs": 2}
    got = httpx.post(server.v1 + "/completions", json=body, timeout=60).json()["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    for pos, (entry, lp) in enumerate(zip(got[1:], expected, strict=True), start=1):
        assert entry[str(ids[pos])]["logprob"] == pytest.approx(lp, abs=1e-4)
        ranked = sorted((e["rank"], e["logprob"]) for e in entry.values() if e["rank"] is not None)
        assert [r for r, _ in ranked] == [1, 2] and ranked[0][1] >= ranked[1][1]
    chat = httpx.post(server.v1 + "/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "prompt_logprobs": 0},
        timeout=60).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]

    # echo + logprobs: the prompt's tokens come first, the first one unscored, as OpenAI's legacy API sends them.
    api = client(server)
    echo = api.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1)
    plain = api.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, logprobs=1)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text == prompt + plain.choices[0].text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert len(lp.tokens) == len(ids) + len(plain.choices[0].logprobs.tokens)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chunks = list(api.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                         logprobs=1, stream=True))
    first = next(c for c in chunks if c.choices and c.choices[0].text)
    assert first.choices[0].text == prompt and first.choices[0].logprobs.token_logprobs[0] is None
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echo.choices[0].text
