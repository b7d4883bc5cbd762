"""One generation, one reply: the same recorded delta stream read through the API, the web chat and the terminal.

The engine here replays a recorded stream of deltas (reasoning, content and a tool call, with every marker cut
across two deltas), so each surface gets exactly the same input; everything above the engine is the real code: the
chat service with the Qwen3 template, the FastAPI app under its test client, the web chat's session and the
terminal chat over text streams.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from stoker.chat import ChatService, Completion, Delta, EngineInfo, GenerationRequest
from stoker.engines.base import Engine, collect

REASONING = "I should check the weather."
CONTENT = "Let me check."
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TEXT = f"<think>\n{REASONING}\n</think>\n\n{CONTENT}\n{CALL}"
# Cut inside every marker: "<thi|nk>", "</th|ink>", "<tool_|call>", and elsewhere at odd places.
CUTS = [3, 9, 25, 40, 43, 55, 62, 64, 70, 90, 101]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def recorded_deltas(prompt_tokens: int) -> list[Delta]:
    bounds = [0, *CUTS, len(TEXT)]
    pieces = [TEXT[a:b] for a, b in zip(bounds, bounds[1:])]
    assert "".join(pieces) == TEXT and all(pieces)
    deltas = [Delta(index=0, text=p, token_ids=[100 + i], prompt_tokens=prompt_tokens) for i, p in enumerate(pieces)]
    deltas[-1].finish_reason = "stop"
    deltas[-1].completion_tokens = len(pieces)
    return deltas


class ReplayEngine(Engine):
    """Answers every request with the recorded deltas."""

    def __init__(self) -> None:
        self.info = EngineInfo(max_model_len=4096, eos_ids=[2])

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:  # type: ignore[override]
        for delta in recorded_deltas(len(request.prompt_ids)):
            await asyncio.sleep(0)
            yield delta

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        return [collect(recorded_deltas(len(r.prompt_ids)), r.request_id, 1) for r in requests]

    async def abort(self, request_id: str) -> None:
        return None


@pytest.fixture(scope="module")
def service(demo_chat: Path) -> ChatService:
    from transformers import AutoTokenizer

    from stoker.config import generation_defaults, load_settings
    from stoker.templates import get_template

    settings = load_settings(overrides={"model_name_or_path": str(demo_chat), "template": "qwen3"}, env={})
    tokenizer = AutoTokenizer.from_pretrained(demo_chat)
    return ChatService(engine=ReplayEngine(), tokenizer=tokenizer, template=get_template("qwen3", tokenizer),
                       settings=settings, generation=generation_defaults(settings, {}), model_name="replay")


def api_replies(service: ChatService, tools: list | None) -> tuple[dict, dict]:
    """The API's message, whole and summed from its stream."""
    from fastapi.testclient import TestClient

    from stoker.server.app import create_app

    body = {"model": service.models.configured.id, "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    if tools:
        body["tools"] = tools
    with TestClient(create_app(service, service.settings)) as http:
        whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        streamed = {"content": "", "reasoning_content": "", "tool_calls": [], "finish_reason": None}
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line.removeprefix("data: "))["choices"][0]
                delta = choice["delta"]
                streamed["content"] += delta.get("content") or ""
                streamed["reasoning_content"] += delta.get("reasoning_content") or ""
                streamed["tool_calls"] += delta.get("tool_calls") or []
                streamed["finish_reason"] = choice["finish_reason"] or streamed["finish_reason"]
    message = whole["message"]
    whole_reply = {"content": message["content"] or "", "reasoning": message.get("reasoning_content") or "",
                   "calls": calls_of(message.get("tool_calls") or []), "finish": whole["finish_reason"]}
    streamed_reply = {"content": streamed["content"], "reasoning": streamed["reasoning_content"],
                      "calls": calls_of(streamed["tool_calls"]), "finish": streamed["finish_reason"]}
    return whole_reply, streamed_reply


def calls_of(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def webchat_reply(service: ChatService, tools: list | None) -> tuple[dict, list[str]]:
    """The web chat's final turn, and every reply text the page showed while it streamed."""
    from stoker.webchat.session import ChatOptions, prepare, stream_reply

    prepared = prepare(service, [], "Weather in Paris?", [], ChatOptions(tools=tools or []))
    shown: list[str] = []

    async def run() -> None:
        async for turns in stream_reply(service, prepared):
            shown.append(turns[-1].reply + "|" + (turns[-1].reasoning or ""))

    asyncio.run(run())
    turn = prepared.turns[-1]
    reply = {"content": turn.reply, "reasoning": turn.reasoning or "",
             "calls": [(c.name, json.loads(c.arguments)) for c in turn.tool_calls], "finish": turn.finish_reason}
    return reply, shown


def terminal_reply(service: ChatService) -> tuple[dict, str]:
    from stoker.terminal import TerminalChat

    out = io.StringIO()
    chat = TerminalChat(service, io.StringIO("Weather in Paris?\n"), out)
    assert chat.loop() == 0
    message = chat.history[-1]
    reply = {"content": message["content"], "reasoning": message.get("reasoning_content") or "", "calls": [],
             "finish": "stop"}
    return reply, out.getvalue()


def test_without_tools_every_surface_reads_the_same_reply(service: ChatService) -> None:
    expected = {"content": f"{CONTENT}\n{CALL}", "reasoning": REASONING, "calls": [], "finish": "stop"}
    whole, streamed = api_replies(service, None)
    assert whole == streamed == expected
    web, shown = webchat_reply(service, None)
    assert web == expected
    terminal, screen = terminal_reply(service)
    assert terminal == expected
    # Nothing a surface showed on the way held a piece of a marker.
    assert not any("<th" in s or "</th" in s for s in shown)
    answer = screen.split("Assistant: ", 1)[1]
    assert "<think>" not in answer and "</think>" not in answer
    assert REASONING in answer and f"{CONTENT}\n{CALL}" in answer


def test_with_tools_the_api_and_the_web_chat_read_the_same_call(service: ChatService) -> None:
    expected = {"content": CONTENT, "reasoning": REASONING, "calls": [("get_weather", {"city": "Paris"})],
                "finish": "tool_calls"}
    whole, streamed = api_replies(service, [WEATHER])
    assert whole == streamed == expected
    web, shown = webchat_reply(service, [WEATHER])
    assert web == expected
    assert not any("<tool" in s for s in shown)  # the call's markup never flashed as text
