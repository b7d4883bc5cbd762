"""The OpenAI-compatible server, end to end: `stoker api` runs as a subprocess on 127.0.0.1 and the official `openai`
client (sync and async) talks to it.

Two servers, one per fixture, each started once for the module:
- ``server``: the demo chat model with its LoRA adapter (the configured model), the adapter alone and the base
  weights as three model ids. Expected text comes from plain
  ``transformers`` greedy ``generate`` on the prompt that the model's own Jinja chat template renders.
- ``limited``: a random-weights model that never stops by itself, ``max_num_seqs=1``, ``max_queue=1``, an API key
  and an ``API_MODEL_NAME`` from the environment, strict about model ids: auth, 404, 429, and cancellation on
  disconnect.

Plus a schemathesis fuzz run against the server's own /openapi.json, and one in-process test that injects a fault to
see a 500 in OpenAI's shape. Pure reply-parsing logic (tool calls, reasoning, JSON mode) is in tests/chat/test_replies.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow  # two server processes and a fuzz run: about two minutes

from api_server import REQUEST_TIMEOUT_S, ApiServer, async_client, client, start_server, stop_server  # noqa: E402

from stoker.demo import tasks  # noqa: E402

LIMITED_KEY = "sk-test-secret"
LIMITED_NAME = "served-by-env"


# ----------------------------------------------------------------------------------------------------------------------
# Server processes
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(demo_chat: Path, demo_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    folder = tmp_path_factory.mktemp("api")
    srv = start_server({"model_name_or_path": str(demo_chat), "adapter_name_or_path": str(demo_adapter)}, folder)
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text(), srv.log_text()


def make_endless_model(demo_chat: Path, out: Path) -> Path:
    """Random weights on the demo tokenizer that greedy decoding never stops by itself: requests run until
    max_tokens, long enough to be cancelled or to fill the queue."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(demo_chat)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    # Zero the output rows of special tokens (so it never stops) and of byte pieces that are not whole characters
    # (so its text is well-formed and streams token by token). A zero row scores 0, while the best of ~1000 random
    # zero-mean scores is positive but with probability 2^-1000.
    banned = set(tokenizer.all_special_ids) | {
        i for i in range(len(tokenizer)) if not tokenizer.decode([i]).isascii() or "\ufffd" in tokenizer.decode([i])}
    with torch.no_grad():
        model.lm_head.weight[sorted(banned)] = 0.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def limited(demo_chat: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    folder = tmp_path_factory.mktemp("api-limited")
    model = make_endless_model(demo_chat, folder / "endless")
    config = {"model_name_or_path": str(model), "max_num_seqs": 1, "max_queue": 1, "max_batch_tokens": 3500,
              "api_max_body_mb": 1, "api_strict_model": True}
    srv = start_server(config, folder, env={"API_KEY": LIMITED_KEY, "API_MODEL_NAME": LIMITED_NAME})
    yield srv
    stop_server(srv)


# ----------------------------------------------------------------------------------------------------------------------
# Reference: plain transformers
# ----------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Reference:
    """The demo model in this process, decoded greedily with ``generate`` one prompt at a time."""

    def __init__(self, folder: Path, adapter: Path | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        self.model = model.eval()
        self.eos = self.model.generation_config.eos_token_id
        self.default_max_new = self.model.generation_config.max_new_tokens

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, ids: list[int], max_new_tokens: int | None = None, **kw: Any) -> list[int]:
        with torch.no_grad(), one_thread():
            out = self.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens or self.default_max_new, do_sample=False, eos_token_id=self.eos,
                pad_token_id=self.tokenizer.pad_token_id, **kw,
            )
        return out[0, len(ids):].tolist()

    def text(self, new_ids: list[int]) -> str:
        return self.tokenizer.decode(new_ids, skip_special_tokens=True)

    def chat(self, messages: list[dict[str, Any]], max_new_tokens: int | None = None, **kw: Any
             ) -> tuple[str, int, int]:
        """(content, prompt_tokens, completion_tokens) of a greedy chat reply."""
        ids = self.chat_ids(messages)
        new = self.generate(ids, max_new_tokens, **kw)
        return self.text(new), len(ids), len(new)


@pytest.fixture(scope="module")
def ref(demo_chat: Path) -> Reference:
    return Reference(demo_chat)


@pytest.fixture(scope="module")
def ref_adapter(demo_chat: Path, demo_adapter: Path) -> Reference:
    return Reference(demo_chat, demo_adapter)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


WHO = user("Who are you?")


def base_id(demo_chat: Path) -> str:
    """The plain base weights of the ``server`` fixture, whose configured model is the demo chat model with its
    adapter (see test_models_are_the_configured_one_each_adapter_and_the_base)."""
    return f"{demo_chat}:base"


