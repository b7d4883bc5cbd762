"""``POST /tokenize``, ``POST /detokenize`` (vLLM's shapes) and ``POST /v1/chat/completions/render``: what the model
is given, without generating. Each reuses the path its generation route takes (the chat plan, or the raw-prompt
tokenizer), so what they report is what generation would see. All run in a worker thread: rendering and tokenizing
can take long for big inputs, and the event loop serves every client."""

from __future__ import annotations

import asyncio

from stoker.engines.base import check_token_ids
from stoker.server.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    RenderedChat,
    TokenizeRequest,
    TokenizeResponse,
)
from stoker.server.serving_chat import plan_chat
from stoker.server.state import ServerState


async def tokenize(state: ServerState, body: TokenizeRequest, request_id: str) -> TokenizeResponse:
    return await asyncio.to_thread(_tokenize, state, body, request_id)


async def detokenize(state: ServerState, body: DetokenizeRequest) -> DetokenizeResponse:
    return await asyncio.to_thread(_detokenize, state, body)


async def render_chat(state: ServerState, body: ChatCompletionRequest, request_id: str) -> RenderedChat:
    return await asyncio.to_thread(_render_chat, state, body, request_id)


def _tokenize(state: ServerState, body: TokenizeRequest, request_id: str) -> TokenizeResponse:
    service = state.service
    if body.prompt is not None:
        state.model_for(body.model or state.configured_model)
        ids = service.tokenize_prompts(body.prompt)[0]
    else:
        chat = ChatCompletionRequest(model=body.model or state.configured_model, messages=body.messages or [],
                                     tools=body.tools, chat_template_kwargs=body.chat_template_kwargs,
                                     add_generation_prompt=body.add_generation_prompt,
                                     continue_final_message=body.continue_final_message)  # fmt: skip
        ids = list(plan_chat(state, chat, request_id).chat.request.prompt_ids)
    strs = list(service.tokenizer.convert_ids_to_tokens(ids)) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=service.max_model_len, tokens=ids, token_strs=strs)


def _detokenize(state: ServerState, body: DetokenizeRequest) -> DetokenizeResponse:
    state.model_for(body.model or state.configured_model)
    check_token_ids(body.tokens, state.service.info.vocab_size, "tokens", param="tokens")
    return DetokenizeResponse(prompt=state.service.prompt_text(body.tokens))


def _render_chat(state: ServerState, body: ChatCompletionRequest, request_id: str) -> RenderedChat:
    plan = plan_chat(state, body, request_id)
    ids = list(plan.chat.request.prompt_ids)
    return RenderedChat(model=plan.model, prompt=state.service.prompt_text(ids), prompt_token_ids=ids,
                        count=len(ids), max_model_len=state.service.max_model_len)  # fmt: skip
