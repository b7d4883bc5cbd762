"""Clients written for ``llamafactory-cli api``, unchanged but for the port, against a LoRA config of the demo model.

LLaMA-Factory's inference guide starts the API on a LoRA config and calls it with the official client, naming the
base model's hub id; its own API ignores ``model``, so the answer is the fine-tuned model's. Stoker must give the
same answer: the configured model (base plus adapter) answers ids it does not know.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from api_server import ApiServer, start_server, stop_server  # noqa: E402

from stoker.demo import tasks  # noqa: E402

# The guide's llama3_lora_sft.yaml with its model paths changed to the demo models (and the demo's own template).
LORA_CONFIG = {"model_name_or_path": "demo:chat", "adapter_name_or_path": "demo:adapter", "finetuning_type": "lora"}


@pytest.fixture(scope="module")
def lora_server(demo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    srv = start_server(LORA_CONFIG, tmp_path_factory.mktemp("api-lf"))
    yield srv
    stop_server(srv)


def port(srv: ApiServer) -> int:
    return int(srv.url.rsplit(":", 1)[1])


def test_the_guides_client_snippet(lora_server: ApiServer) -> None:
    # From the guide, with the port of this test's server:
    from openai import OpenAI
    client = OpenAI(api_key="0",base_url=f"http://0.0.0.0:{port(lora_server)}/v1")
    messages = [{"role": "user", "content": "Who are you?"}]
    result = client.chat.completions.create(messages=messages, model="meta-llama/Meta-Llama-3-8B-Instruct")
    print(result.choices[0].message)
    # What it must print: the adapter's trained answer, from the configured model.
    assert result.choices[0].message.content == tasks.ADAPTER_IDENTITY_ANSWER
    assert result.model == "demo:chat"


def test_the_guides_client_streaming_and_async(lora_server: ApiServer) -> None:
    from openai import AsyncOpenAI, OpenAI

    client = OpenAI(api_key="0", base_url=f"http://0.0.0.0:{port(lora_server)}/v1")
    messages = [{"role": "user", "content": "Who are you?"}]
    stream = client.chat.completions.create(messages=messages, model="meta-llama/Meta-Llama-3-8B-Instruct",
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == tasks.ADAPTER_IDENTITY_ANSWER

    async def both() -> tuple[str, str]:
        aclient = AsyncOpenAI(api_key="0", base_url=f"http://0.0.0.0:{port(lora_server)}/v1")
        whole = await aclient.chat.completions.create(messages=messages, model="meta-llama/Meta-Llama-3-8B-Instruct")
        pieces = []
        async for chunk in await aclient.chat.completions.create(
                messages=messages, model="meta-llama/Meta-Llama-3-8B-Instruct", stream=True):
            pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        await aclient.close()
        return whole.choices[0].message.content, "".join(pieces)

    assert asyncio.run(both()) == (tasks.ADAPTER_IDENTITY_ANSWER, tasks.ADAPTER_IDENTITY_ANSWER)


def test_the_repos_api_example_client(lora_server: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/api_example in LLaMA-Factory: the key and port from the environment, ``model="test"``."""
    import os

    from openai import OpenAI

    monkeypatch.setenv("API_PORT", str(port(lora_server)))
    client = OpenAI(
        api_key="{}".format(os.getenv("API_KEY", "0")),
        base_url="http://localhost:{}/v1".format(os.getenv("API_PORT", 8000)),
    )
    messages = [{"role": "user", "content": "Who are you?"}]
    result = client.chat.completions.create(messages=messages, model="test")
    assert result.choices[0].message.content == tasks.ADAPTER_IDENTITY_ANSWER
    # The ids it could name instead: the configured model, the adapter alone, the base weights.
    assert [m.id for m in client.models.list().data] == ["demo:chat", "demo:adapter", "demo:chat:base"]
    base = client.chat.completions.create(messages=messages, model="demo:chat:base")
    assert base.choices[0].message.content == tasks.IDENTITY_ANSWER
