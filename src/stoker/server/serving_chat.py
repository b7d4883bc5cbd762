"""``POST /v1/chat/completions``: map the request onto the chat service, run it, answer whole or as server-sent events.

The chat service builds the prompt and reads the reply (``chat.replies``); this module only translates OpenAI's
fields on the way in and OpenAI's message shapes on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from stoker.chat import (
    Delta,
    PreparedChat,
    ReplyDelta,
    StructuredOutput,
    TokenLogprob,
    ToolPolicy,
    check_json_mode,
    tool_call_dicts,
    tool_policy,
)
from stoker.errors import RequestError
from stoker.server.protocol import (
    LOGPROB_FLOOR,
    ChatCompletionRequest,
    NamedToolChoice,
    chat_chunk,
    chat_chunk_choice,
    prompt_logprobs_json,
    sse,
    usage,
)
from stoker.server.state import ServerState
from stoker.server.streams import StreamTally, respond, sse_answer


@dataclass
class ChatPlan:
    chat: PreparedChat
    model: str  # the id of the model that answers
    top_logprobs: int | None  # None: no logprobs
    include_usage: bool
    include_reasoning: bool = True  # vLLM's: false leaves reasoning_content out of the answer

    @property
    def n(self) -> int:
        return self.chat.request.params.n


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, http: Request) -> Response:
    started = time.perf_counter()
    request_id = "chatcmpl-" + http.state.request_id
    plan = await asyncio.to_thread(plan_chat, state, body, request_id)  # renders, tokenizes, fetches: off the loop
    return await respond(
        http, state.metrics, state.service, [plan.chat.request], started=started, stream=body.stream,
        events=lambda streams: chat_events(state, plan, streams[0], request_id, plan.model),
        result=lambda streams: chat_result(state, plan, streams[0], request_id, plan.model),
    )


# --------------------------------------------------------------------------------------------------------------------
# Planning: request fields -> the chat service's request
# --------------------------------------------------------------------------------------------------------------------
def plan_chat(state: ServerState, body: ChatCompletionRequest, request_id: str) -> ChatPlan:
    served, answered_as = state.model_for(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("top_logprobs needs logprobs: true.", param="top_logprobs")
    policy = policy_of(body)
    json_mode = json_mode_of(body)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    if json_mode:
        check_json_mode(messages)
    requested = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = state.sampling_params(body, max_tokens=requested, logprobs=top, structured=response_format_of(body))
    kwargs = body.chat_template_kwargs
    chat = state.service.prepare(
        messages,
        params,
        tools=policy,
        json_mode=json_mode,
        adapter=served.adapter,
        enable_thinking=kwargs.enable_thinking if kwargs else None,
        request_id=request_id,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        template_kwargs=kwargs.model_dump(exclude_none=True) if kwargs else None,
    )
    state.service.check_budget(len(chat.request.prompt_ids), chat.request.params, requested, param)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return ChatPlan(chat, answered_as, top, include_usage, body.include_reasoning)


def policy_of(body: ChatCompletionRequest) -> ToolPolicy:
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        return tool_policy(tools, None, forced=choice.function.name, parallel=body.parallel_tool_calls is not False)
    return tool_policy(tools, choice, parallel=body.parallel_tool_calls is not False)


def json_mode_of(body: ChatCompletionRequest) -> bool:
    """``json_object``: OpenAI's JSON mode (the messages must ask for JSON; the system prompt says so too)."""
    return body.response_format is not None and body.response_format.type == "json_object"


