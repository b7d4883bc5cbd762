"""``POST /tokenize``, ``/detokenize`` and ``/v1/chat/completions/render`` on the real server: what they report is
what generation sees, checked against the model's own tokenizer and Jinja chat template, and the generation route's
``usage.prompt_tokens``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from api_server import REQUEST_TIMEOUT_S, ApiServer, client, start_server, stop_server  # noqa: E402

KEY = "sk-tokens"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say the colour of the sky."}]

pytestmark = pytest.mark.slow  # one server process


@pytest.fixture(scope="module")
def server(demo_chat: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    srv = start_server({"model_name_or_path": str(demo_chat), "max_new_tokens": 16}, tmp_path_factory.mktemp("tok"),
                       env={"API_KEY": KEY})  # fmt: skip
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text(), srv.log_text()


@pytest.fixture(scope="module")
def tokenizer(demo_chat: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_chat)


def post(srv: ApiServer, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers=kw.pop("headers", AUTH), timeout=REQUEST_TIMEOUT_S, **kw)


def test_tokenize_text_and_messages_as_generation_would(server: ApiServer, tokenizer, demo_chat: Path) -> None:
    text = post(server, "/tokenize", {"prompt": "Hello there, blue sky", "return_token_strs": True})
    assert text.status_code == 200, text.text
    ids = tokenizer("Hello there, blue sky")["input_ids"]
    assert text.json() == {"count": len(ids), "max_model_len": text.json()["max_model_len"], "tokens": ids,
                           "token_strs": tokenizer.convert_ids_to_tokens(ids)}  # fmt: skip
    assert text.json()["max_model_len"] > 0

    chat = post(server, "/tokenize", {"model": str(demo_chat), "messages": MESSAGES})
    assert chat.status_code == 200, chat.text
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert chat.json()["tokens"] == list(expected["input_ids"])
    assert chat.json()["token_strs"] is None
    reply = client(server, api_key=KEY).chat.completions.create(model=str(demo_chat), messages=MESSAGES, max_tokens=2)
    assert reply.usage.prompt_tokens == chat.json()["count"]


def test_render_returns_the_exact_prompt_text_and_ids(server: ApiServer, tokenizer, demo_chat: Path) -> None:
    response = post(server, "/v1/chat/completions/render", {"model": str(demo_chat), "messages": MESSAGES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prompt"] == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert body["prompt_token_ids"] == post(server, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
    assert (body["model"], body["count"]) == (str(demo_chat), len(body["prompt_token_ids"]))


def test_detokenize_round_trips(server: ApiServer, tokenizer) -> None:
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    response = post(server, "/detokenize", {"tokens": list(ids["input_ids"])})
    assert response.status_code == 200, response.text
    assert response.json() == {"prompt": tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                       tokenize=False)}  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "param", "says"),
    [
        ("/tokenize", {}, None, "send exactly one of prompt (text) or messages"),
        ("/tokenize", {"prompt": "hi", "messages": MESSAGES}, None, "send exactly one of prompt"),
        ("/tokenize", {"prompt": ""}, "prompt", "prompt[0] is empty"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]}, None, "role"),
        ("/detokenize", {"tokens": [1, 10**9]}, "tokens", "tokens has token ids outside the vocabulary"),
        ("/detokenize", {"tokens": [True]}, None, "tokens"),
        ("/detokenize", {"tokens": []}, None, "tokens"),
    ],
)
def test_bad_bodies_are_400_naming_the_problem(server: ApiServer, path: str, body: dict, param: str | None,
                                               says: str) -> None:  # fmt: skip
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert says.lower() in error["message"].lower(), error
    if param is not None:
        assert error["param"] == param, error


def test_the_routes_need_the_key_and_are_in_the_schema(server: ApiServer) -> None:
    for path in ("/tokenize", "/detokenize", "/v1/chat/completions/render"):
        assert post(server, path, {"prompt": "hi"}, headers={}).status_code == 401
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert {"/tokenize", "/detokenize", "/v1/chat/completions/render"} <= set(schema["paths"])
    assert {"TokenizeRequest", "DetokenizeRequest"} <= set(schema["components"]["schemas"])