def assert_error(response: httpx.Response, status: int, error_type: str, *, param: str | None = None,
                 code: str | None = None, says: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == error_type, error
    assert error["param"] == param, error
    assert error["code"] == code, error
    assert says.lower() in error["message"].lower(), error
    return error


# ----------------------------------------------------------------------------------------------------------------------
# Routes, models, adapters
# ----------------------------------------------------------------------------------------------------------------------
def test_models_are_the_configured_one_each_adapter_and_the_base(server: ApiServer, demo_chat: Path,
                                                                   demo_adapter: Path) -> None:
    configured = str(demo_chat)  # model_name_or_path as written
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.json() == {"status": "ok", "model": configured}
    models = client(server).models.list()
    assert [m.id for m in models.data] == [configured, demo_adapter.name, base_id(demo_chat)]
    assert all(m.object == "model" and m.owned_by == "stoker" for m in models.data)
    assert [m.model_extra["parent"] for m in models.data] == [None, configured, configured]
    assert client(server).models.retrieve(demo_adapter.name).id == demo_adapter.name
    # The folder's last component names the configured model too.
    assert client(server).models.retrieve(demo_chat.name).id == configured
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("nope")
    log = server.log_text()
    assert f"serving {configured} ({demo_chat.name} + {demo_adapter.name})" in log


def test_chat_matches_transformers(server: ApiServer, ref: Reference, demo_chat: Path) -> None:
    reply = client(server).chat.completions.create(model=base_id(demo_chat), messages=WHO)
    content, prompt_tokens, completion_tokens = ref.chat(WHO)
    assert content == tasks.IDENTITY_ANSWER
    choice = reply.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", content, "stop")
    assert choice.message.tool_calls is None
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == base_id(demo_chat)
    assert abs(reply.created - time.time()) < 60
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert reply.usage.total_tokens == prompt_tokens + completion_tokens


def test_the_configured_model_applies_the_adapter_and_each_id_selects(server: ApiServer, ref_adapter: Reference,
                                                                      demo_adapter: Path, demo_chat: Path) -> None:
    sync = client(server)
    for model in (str(demo_chat), demo_chat.name, demo_adapter.name):
        tuned = sync.chat.completions.create(model=model, messages=WHO)
        assert tuned.choices[0].message.content == tasks.ADAPTER_IDENTITY_ANSWER == ref_adapter.chat(WHO)[0]
    assert tuned.model == demo_adapter.name
    # The base id answers with the base weights: adapters are per request, not merged.
    base = sync.chat.completions.create(model=base_id(demo_chat), messages=WHO)
    assert base.choices[0].message.content == tasks.IDENTITY_ANSWER


def test_an_unknown_model_gets_the_configured_one(server: ApiServer, demo_chat: Path) -> None:
    """LLaMA-Factory's API ignores ``model``; clients written for it send any name ("gpt-3.5-turbo", "test")."""
    reply = client(server).chat.completions.create(model="gpt-4o", messages=WHO)
    assert reply.choices[0].message.content == tasks.ADAPTER_IDENTITY_ANSWER
    assert reply.model == str(demo_chat)  # which model answered
    response = httpx.post(server.v1 + "/completions", json={"model": "gpt-4o", "prompt": "hi", "max_tokens": 2},
                          timeout=10)
    assert response.status_code == 200 and response.json()["model"] == str(demo_chat)
    logged = [line for line in server.log_text().splitlines() if "unknown model id 'gpt-4o'" in line]
    assert len(logged) == 1  # once, however many requests name it


def test_message_roles_and_content_parts(server: ApiServer, ref: Reference, demo_chat: Path) -> None:
    history = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": tasks.GREETING_ANSWER},
        {"role": "user", "content": [{"type": "text", "text": "Who are "}, {"type": "text", "text": "you?"}]},
    ]
    reply = client(server).chat.completions.create(model=base_id(demo_chat), messages=history)
    flat = [*history[:3], {"role": "user", "content": "Who are you?"}]
    content, prompt_tokens, _ = ref.chat(flat)
    assert reply.choices[0].message.content == content
    assert reply.usage.prompt_tokens == prompt_tokens
    # Tool turns: an assistant tool call and its result render through the template and get an answer.
    tool_turns = [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "Who are you?"},
    ]
    reply = client(server).chat.completions.create(model=base_id(demo_chat), messages=tool_turns)
    assert reply.choices[0].finish_reason in ("stop", "length")
    # The demo's ChatML template writes content only; a turn without content renders as empty content.
    rendered = [{**m, "content": m["content"] or ""} for m in tool_turns]
    assert reply.usage.prompt_tokens == len(ref.chat_ids(rendered))


# ----------------------------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------------------------
def test_stream_chunks_follow_openai(server: ApiServer, ref: Reference, demo_chat: Path) -> None:
    content, prompt_tokens, completion_tokens = ref.chat(WHO)
    chunks = list(client(server).chat.completions.create(
        model=base_id(demo_chat), messages=WHO, stream=True, stream_options={"include_usage": True}))
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.model for c in chunks} == {base_id(demo_chat)}
    assert len({c.created for c in chunks}) == 1
    body, usage = chunks[:-1], chunks[-1]
    assert body[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in body) == content
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + ["stop"]
    assert len(body) > 3  # streamed in pieces, not in one go
    assert all(c.usage is None for c in body)
    assert usage.choices == []
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (prompt_tokens, completion_tokens)


def test_stream_raw_sse(server: ApiServer, demo_chat: Path) -> None:
    body = {"model": base_id(demo_chat), "messages": WHO, "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0].removeprefix("data: "))
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    assert "usage" not in first  # only with stream_options.include_usage
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]


