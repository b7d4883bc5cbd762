"""The conversation layer: every surface's one way to the engines, in both directions.

- ``service``: ``ChatService`` (prepare a conversation as an engine request, run it, read its reply) and
  ``open_chat_service`` (settings -> a running service, through the engine factory);
- ``messages``: normalizing a conversation (roles, content parts, images set aside, system prompts);
- ``models``: the ids a service answers as (the configured model, each adapter, the base weights);
- ``budget``: the token-budget rules (context, ``max_length``, explicit ``max_tokens``, prompt cuts);
- ``media``: images placed in the prompt (placeholders, image tokens, processor tensors);
- ``replies``: tool policies, JSON mode and the incremental reply parser.

Surfaces import from here and never from ``stoker.engines``: the engine's request and output types they handle are
re-exported below.
"""

from __future__ import annotations

from stoker.chat.replies import (
    Reply,
    ReplyDelta,
    ReplyParser,
    ReplyRules,
    ToolPolicy,
    check_json_mode,
    tool_call_dicts,
    tool_policy,
)
from stoker.chat.models import ServedModel, ServedModels
from stoker.chat.service import ChatService, PreparedChat, open_chat_service, prompt_list
from stoker.engines.base import (
    BASE_WEIGHTS,
    MIN_TEMPERATURE,
    Completion,
    Delta,
    EngineInfo,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    validate_params,
)
from stoker.engines.structured import StructuredOutput
from stoker.engines.structured import from_fields as structured_fields

__all__ = [
    "BASE_WEIGHTS",
    "MIN_TEMPERATURE",
    "ChatService",
    "Completion",
    "Delta",
    "EngineInfo",
    "GenerationRequest",
    "PreparedChat",
    "Reply",
    "ReplyDelta",
    "ReplyParser",
    "ReplyRules",
    "SamplingParams",
    "ServedModel",
    "ServedModels",
    "StructuredOutput",
    "TokenLogprob",
    "ToolPolicy",
    "check_json_mode",
    "open_chat_service",
    "prompt_list",
    "structured_fields",
    "tool_call_dicts",
    "tool_policy",
    "validate_params",
]