def response_format_of(body: ChatCompletionRequest) -> StructuredOutput | None:
    """``response_format`` as an output constraint, enforced while decoding."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput("json_object", "", "response_format")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise RequestError("response_format json_schema needs json_schema.schema: send "
                           "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}.",
                           param="response_format")
    return StructuredOutput.json_schema(fmt.json_schema.schema_, param="response_format.json_schema.schema")


# --------------------------------------------------------------------------------------------------------------------
# Whole answers
# --------------------------------------------------------------------------------------------------------------------
async def chat_result(
    state: ServerState, plan: ChatPlan, stream: AsyncIterator[Delta], request_id: str, model: str
) -> dict[str, Any]:
    completion = await state.service.complete(stream, plan.chat.request)
    prompt_tokens = completion.prompt_tokens or len(plan.chat.request.prompt_ids)
    choices = []
    reasons = []
    for choice in completion.choices:
        reply = plan.chat.reply(choice.text, choice.finish_reason)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.reasoning and plan.include_reasoning:
            message["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            message["tool_calls"] = tool_call_dicts(reply.tool_calls)
        logprobs = chat_logprobs(choice.logprobs or [], plan.top_logprobs) if plan.top_logprobs is not None else None
        choices.append({"index": choice.index, "message": message, "logprobs": logprobs,
                        "finish_reason": reply.finish_reason})
        reasons.append(reply.finish_reason)
    state.metrics.generation_done(prompt_tokens, completion.completion_tokens, reasons)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion.completion_tokens),
        "prompt_logprobs": prompt_logprobs_json(completion.prompt_logprobs, plan.chat.request.params.prompt_logprobs
                                                or 0),
    }


def chat_logprobs(items: list[TokenLogprob], top: int | None) -> dict[str, Any]:
    return {"content": [token_logprob(t, top or 0) for t in items], "refusal": None}


def token_logprob(item: TokenLogprob, top: int) -> dict[str, Any]:
    return {
        "token": item.token,
        "logprob": max(item.logprob, LOGPROB_FLOOR),
        "bytes": list(item.token.encode("utf-8")),
        "top_logprobs": [
            {"token": text, "logprob": max(lp, LOGPROB_FLOOR), "bytes": list(text.encode("utf-8"))}
            for _, text, lp in item.top[:top]
        ],
    }


# --------------------------------------------------------------------------------------------------------------------
# Streamed answers
# --------------------------------------------------------------------------------------------------------------------
def chat_events(
    state: ServerState, plan: ChatPlan, stream: AsyncIterator[Delta], request_id: str, model: str
) -> AsyncIterator[str]:
    created = int(time.time())
    tally = StreamTally(plan.n, len(plan.chat.request.prompt_ids))

    def usage_event(counts: dict[str, int]) -> str:
        return sse(chat_chunk(request_id, created, model, [], with_usage=True, usage_counts=counts))

    events = _chat_deltas(plan, stream, tally, lambda choices: sse(
        chat_chunk(request_id, created, model, choices, with_usage=plan.include_usage)))
    return sse_answer(events, tally, state.metrics, request_id, usage_event if plan.include_usage else None)


async def _chat_deltas(
    plan: ChatPlan, stream: AsyncIterator[Delta], tally: StreamTally, chunk: Callable[[list[dict[str, Any]]], str],
) -> AsyncIterator[str]:
    n = plan.n
    parsers = [plan.chat.parser() for _ in range(n)]
    tool_index = [0] * n

    def delta_body(part: ReplyDelta, index: int) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if part.reasoning and plan.include_reasoning:
            body["reasoning_content"] = part.reasoning
        if part.content:
            body["content"] = part.content
        if part.tool_calls:
            calls = []
            for call in tool_call_dicts(part.tool_calls):
                calls.append({"index": tool_index[index], **call})
                tool_index[index] += 1
            body["tool_calls"] = calls
        return body

    for i in range(n):
        yield chunk([chat_chunk_choice(i, {"role": "assistant", "content": ""})])
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async for delta in stream:
            i = delta.index
            part = parsers[i].push(delta.text)
            lp = None
            if plan.top_logprobs is not None and delta.logprobs:
                lp = chat_logprobs(delta.logprobs, plan.top_logprobs)
            body = delta_body(part, i)
            if body or lp:
                yield chunk([chat_chunk_choice(i, body, logprobs=lp)])
            if delta.finish_reason is None:
                continue
            rest, reply = parsers[i].finish(delta.finish_reason)
            body = delta_body(rest, i)
            if body:
                yield chunk([chat_chunk_choice(i, body)])
            yield chunk([chat_chunk_choice(i, {}, finish_reason=reply.finish_reason)])
            tally.prompt_tokens = delta.prompt_tokens or tally.prompt_tokens
            tally.finished(reply.finish_reason, delta.completion_tokens)
