"""``POST /v1/chat/completions``: plan the request, run it on the engine, answer whole or as server-sent events."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from stoker.engines.base import Delta, GenerationRequest, TokenLogprob
from stoker.engines.detokenize import decode
from stoker.errors import RequestError
from stoker.server.protocol import (
    LOGPROB_FLOOR,
    ChatCompletionRequest,
    NamedToolChoice,
    chat_chunk,
    chat_chunk_choice,
    sse,
    usage,
)
from stoker.server.replies import (
    Parse,
    ReplyDelta,
    ReplyStreamer,
    ToolPolicy,
    reasoning_prefix,
    resolve_reply,
    stream_markers,
    tool_call_dicts,
)
from stoker.server.state import ServerState
from stoker.server.streams import StreamTally, respond, sse_answer


REQUIRED_NOTE = "Answer by calling one or more of the provided tools."
NAMED_NOTE = "Answer by calling the tool {name!r}."
JSON_NOTE = "Reply with one valid JSON object and nothing else."


@dataclass
class ChatPlan:
    request: GenerationRequest
    parse: Parse  # the template's reply parser, seeing the reply as the template does
    policy: ToolPolicy
    json_mode: bool
    top_logprobs: int | None  # None: no logprobs
    include_usage: bool


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, http: Request) -> Response:
    started = time.perf_counter()
    request_id = "chatcmpl-" + http.state.request_id
    plan = plan_chat(state, body, request_id)
    return await respond(
        http, state.metrics, state.service.engine, [plan.request], started=started, stream=body.stream,
        events=lambda streams: chat_events(state, plan, streams[0], request_id, body.model),
        result=lambda streams: chat_result(state, plan, streams[0], request_id, body.model),
    )


# --------------------------------------------------------------------------------------------------------------------
# Planning: request fields -> prompt, sampling parameters and the rules to apply to the reply
# --------------------------------------------------------------------------------------------------------------------
def plan_chat(state: ServerState, body: ChatCompletionRequest, request_id: str) -> ChatPlan:
    adapter = state.adapter_for(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("top_logprobs needs logprobs: true.", param="top_logprobs")
    policy = tool_policy(body)
    json_mode = json_mode_of(body)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    notes = []
    if policy.mode == "required":
        notes.append(REQUIRED_NOTE)
    elif policy.mode == "named":
        notes.append(NAMED_NOTE.format(name=policy.forced))
    if json_mode:
        notes.append(JSON_NOTE)
    if notes:
        messages = with_system_note(messages, " ".join(notes), state.settings.default_system)

    requested = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = state.sampling_params(body, max_tokens=requested, logprobs=top)
    thinking = (body.chat_template_kwargs or {}).get("enable_thinking")
    gen = state.service.request(
        messages,
        params,
        tools=policy.tools if policy.active else None,
        adapter=adapter,
        enable_thinking=thinking if isinstance(thinking, bool) else None,
        request_id=request_id,
    )
    state.check_budget(len(gen.prompt_ids), gen.params, requested, param)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return ChatPlan(gen, reply_parser(state, gen.prompt_ids), policy, json_mode, top, include_usage)


def reply_parser(state: ServerState, prompt_ids: list[int]) -> Parse:
    service = state.service
    prefix = reasoning_prefix(service.template, decode(service.tokenizer, prompt_ids[-8:], False))
    if not prefix:
        return service.parse
    return lambda text, *, tools_given: service.parse(prefix + text, tools_given=tools_given)


def tool_policy(body: ChatCompletionRequest) -> ToolPolicy:
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise RequestError(f"tools name the same function more than once: {dupes}; give each a unique name.",
                           param="tools")
    choice = body.tool_choice
    parallel = body.parallel_tool_calls is not False
    if choice is not None and choice != "none" and not tools:
        raise RequestError("tool_choice is set but no tools were given: send tools, or drop tool_choice.",
                           param="tool_choice")
    if choice == "none" or not tools:
        return ToolPolicy("none")
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise RequestError(f"tool_choice names the function {name!r}, which is not among the tools: {names}.",
                               param="tool_choice")
        # Only the forced function is shown to the model: nothing else may be called.
        return ToolPolicy("named", [t for t in tools if t["function"]["name"] == name], forced=name, parallel=parallel)
    return ToolPolicy("required" if choice == "required" else "auto", tools, parallel=parallel)


def json_mode_of(body: ChatCompletionRequest) -> bool:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return False
    if fmt.type == "json_schema":
        raise RequestError(
            "response_format json_schema is not supported: use {'type': 'json_object'} and describe the fields in "
            "the messages.",
            param="response_format",
        )
    # OpenAI's rule: a model not told to write JSON may emit whitespace forever when forced into it.
    if "json" not in " ".join(m.model_dump_json(include={"content"}) for m in body.messages).lower():
        raise RequestError(
            "response_format json_object needs the word 'JSON' in the messages: ask the model for JSON there.",
            param="messages",
        )
    return True


def with_system_note(messages: list[dict[str, Any]], note: str, default_system: str | None) -> list[dict[str, Any]]:
    """Append ``note`` to the system message, creating one (from the config's default system prompt) if needed."""
    if messages and messages[0].get("role") in ("system", "developer"):
        first = dict(messages[0])
        content = first.get("content")
        if isinstance(content, list):
            first["content"] = [*content, {"type": "text", "text": "\n\n" + note}]
        else:
            first["content"] = f"{content}\n\n{note}" if content else note
        return [first, *messages[1:]]
    system = f"{default_system}\n\n{note}" if default_system else note
    return [{"role": "system", "content": system}, *messages]


# --------------------------------------------------------------------------------------------------------------------
# Whole answers
# --------------------------------------------------------------------------------------------------------------------
async def chat_result(
    state: ServerState, plan: ChatPlan, stream: AsyncIterator[Delta], request_id: str, model: str
) -> dict[str, Any]:
    n = plan.request.params.n
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    finish: list[str] = ["length"] * n
    completion_tokens = [0] * n
    prompt_tokens = len(plan.request.prompt_ids)
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async for delta in stream:
            texts[delta.index].append(delta.text)
            if delta.logprobs:
                logprobs[delta.index].extend(delta.logprobs)
            if delta.finish_reason is not None:
                finish[delta.index] = delta.finish_reason
                completion_tokens[delta.index] = delta.completion_tokens
            prompt_tokens = delta.prompt_tokens or prompt_tokens
    choices = []
    reasons = []
    for i in range(n):
        reply = resolve_reply(plan.parse, "".join(texts[i]), finish[i], plan.policy, plan.json_mode)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            message["tool_calls"] = tool_call_dicts(reply.tool_calls)
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": chat_logprobs(logprobs[i], plan.top_logprobs) if plan.top_logprobs is not None else None,
                "finish_reason": reply.finish_reason,
            }
        )
        reasons.append(reply.finish_reason)
    state.metrics.generation_done(prompt_tokens, sum(completion_tokens), reasons)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, sum(completion_tokens)),
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
    tally = StreamTally(plan.request.params.n, len(plan.request.prompt_ids))

    def usage_event(counts: dict[str, int]) -> str:
        return sse(chat_chunk(request_id, created, model, [], with_usage=True, usage_counts=counts))

    events = _chat_deltas(state, plan, stream, tally, lambda choices: sse(
        chat_chunk(request_id, created, model, choices, with_usage=plan.include_usage)))
    return sse_answer(events, tally, state.metrics, request_id, usage_event if plan.include_usage else None)


