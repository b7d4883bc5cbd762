"""``POST /v1/completions``: raw prompts, no chat template. A text prompt is tokenized as is, with the tokenizer's
own special-token handling (BOS where the tokenizer adds one); token-id prompts go to the engine unchanged.

Several prompts in one request become one engine request each; choice ``k`` of prompt ``p`` has index ``p * n + k``,
as in OpenAI's API.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from stoker.chat import Delta, GenerationRequest, TokenLogprob, prompt_list
from stoker.errors import RequestError
from stoker.server.protocol import (
    LOGPROB_FLOOR,
    CompletionRequest,
    completion_chunk,
    prompt_logprobs_json,
    sse,
    usage,
)
from stoker.server.state import ServerState
from stoker.server.streams import StreamTally, merge, respond, sse_answer


@dataclass
class CompletionPlan:
    requests: list[GenerationRequest]
    model: str  # the id of the model that answers
    echo_texts: list[str]  # per prompt: the prompt text when echo is on, else ""
    n: int
    logprobs: int | None
    include_usage: bool
    prompt_logprobs: int | None = None  # the request's prompt_logprobs (vLLM's field)
    first_tokens: list[str] | None = None  # per prompt, its first token's text: echo with logprobs lists it unscored

    @property
    def echo_logprobs(self) -> bool:
        return self.first_tokens is not None


async def create_completion(state: ServerState, body: CompletionRequest, http: Request) -> Response:
    started = time.perf_counter()
    request_id = "cmpl-" + http.state.request_id
    plan = await asyncio.to_thread(plan_completion, state, body, request_id)  # renders, tokenizes, fetches: off the loop
    return await respond(
        http, state.metrics, state.service, plan.requests, started=started, stream=body.stream,
        events=lambda streams: completion_events(state, plan, streams, request_id, plan.model),
        result=lambda streams: completion_result(state, plan, streams, request_id, plan.model),
    )


def plan_completion(state: ServerState, body: CompletionRequest, request_id: str) -> CompletionPlan:
    served, answered_as = state.model_for(body.model)
    if body.suffix:
        raise RequestError("suffix (fill-in-the-middle) is not supported: remove it.", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise RequestError("best_of is not supported (other than best_of = n): remove it.", param="best_of")
    service = state.service
    state.check_sequences(body.n, len(prompt_list(body.prompt)))  # before tokenizing what can never run
    prompts = service.tokenize_prompts(body.prompt)
    explicit = "max_tokens" in body.model_fields_set and body.max_tokens is not None
    params = state.sampling_params(body, max_tokens=body.max_tokens, logprobs=body.logprobs)
    echo_logprobs = body.echo and body.logprobs is not None
    if echo_logprobs:  # the echoed prompt's logprobs too, as OpenAI's legacy API gives them
        params = replace(params, prompt_logprobs=max(body.logprobs or 0, body.prompt_logprobs or 0))
    requests = []
    echo_texts = []
    for i, ids in enumerate(prompts):
        fitted = service.fit_params(len(ids), params, param="prompt")  # a default max_tokens is clipped to the context
        service.check_params(fitted)
        service.check_budget(len(ids), fitted, body.max_tokens if explicit else None, "max_tokens")
        suffix = f"-{i}" if len(prompts) > 1 else ""
        requests.append(GenerationRequest(prompt_ids=ids, params=replace(fitted), request_id=request_id + suffix,
                                          adapter=served.adapter))
        echo_texts.append(service.decode(ids) if body.echo else "")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    first_tokens = [service.decode(ids[:1]) for ids in prompts] if echo_logprobs else None
    return CompletionPlan(requests, answered_as, echo_texts, body.n, body.logprobs, include_usage,
                          body.prompt_logprobs, first_tokens)


async def completion_result(
    state: ServerState, plan: CompletionPlan, streams: list[AsyncIterator[Delta]], request_id: str, model: str
) -> dict[str, Any]:
    n = plan.n
    total = len(streams) * n
    texts: list[list[str]] = [[] for _ in range(total)]
    lps: list[list[TokenLogprob]] = [[] for _ in range(total)]
    finish = ["length"] * total
    completion_tokens = [0] * total
    prompt_lps: list[list[TokenLogprob | None] | None] = [None] * total
    async with contextlib.aclosing(merge(streams)) as merged:  # type: ignore[type-var]
        async for p, delta in merged:
            k = p * n + delta.index
            texts[k].append(delta.text)
            if delta.prompt_logprobs is not None:
                prompt_lps[k] = delta.prompt_logprobs
            if delta.logprobs:
                lps[k].extend(delta.logprobs)
            if delta.finish_reason is not None:
                finish[k] = delta.finish_reason
                completion_tokens[k] = delta.completion_tokens
    prompt_tokens = sum(len(r.prompt_ids) for r in plan.requests)
    choices = []
    for k in range(total):
        echo = plan.echo_texts[k // n]
        text = "".join(texts[k])
        scored = lps[k]
        if plan.echo_logprobs:
            scored = [*echoed_logprobs(plan, k // n, prompt_lps[k]), *scored]
        choice = {
            "index": k,
            "text": echo + text,
            "logprobs": completion_logprobs(scored, 0 if plan.echo_logprobs else len(echo), plan.logprobs or 0)
            if plan.logprobs is not None else None,
            "finish_reason": finish[k],
        }
        if plan.prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs_json(prompt_lps[k], plan.prompt_logprobs)
        choices.append(choice)
    state.metrics.generation_done(prompt_tokens, sum(completion_tokens), finish)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, sum(completion_tokens)),
    }


def completion_logprobs(items: list[TokenLogprob], offset: int, k: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, and the top ``k`` alternatives as {token text: logprob}. An
    echoed prompt's first token has no logprob (NaN here): null in both lists, as OpenAI sends it."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [None if math.isnan(t.logprob) else max(t.logprob, LOGPROB_FLOOR) for t in items],
        "top_logprobs": [None if math.isnan(t.logprob) else {text: max(lp, LOGPROB_FLOOR) for _, text, lp in t.top[:k]}
                         for t in items],
        "text_offset": offsets,
    }


def echoed_logprobs(plan: CompletionPlan, prompt: int, items: list[TokenLogprob | None] | None
                    ) -> list[TokenLogprob]:
    """The echoed prompt's tokens with their logprobs; the first token, which nothing predicts, as NaN."""
    ids = plan.requests[prompt].prompt_ids
    first = TokenLogprob(ids[0], (plan.first_tokens or [""])[prompt], math.nan, []) if ids else None
    return [first if item is None else item for item in (items or [])] if first is not None else []