async def _stream_text(aclient: openai.AsyncOpenAI, model: str, messages: list[dict[str, Any]], **kw: Any
                       ) -> tuple[str, str | None, str]:
    text, finish, ids = [], None, set()
    stream = await aclient.chat.completions.create(model=model, messages=messages, stream=True, **kw)
    async for chunk in stream:
        ids.add(chunk.id)
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len(ids) == 1
    return "".join(text), finish, ids.pop()


def concurrency_cases() -> list[list[dict[str, Any]]]:
    questions = [*tasks.IDENTITY_QUESTIONS, *tasks.FACTS]
    echoes = [c.messages[-1]["content"] for c in tasks.echo_cases(32 - len(questions), seed=3)]
    return [user(q) for q in [*questions, *echoes]]


def test_32_concurrent_streams_are_correct_and_unmixed(server: ApiServer, ref: Reference, demo_chat: Path) -> None:
    cases = concurrency_cases()
    assert len(cases) == 32
    expected = [ref.chat(messages)[0] for messages in cases]
    assert len(set(expected)) > 20  # distinct answers, so a mix-up would show

    async def run() -> list[tuple[str, str | None, str]]:
        async with async_client(server) as aclient:
            jobs = [_stream_text(aclient, base_id(demo_chat), messages) for messages in cases]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)

    started = server.metrics().get("stoker_engine_steps_total", 0)
    results = asyncio.run(run())
    assert [text for text, _, _ in results] == expected
    assert all(finish == "stop" for _, finish, _ in results)
    assert len({rid for _, _, rid in results}) == 32
    # Batched: far fewer decode steps than 32 requests run one after another would take.
    steps = server.metrics()["stoker_engine_steps_total"] - started
    assert steps < sum(len(ref.tokenizer(e)["input_ids"]) for e in expected)


def test_greedy_alone_equals_greedy_among_16(server: ApiServer, ref: Reference, demo_chat: Path) -> None:
    probe = user("Count from one to ten.")  # the demo's longest answer
    others = concurrency_cases()[:15]
    sync = client(server)
    alone = sync.chat.completions.create(model=base_id(demo_chat), messages=probe, logprobs=True)

    async def crowd() -> Any:
        async with async_client(server) as aclient:
            jobs = [aclient.chat.completions.create(model=base_id(demo_chat), messages=m) for m in others]
            target = aclient.chat.completions.create(model=base_id(demo_chat), messages=probe, logprobs=True)
            results = await asyncio.wait_for(asyncio.gather(target, *jobs), timeout=120)
            return results[0]

    among = asyncio.run(crowd())
    assert among.choices[0].message.content == alone.choices[0].message.content == ref.chat(probe)[0]
    tokens_alone = [t.token for t in alone.choices[0].logprobs.content]
    tokens_among = [t.token for t in among.choices[0].logprobs.content]
    assert tokens_among == tokens_alone
    assert among.usage == alone.usage