async def _chat_deltas(
    state: ServerState, plan: ChatPlan, stream: AsyncIterator[Delta], tally: StreamTally,
    chunk: Callable[[list[dict[str, Any]]], str],
) -> AsyncIterator[str]:
    n = plan.request.params.n
    reasoning_markers, tool_markers = stream_markers(state.service.template, plan.policy)
    streamers = [
        ReplyStreamer(plan.parse, plan.policy, reasoning_markers=reasoning_markers, tool_markers=tool_markers,
                      json_mode=plan.json_mode)
        for _ in range(n)
    ]
    tool_index = [0] * n

    def delta_body(part: ReplyDelta, index: int) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if part.reasoning:
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
            part = streamers[i].push(delta.text)
            lp = None
            if plan.top_logprobs is not None and delta.logprobs:
                lp = chat_logprobs(delta.logprobs, plan.top_logprobs)
            if part or lp:
                yield chunk([chat_chunk_choice(i, delta_body(part, i), logprobs=lp)])
            if delta.finish_reason is None:
                continue
            rest, reason = streamers[i].finish(delta.finish_reason)
            if rest:
                yield chunk([chat_chunk_choice(i, delta_body(rest, i))])
            yield chunk([chat_chunk_choice(i, {}, finish_reason=reason)])
            tally.prompt_tokens = delta.prompt_tokens or tally.prompt_tokens
            tally.finished(reason, delta.completion_tokens)