def completion_events(
    state: ServerState, plan: CompletionPlan, streams: list[AsyncIterator[Delta]], request_id: str, model: str
) -> AsyncIterator[str]:
    created = int(time.time())
    tally = StreamTally(len(streams) * plan.n, sum(len(r.prompt_ids) for r in plan.requests))

    def chunk(index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse(completion_chunk(request_id, created, model, [choice], with_usage=plan.include_usage))

    def usage_event(counts: dict[str, int]) -> str:
        return sse(completion_chunk(request_id, created, model, [], with_usage=True, usage_counts=counts))

    events = _completion_deltas(plan, streams, tally, chunk)
    return sse_answer(events, tally, state.metrics, request_id, usage_event if plan.include_usage else None)


async def _completion_deltas(
    plan: CompletionPlan, streams: list[AsyncIterator[Delta]], tally: StreamTally,
    chunk: Callable[[int, str, dict[str, Any] | None, str | None], str],
) -> AsyncIterator[str]:
    n = plan.n
    offsets = [len(plan.echo_texts[k // n]) for k in range(len(streams) * n)]
    if not plan.echo_logprobs:  # with logprobs, each choice's echo waits for its prompt's logprobs (first delta)
        for k in range(len(streams) * n):
            if plan.echo_texts[k // n]:
                yield chunk(k, plan.echo_texts[k // n], None, None)
    async with contextlib.aclosing(merge(streams)) as merged:  # type: ignore[type-var]
        async for p, delta in merged:
            k = p * n + delta.index
            if delta.prompt_logprobs is not None and plan.echo_logprobs:
                echoed = completion_logprobs(echoed_logprobs(plan, p, delta.prompt_logprobs), 0, plan.logprobs or 0)
                yield chunk(k, plan.echo_texts[p], echoed, None)
            lp = None
            if plan.logprobs is not None and delta.logprobs:
                lp = completion_logprobs(delta.logprobs, offsets[k], plan.logprobs)
                offsets[k] += sum(len(t.token) for t in delta.logprobs)
            if delta.text or lp or delta.finish_reason:
                yield chunk(k, delta.text, lp, delta.finish_reason)
            if delta.finish_reason is not None:
                tally.finished(delta.finish_reason, delta.completion_tokens)