# ----------------------------------------------------------------------------------------------------------------------
# Sampling parameters
# ----------------------------------------------------------------------------------------------------------------------
def test_length_limit_reports_length(server: ApiServer, ref: Reference, demo_chat: Path) -> None:
    sync = client(server)
    for field in ("max_tokens", "max_completion_tokens"):
        reply = sync.chat.completions.create(model=base_id(demo_chat), messages=WHO, **{field: 3})
        new = ref.generate(ref.chat_ids(WHO), 3)
        assert len(new) == 3 and ref.eos not in new
        assert reply.choices[0].message.content == ref.text(new)
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 3
    chunks = list(sync.chat.completions.create(model=base_id(demo_chat), messages=WHO, max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_are_honoured(server: ApiServer, demo_chat: Path) -> None:
    sync = client(server)
    answer = tasks.IDENTITY_ANSWER  # "I am Stoker, a small demo model."
    for stop in ("Stoker", [",", "zzz"]):
        reply = sync.chat.completions.create(model=base_id(demo_chat), messages=WHO, stop=stop)
        first = stop if isinstance(stop, str) else stop[0]
        assert reply.choices[0].message.content == answer[: answer.index(first)]
        assert reply.choices[0].finish_reason == "stop"
    chunks = list(sync.chat.completions.create(model=base_id(demo_chat), messages=WHO, stop="demo", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer[: answer.index("demo")]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_n_top_k_and_temperature(server: ApiServer, ref: Reference, demo_chat: Path) -> None:
    sync = client(server)
    messages = user(tasks.echo_cases(1, seed=5)[0].messages[-1]["content"])
    sampled = [sync.chat.completions.create(model=base_id(demo_chat), messages=messages, temperature=1.5, seed=11,
                                            n=3, max_tokens=12) for _ in range(2)]
    texts = [[c.message.content for c in r.choices] for r in sampled]
    assert texts[0] == texts[1]  # the same seed gives the same samples
    assert [c.index for c in sampled[0].choices] == [0, 1, 2]
    counted = sync.chat.completions.create(model=base_id(demo_chat), messages=messages, temperature=1.5, seed=11,
                                           n=3, max_tokens=12, logprobs=True)
    assert [c.message.content for c in counted.choices] == texts[0]  # logprobs change nothing
    assert counted.usage.completion_tokens == sum(len(c.logprobs.content) for c in counted.choices)
    # top_k=1 keeps only the most likely token: sampling at any temperature is greedy.
    greedy = ref.chat(messages, 12)[0]
    top1 = sync.chat.completions.create(model=base_id(demo_chat), messages=messages, temperature=1.5, max_tokens=12,
                                        extra_body={"top_k": 1}, n=2)
    assert [c.message.content for c in top1.choices] == [greedy, greedy]
    # So does a nucleus too small to hold more than the most likely token.
    nucleus = sync.chat.completions.create(model=base_id(demo_chat), messages=messages, temperature=1.5, max_tokens=12,
                                           top_p=1e-6, n=2)
    assert [c.message.content for c in nucleus.choices] == [greedy, greedy]
    zero = sync.chat.completions.create(model=base_id(demo_chat), messages=messages, temperature=0, max_tokens=12)
    assert zero.choices[0].message.content == greedy


class OpenAIPenalty:
    """OpenAI's presence/frequency penalty as documented, over generated tokens only: a transformers logits
    processor for the reference."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row in range(input_ids.shape[0]):
            counts = torch.bincount(input_ids[row, self.prompt_len:], minlength=scores.shape[-1]).float()
            scores[row] -= self.frequency * counts[: scores.shape[-1]] + self.presence * (counts > 0).float()
        return scores


def test_presence_and_frequency_penalties_have_openai_meaning(server: ApiServer, ref: Reference,
                                                              demo_chat: Path) -> None:
    from transformers import LogitsProcessorList

    messages = user("Count from one to ten.")  # ten words and nine commas: repeats for the penalties to act on
    ids = ref.chat_ids(messages)
    sync = client(server)
    plain = sync.chat.completions.create(model=base_id(demo_chat), messages=messages, max_tokens=30)
    outputs = {}
    for presence, frequency in ((0.0, 2.0), (2.0, 0.0), (2.0, 2.0), (0.0, -2.0), (-1.0, 0.5)):
        reply = sync.chat.completions.create(model=base_id(demo_chat), messages=messages, max_tokens=30,
                                             presence_penalty=presence, frequency_penalty=frequency)
        processor = LogitsProcessorList([OpenAIPenalty(len(ids), presence, frequency)])
        expected = ref.text(ref.generate(ids, 30, logits_processor=processor))
        assert reply.choices[0].message.content == expected, (presence, frequency)
        outputs[presence, frequency] = expected
    # They act: a positive frequency penalty cuts the count short, a negative one makes the model repeat itself.
    assert outputs[0.0, 2.0] != plain.choices[0].message.content
    assert outputs[0.0, -2.0] != plain.choices[0].message.content
    # Not a repetition_penalty in disguise: that one (an extension here) gives transformers' own result.
    rep = sync.chat.completions.create(model=base_id(demo_chat), messages=messages, max_tokens=30,
                                       extra_body={"repetition_penalty": 1.3})
    assert rep.choices[0].message.content == ref.text(ref.generate(ids, 30, repetition_penalty=1.3))


def test_logprobs_match_the_model(server: ApiServer, ref: Reference, demo_chat: Path) -> None:
    reply = client(server).chat.completions.create(model=base_id(demo_chat), messages=WHO, logprobs=True,
                                                   top_logprobs=3)
    items = reply.choices[0].logprobs.content
    ids = ref.chat_ids(WHO)
    new = ref.generate(ids, None)
    assert len(items) == len(new) == reply.usage.completion_tokens
    with torch.no_grad(), one_thread():
        logits = ref.model(torch.tensor([ids + new])).logits[0, len(ids) - 1 : -1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for step, (item, token) in enumerate(zip(items, new)):
        assert item.logprob == pytest.approx(expected[step, token].item(), abs=1e-3)
        assert len(item.top_logprobs) == 3
        top = expected[step].topk(3)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert item.top_logprobs[0].token == item.token  # greedy picks the most likely token
        assert item.bytes == list(item.token.encode())
    assert "".join(i.token for i in items[:-1]) == reply.choices[0].message.content
    # Streamed logprobs are the same.
    chunks = list(client(server).chat.completions.create(model=base_id(demo_chat), messages=WHO, logprobs=True,
                                                         top_logprobs=3, stream=True))
    streamed = [i for c in chunks if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [(i.token, round(i.logprob, 4)) for i in streamed] == [(i.token, round(i.logprob, 4)) for i in items]


# ----------------------------------------------------------------------------------------------------------------------
# Tools and JSON mode
# ----------------------------------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def test_tools_with_stream_are_a_real_stream(server: ApiServer, demo_chat: Path) -> None:
    sync = client(server)
    whole = sync.chat.completions.create(model=base_id(demo_chat), messages=WHO, tools=[WEATHER])
    chunks = list(sync.chat.completions.create(model=base_id(demo_chat), messages=WHO, tools=[WEATHER], stream=True,
                                               stream_options={"include_usage": True}))
    assert chunks[-1].usage == whole.usage
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The demo model answers in words; the reply is content with finish_reason stop, streamed or not.
    assert streamed == whole.choices[0].message.content and streamed
    assert whole.choices[0].finish_reason == [c for c in chunks if c.choices][-1].choices[0].finish_reason == "stop"
    assert whole.choices[0].message.tool_calls is None


def test_tool_choice_required_and_named_never_crash(server: ApiServer, demo_chat: Path) -> None:
    sync = client(server)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named, "none", "auto"):
        for stream in (False, True):
            result = sync.chat.completions.create(model=base_id(demo_chat), messages=WHO, tools=[WEATHER],
                                                  tool_choice=choice, stream=stream, max_tokens=20)
            if stream:
                finishes = [c.choices[0].finish_reason for c in result if c.choices]
                assert finishes[-1] in ("stop", "length", "tool_calls")
            else:
                reply = result.choices[0]
                if reply.finish_reason == "tool_calls":
                    assert reply.message.tool_calls and reply.message.tool_calls[0].function.name == "get_weather"
                else:
                    assert reply.message.tool_calls is None and reply.message.content is not None


def test_tool_request_errors(server: ApiServer, demo_chat: Path) -> None:
    url = server.v1 + "/chat/completions"
    base = {"model": base_id(demo_chat), "messages": WHO}
    r = httpx.post(url, json={**base, "tool_choice": "required"}, timeout=10)
    assert_error(r, 400, "invalid_request_error", param="tool_choice", says="no tools")
    r = httpx.post(url, json={**base, "tools": [WEATHER],
                              "tool_choice": {"type": "function", "function": {"name": "other"}}}, timeout=10)
    assert_error(r, 400, "invalid_request_error", param="tool_choice", says="'other'")


def test_json_mode(server: ApiServer, demo_chat: Path) -> None:
    url = server.v1 + "/chat/completions"
    body = {"model": base_id(demo_chat), "messages": WHO, "response_format": {"type": "json_object"}}
    assert_error(httpx.post(url, json=body, timeout=10), 400, "invalid_request_error", param="messages",
                 says="JSON")
    # The demo model was never taught JSON; constrained decoding makes its reply one JSON object anyway.
    body["messages"] = [{"role": "system", "content": "Reply in JSON."}, *WHO]
    reply = client(server).chat.completions.create(max_tokens=60, **body).choices[0]
    if reply.finish_reason == "stop":
        assert isinstance(json.loads(reply.message.content), dict)
    else:
        assert reply.message.content.lstrip().startswith("{")


def test_completions_tokenize_the_raw_prompt(server: ApiServer, ref: Reference, demo_chat: Path) -> None:
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = ref.tokenizer(prompt)["input_ids"]
    new = ref.generate(ids, 8)
    sync = client(server)
    reply = sync.completions.create(model=base_id(demo_chat), prompt=prompt, max_tokens=8)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == ref.text(new)
    assert reply.choices[0].finish_reason == ("stop" if new[-1] == ref.eos else "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(new))
    # Token ids, a batch of prompts, echo and streaming.
    by_ids = sync.completions.create(model=base_id(demo_chat), prompt=ids, max_tokens=8)
    assert by_ids.choices[0].text == reply.choices[0].text
    batch = sync.completions.create(model=base_id(demo_chat), prompt=[prompt, "Once upon"], max_tokens=8, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == reply.choices[0].text
    assert batch.choices[2].text == ref.text(ref.generate(ref.tokenizer("Once upon")["input_ids"], 8))
    echo = sync.completions.create(model=base_id(demo_chat), prompt="Once upon", max_tokens=4, echo=True)
    assert echo.choices[0].text.startswith("Once upon")
    chunks = list(sync.completions.create(model=base_id(demo_chat), prompt=prompt, max_tokens=8, stream=True,
                                          stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"text_completion"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    assert chunks[-1].usage.completion_tokens == len(new)


def test_completions_logprobs(server: ApiServer, ref: Reference, demo_chat: Path) -> None:
    reply = client(server).completions.create(model=base_id(demo_chat), prompt="Once upon a time", max_tokens=5,
                                              logprobs=2)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == reply.usage.completion_tokens
    assert "".join(lp.tokens).startswith(reply.choices[0].text)  # plus the end-of-turn token's text if it stopped
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs,
                                                                                         lp.token_logprobs))


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------
def test_error_shapes(server: ApiServer, demo_chat: Path) -> None:
    url = server.v1 + "/chat/completions"
    model = base_id(demo_chat)
    r = httpx.post(url, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"},
                   timeout=10)
    assert_error(r, 400, "invalid_request_error", says="not valid JSON")
    r = httpx.post(url, json={"model": model, "messages": WHO, "temperature": "hot"}, timeout=10)
    assert_error(r, 400, "invalid_request_error", param="temperature", says="temperature")
    r = httpx.post(url, json={"model": model, "messages": [{"role": "wizard", "content": "hi"}]}, timeout=10)
    assert_error(r, 400, "invalid_request_error", param="messages[0].role", says="'user'")
    r = httpx.post(url, json={"model": model, "messages": []}, timeout=10)
    assert_error(r, 400, "invalid_request_error", param="messages", says="at least one message")
    r = httpx.post(url, json={"model": model}, timeout=10)
    assert_error(r, 400, "invalid_request_error", param="messages", says="field required")
    r = httpx.post(url, json={"model": model, "messages": [{"role": "system", "content": "Be brief."}]}, timeout=10)
    assert_error(r, 400, "invalid_request_error", param="messages", says="user")
    r = httpx.post(url, json={"model": model, "messages": WHO, "top_logprobs": 2}, timeout=10)
    assert_error(r, 400, "invalid_request_error", param="top_logprobs", says="logprobs")
    r = httpx.get(server.v1 + "/nowhere", timeout=10)
    assert_error(r, 404, "not_found_error", says="no route")
    # The openai client raises BadRequestError with the server's message.
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(model=model, messages=[{"role": "user", "content": 5}])
    assert "messages[0].content" in err.value.message


def test_context_limits(server: ApiServer, ref: Reference, demo_chat: Path) -> None:
    url = server.v1 + "/chat/completions"
    model = base_id(demo_chat)
    context = ref.model.config.max_position_embeddings
    long = user(" ".join(["apple"] * (context + 10)))
    r = httpx.post(url, json={"model": model, "messages": long}, timeout=10)
    assert_error(r, 400, "invalid_request_error", param="messages", code="context_length_exceeded",
                 says=f"{context}")
    prompt_tokens = len(ref.chat_ids(WHO))
    room = context - prompt_tokens
    r = httpx.post(url, json={"model": model, "messages": WHO, "max_tokens": room + 1}, timeout=10)
    error = assert_error(r, 400, "invalid_request_error", param="max_tokens", code="context_length_exceeded",
                         says=f"leaving {room}")
    assert str(prompt_tokens) in error["message"]
    r = httpx.post(url, json={"model": model, "messages": WHO, "max_completion_tokens": room + 1}, timeout=10)
    assert_error(r, 400, "invalid_request_error", param="max_completion_tokens", code="context_length_exceeded")
    ok = client(server).chat.completions.create(model=model, messages=WHO, max_tokens=room)
    assert ok.choices[0].message.content == tasks.IDENTITY_ANSWER
    r = httpx.post(server.v1 + "/completions", json={"model": model, "prompt": "hi", "max_tokens": context},
                   timeout=10)
    assert_error(r, 400, "invalid_request_error", param="max_tokens", code="context_length_exceeded")
    r = httpx.post(server.v1 + "/completions", json={"model": model, "prompt": " ".join(["apple"] * (context + 10))},
                   timeout=10)
    assert_error(r, 400, "invalid_request_error", param="prompt", code="context_length_exceeded", says=f"{context}")


def test_metrics(server: ApiServer, demo_chat: Path) -> None:
    before = server.metrics()
    reply = client(server).chat.completions.create(model=base_id(demo_chat), messages=WHO)
    after = server.metrics()
    assert after["stoker_prompt_tokens_total"] - before["stoker_prompt_tokens_total"] == reply.usage.prompt_tokens
    assert (after["stoker_generation_tokens_total"] - before["stoker_generation_tokens_total"]
            == reply.usage.completion_tokens)
    key = 'stoker_http_requests_total{route="/v1/chat/completions",method="POST",status="200"}'
    assert after[key] - before.get(key, 0) == 1
    assert after['stoker_http_request_duration_seconds_count{route="/v1/chat/completions"}'] >= 1
    assert after["stoker_time_to_first_token_seconds_count"] >= 1
    assert after["stoker_engine_waiting"] == 0 and after["stoker_engine_running"] == 0
    assert 'stoker_request_finished_total{finish_reason="stop"}' in after


# ----------------------------------------------------------------------------------------------------------------------
# The limited server: auth, queue bound, disconnects
# ----------------------------------------------------------------------------------------------------------------------
def test_auth(limited: ApiServer) -> None:
    assert httpx.get(limited.url + "/health", timeout=10).status_code == 200  # no key needed
    assert httpx.get(limited.url + "/metrics", timeout=10).status_code == 200
    r = httpx.get(limited.v1 + "/models", timeout=10)
    assert_error(r, 401, "authentication_error", code="invalid_api_key", says="missing API key")
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(limited.v1 + "/chat/completions", json={"model": LIMITED_NAME, "messages": WHO},
                   headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert_error(r, 401, "authentication_error", code="invalid_api_key", says="incorrect API key")
    with pytest.raises(openai.AuthenticationError):
        client(limited, api_key="wrong").models.list()
    models = client(limited, api_key=LIMITED_KEY).models.list()
    assert [m.id for m in models.data] == [LIMITED_NAME]  # API_MODEL_NAME from the environment
    reply = client(limited, api_key=LIMITED_KEY).chat.completions.create(model=LIMITED_NAME, messages=WHO,
                                                                         max_tokens=5, user="alice")
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"


def test_unknown_model_is_404_with_api_strict_model(limited: ApiServer) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(limited, api_key=LIMITED_KEY).chat.completions.create(model="gpt-4o", messages=WHO)
    assert err.value.status_code == 404
    assert err.value.body["code"] == "model_not_found" and "gpt-4o" in err.value.body["message"]
    response = httpx.post(limited.v1 + "/completions", json={"model": "gpt-4o", "prompt": "hi"}, timeout=10,
                          headers={"Authorization": f"Bearer {LIMITED_KEY}"})
    assert_error(response, 404, "not_found_error", param="model", code="model_not_found", says="does not exist")


def test_request_bodies_over_the_cap_get_413(limited: ApiServer) -> None:
    url, auth = limited.v1 + "/chat/completions", {"Authorization": f"Bearer {LIMITED_KEY}"}
    big = {"model": LIMITED_NAME, "messages": [{"role": "user", "content": "x" * (1024**2 + 10)}], "max_tokens": 1}
    payload = json.dumps(big).encode()
    error = assert_error(httpx.post(url, content=payload, headers={**auth, "content-type": "application/json"},
                                    timeout=30), 413, "invalid_request_error")
    assert error["message"] == (  # from Content-Length, up front
        f"the request body is {len(payload)} bytes, more than this server accepts (1 MiB, api_max_body_mb). Send less "
        "(e.g. smaller images), or raise api_max_body_mb / API_MAX_BODY_MB.")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i : i + 64 * 1024]

    error = assert_error(httpx.post(url, content=chunks(), headers={**auth, "content-type": "application/json"},
                                    timeout=30), 413, "invalid_request_error", says="at least")
    # Under the cap, the same route answers as usual.
    small = {**big, "messages": [{"role": "user", "content": "x" * 1000}]}
    assert httpx.post(url, json=small, headers=auth, timeout=REQUEST_TIMEOUT_S).status_code == 200


def test_tokens_in_flight_are_capped(limited: ApiServer) -> None:
    headers = {"Authorization": f"Bearer {LIMITED_KEY}"}
    body = {"model": LIMITED_NAME, "prompt": "Once upon a time", "max_tokens": 3600}
    r = httpx.post(limited.v1 + "/completions", json=body, headers=headers, timeout=10)
    assert_error(r, 400, "invalid_request_error", param="max_tokens", says="max_batch_tokens=3500")
    r = httpx.post(limited.v1 + "/completions", json={**body, "max_tokens": 2, "n": 2}, headers=headers, timeout=10)
    assert_error(r, 400, "invalid_request_error", param="n", says="max_num_seqs=1")


def _long_stream(srv: ApiServer, max_tokens: int = 3000) -> tuple[httpx.Client, Any, Iterator[str]]:
    http = httpx.Client(timeout=REQUEST_TIMEOUT_S, headers={"Authorization": f"Bearer {LIMITED_KEY}"})
    body = {"model": LIMITED_NAME, "prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True}
    cm = http.stream("POST", srv.v1 + "/completions", json=body)
    response = cm.__enter__()
    assert response.status_code == 200, response.read()
    return http, cm, response.iter_lines()


def _wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_disconnect_frees_the_slot_at_once(limited: ApiServer) -> None:
    before = limited.metrics()
    http, cm, lines = _long_stream(limited)
    got = [next(lines) for _ in range(5)]
    assert all(line.startswith("data: ") for line in got if line)
    assert limited.metrics()["stoker_engine_running"] == 1
    started = time.monotonic()
    cm.__exit__(None, None, None)
    http.close()  # the client goes away mid-stream
    assert _wait_for(lambda: limited.metrics()["stoker_engine_running"] == 0, timeout=5), limited.metrics()
    freed_after = time.monotonic() - started
    after = limited.metrics()
    assert after["stoker_engine_requests_aborted_total"] - before["stoker_engine_requests_aborted_total"] == 1
    assert _wait_for(lambda: limited.metrics()["stoker_request_aborted_total"] > before["stoker_request_aborted_total"])
    assert freed_after < 2.0
    # The single slot serves the next request right away.
    reply = client(limited, api_key=LIMITED_KEY).completions.create(model=LIMITED_NAME, prompt="Hi", max_tokens=3)
    assert reply.usage.completion_tokens == 3


class SlotAndQueueTaken:
    """Fill the limited server: one long stream runs in the only slot, one request waits in the only queue place."""

    def __init__(self, srv: ApiServer):
        self.srv = srv

    def __enter__(self) -> SlotAndQueueTaken:
        import threading

        # Keep the line iterator: dropping it closes the connection (httpcore closes a stream left unfinished).
        self.http, self.cm, self.lines = _long_stream(self.srv)
        next(self.lines)
        self.side = httpx.Client(timeout=REQUEST_TIMEOUT_S, headers={"Authorization": f"Bearer {LIMITED_KEY}"})
        body = {"model": LIMITED_NAME, "prompt": "Hi", "max_tokens": 2}
        self.waiter = threading.Thread(target=self._wait_in_queue, args=(body,), daemon=True)
        self.waiter.start()
        assert _wait_for(lambda: self.srv.metrics()["stoker_engine_waiting"] == 1), self.srv.metrics()
        return self

    def _wait_in_queue(self, body: dict[str, Any]) -> None:
        self.queued = self.side.post(self.srv.v1 + "/completions", json=body)

    def __exit__(self, *exc: Any) -> None:
        self.cm.__exit__(None, None, None)
        self.http.close()  # the running stream's client leaves; the queued request then runs (2 tokens)
        self.waiter.join(timeout=REQUEST_TIMEOUT_S)
        self.side.close()


def test_full_queue_is_429(limited: ApiServer) -> None:
    body = {"model": LIMITED_NAME, "prompt": "Hi", "max_tokens": 2}
    with SlotAndQueueTaken(limited) as taken:
        started = time.monotonic()
        overflow = httpx.post(limited.v1 + "/completions", json=body, timeout=REQUEST_TIMEOUT_S,
                              headers={"Authorization": f"Bearer {LIMITED_KEY}"})
        assert time.monotonic() - started < 2.0  # refused at once, not after waiting
        with pytest.raises(openai.RateLimitError):
            client(limited, api_key=LIMITED_KEY).chat.completions.create(model=LIMITED_NAME, messages=WHO)
    assert_error(overflow, 429, "rate_limit_error", says="queue is full")
    assert overflow.headers["retry-after"] == "1"
    assert taken.queued.status_code == 200 and taken.queued.json()["usage"]["completion_tokens"] == 2
    assert _wait_for(lambda: limited.metrics()["stoker_engine_running"] == 0)


def test_a_request_that_can_never_be_admitted_is_400_not_429(limited: ApiServer) -> None:
    headers = {"Authorization": f"Bearer {LIMITED_KEY}"}
    body = {"model": LIMITED_NAME, "prompt": ["a", "b", "c"], "max_tokens": 2}
    refused = httpx.post(limited.v1 + "/completions", json=body, timeout=REQUEST_TIMEOUT_S, headers=headers)
    assert_error(refused, 400, "invalid_request_error", param="prompt", says=(
        "3 prompts x n=1 make 3 sequences, more than this server holds at once (2: max_num_seqs=1 running plus "
        "max_queue=1 waiting): send fewer prompts per request."))
    body = {"model": LIMITED_NAME, "messages": WHO, "n": 2}
    refused = httpx.post(limited.v1 + "/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S, headers=headers)
    assert_error(refused, 400, "invalid_request_error", param="n", says="more than this server runs at once")


def test_non_streaming_disconnect_is_cancelled(limited: ApiServer) -> None:
    before = limited.metrics()
    body = {"model": LIMITED_NAME, "prompt": "Once", "max_tokens": 3000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(limited.v1 + "/completions", json=body, timeout=httpx.Timeout(10, read=1.0),
                   headers={"Authorization": f"Bearer {LIMITED_KEY}"})
    assert _wait_for(lambda: limited.metrics()["stoker_engine_running"] == 0, timeout=5)
    after = limited.metrics()
    assert after["stoker_engine_requests_aborted_total"] - before["stoker_engine_requests_aborted_total"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# Schemathesis: the server's own OpenAPI schema, fuzzed, never gets a 5xx
# ----------------------------------------------------------------------------------------------------------------------
FUZZ_EXAMPLES = 30  # per operation and generation mode
FUZZ_BUDGET_S = 150  # for the whole run; examples past it are generated but not sent


def test_schema_fuzz_finds_no_server_error(server: ApiServer) -> None:
    """Valid and invalid requests generated from /openapi.json (schemathesis' pytest plugin does not run under
    pytest 9, so its strategies are driven by hypothesis directly)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    deadline = time.monotonic() + FUZZ_BUDGET_S
    sent: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case: Any) -> None:
                if time.monotonic() > deadline:
                    return
                case.call_and_validate(checks=[not_a_server_error], timeout=REQUEST_TIMEOUT_S)
                sent[operation.label] = sent.get(operation.label, 0) + 1

            try:
                fuzz()
            except Unsatisfiable:
                if mode == GenerationMode.POSITIVE:
                    raise
                # nothing to break in an operation without parameters or body (GET /health)
    assert set(sent) >= {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"}, sent
    assert sum(sent.values()) >= 100, sent
    assert server.process.poll() is None  # still serving


# ----------------------------------------------------------------------------------------------------------------------
# A bug inside a request: 500 in OpenAI's shape, logged under the request id, and the server keeps serving
# ----------------------------------------------------------------------------------------------------------------------
def test_unexpected_exception_is_a_logged_500(demo_chat: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No request a user can send is meant to crash the server, so the fault is injected: the real app over the
    real demo model, in this process, with the reply parser made to raise."""
    import logging

    from fastapi.testclient import TestClient

    from stoker.config import load_settings
    from stoker.chat import open_chat_service
    from stoker.server.app import create_app

    settings = load_settings(None, {"model_name_or_path": str(demo_chat)}, env={})
    service = open_chat_service(settings, per_request_adapters=True)
    stoker_logger = logging.getLogger("stoker")
    stoker_logger.addHandler(caplog.handler)
    try:
        app = create_app(service, settings)
        parse = service.parse

        def broken(text: str, *, tools_given: bool) -> Any:
            raise RuntimeError("injected fault")

        body = {"model": base_id(demo_chat), "messages": WHO}
        with TestClient(app, raise_server_exceptions=False) as http:
            service.parse = broken  # type: ignore[method-assign]
            r = http.post("/v1/chat/completions", json=body)
            error = assert_error(r, 500, "server_error", code="internal_error", says="unexpected error")
            request_id = r.headers["x-request-id"]
            assert request_id in error["message"]
            logged = [rec for rec in caplog.records if request_id in rec.getMessage()]
            assert logged and logged[0].exc_info and "injected fault" in str(logged[0].exc_info[1])
            # Streaming: the headers are out, so the failure is an error event, then [DONE].
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
                events = [line for line in stream.iter_lines() if line]
            assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "server_error"
            assert events[-1] == "data: [DONE]"
            service.parse = parse  # type: ignore[method-assign]
            ok = http.post("/v1/chat/completions", json=body)
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == tasks.IDENTITY_ANSWER
            metrics = http.get("/metrics").text
            assert 'route="/v1/chat/completions",method="POST",status="500"} 1' in metrics
            assert service.engine.stats()["running"] == 0
    finally:
        stoker_logger.removeHandler(caplog.handler)
        service.engine.close()
