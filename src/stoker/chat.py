"""The chat service: the one place that turns a conversation into prompt ids and engine output back into a reply.

Every surface (terminal, web chat, API, predict) goes through it, so a conversation renders identically everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from stoker.config import Settings
from stoker.engines.base import Delta, Engine, GenerationRequest, SamplingParams
from stoker.errors import RequestError, TemplateError
from stoker.media import IMAGE_PLACEHOLDER
from stoker.templates.base import Message, ParsedReply, Template, Tool

logger = logging.getLogger("stoker")

ROLES = ("system", "user", "assistant", "tool")
# OpenAI's newer names for the same roles.
ROLE_ALIASES = {"developer": "system", "function": "tool"}


@dataclass
class Prompt:
    ids: list[int]
    stop: list[str]
    stop_token_ids: list[int]
    media: dict[str, Any] | None = None


@dataclass
class ChatReply:
    content: str
    reasoning: str | None
    tool_calls: list[Any]
    finish_reason: str  # "stop" | "length" | "tool_calls"
    prompt_tokens: int
    completion_tokens: int
    raw_text: str = ""


@dataclass
class ChatService:
    engine: Engine
    tokenizer: Any
    template: Template
    settings: Settings
    generation: dict[str, Any]  # resolved generation defaults (see config.generation_defaults)
    model_name: str = "model"
    processor: Any = None
    extra_stop_ids: list[int] = field(default_factory=list)

    # ---------------------------------------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.engine.info.max_model_len

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """Defaults from the config and generation_config.json; keyword overrides given as None are ignored."""
        g = self.generation
        params = SamplingParams(
            max_new_tokens=int(g["max_new_tokens"]),
            temperature=float(g["temperature"]) if g["do_sample"] else 0.0,
            top_p=float(g["top_p"]),
            top_k=int(g["top_k"] or 0),
            repetition_penalty=float(g["repetition_penalty"]),
            seed=self.settings.seed,
            skip_special_tokens=self.settings.skip_special_tokens,
        )
        return replace(params, **{k: v for k, v in overrides.items() if v is not None})

    # ---------------------------------------------------------------------------------------------------------------
    def normalize(self, messages: list[Message]) -> tuple[list[Message], list[Any]]:
        """Validate roles and flatten content parts to text; image parts become placeholders plus image refs."""
        if not messages:
            raise TemplateError("messages is empty: send at least one message with role 'user'.", param="messages")
        out: list[Message] = []
        images: list[Any] = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise TemplateError(f"messages[{i}] must be an object with 'role' and 'content'.", param="messages")
            role = ROLE_ALIASES.get(msg.get("role"), msg.get("role"))
            if role not in ROLES:
                raise TemplateError(
                    f"messages[{i}] has unknown role {msg.get('role')!r}; expected one of {', '.join(ROLES)}.",
                    param="messages",
                )
            content = msg.get("content")
            if content is None:
                text = ""
            elif isinstance(content, str):
                text = content
            elif isinstance(content, list):
                text = self._flatten_parts(content, images, where=f"messages[{i}]")
            else:
                raise TemplateError(
                    f"messages[{i}].content must be a string or a list of content parts.", param="messages"
                )
            new = {k: v for k, v in msg.items() if k not in ("content",)}
            new["role"] = role
            new["content"] = text
            out.append(new)
        if out[-1]["role"] == "system" or not any(m["role"] == "user" for m in out):
            raise TemplateError("the conversation needs at least one 'user' message.", param="messages")
        return out, images

    def _flatten_parts(self, parts: list[Any], images: list[Any], *, where: str) -> str:
        chunks: list[str] = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                chunks.append(str(part.get("text", "")))
            elif kind in ("image_url", "image"):
                ref = part.get("image_url", part.get("image"))
                if isinstance(ref, dict):
                    ref = ref.get("url")
                if not ref:
                    raise TemplateError(f"{where}.content[{j}] is an image part without a url.", param="messages")
                images.append(ref)
                chunks.append(IMAGE_PLACEHOLDER)
            else:
                raise TemplateError(
                    f"{where}.content[{j}] has unsupported type {kind!r}; expected 'text' or 'image_url'.",
                    param="messages",
                )
        return "".join(chunks)

    def with_default_system(self, messages: list[Message]) -> list[Message]:
        if self.settings.default_system and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.settings.default_system}, *messages]
        return messages

    def build_prompt(
        self,
        messages: list[Message],
        *,
        tools: list[Tool] | None = None,
        enable_thinking: bool | None = None,
        images: list[Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> Prompt:
        """Render an already normalized conversation (see ``normalize``) into prompt ids, stops and media."""
        messages = self.with_default_system(messages)
        media = None
        images = list(images or [])
        if images:
            if not self.engine.info.vision:
                raise RequestError(
                    f"the model {self.model_name!r} takes no images: send text only, or serve a vision-language model.",
                    param="messages",
                )
            from stoker.media import prepare_images

            messages, media = prepare_images(messages, images, self)
        thinking = self.settings.enable_thinking if enable_thinking is None else enable_thinking
        ids = self.template.encode(
            self.tokenizer,
            messages,
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=thinking,
        )
        stop_ids = list(dict.fromkeys([*self.template.stop_token_ids(self.tokenizer), *self.extra_stop_ids]))
        return Prompt(ids=ids, stop=list(self.template.stop_words), stop_token_ids=stop_ids, media=media)

    def request(
        self,
        messages: list[Message],
        params: SamplingParams | None = None,
        *,
        tools: list[Tool] | None = None,
        adapter: str | None = None,
        enable_thinking: bool | None = None,
        request_id: str | None = None,
    ) -> GenerationRequest:
        """Normalize, render and package a conversation as an engine request, checking it fits the context."""
        normalized, images = self.normalize(messages)
        prompt = self.build_prompt(normalized, tools=tools, enable_thinking=enable_thinking, images=images)
        params = params or self.sampling_params()
        params = replace(
            params,
            stop=list(dict.fromkeys([*params.stop, *prompt.stop])),
            stop_token_ids=list(dict.fromkeys([*params.stop_token_ids, *prompt.stop_token_ids])),
        )
        params = self.fit_params(len(prompt.ids), params)
        req = GenerationRequest(prompt_ids=prompt.ids, params=params, adapter=adapter, media=prompt.media)
        if request_id:
            req.request_id = request_id
        return req

    def fit_params(self, prompt_len: int, params: SamplingParams, *, param: str = "messages") -> SamplingParams:
        """Check the prompt fits the context and cap max_new_tokens by max_length and what is left.

        ``param`` names the request field an over-long prompt came from (``prompt`` for raw completions)."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise RequestError(
                f"the prompt is {prompt_len} tokens but the model's context is {limit} tokens: shorten the "
                "conversation.",
                param=param,
                code="context_length_exceeded",
            )
        room = limit - prompt_len
        if self.settings.max_length is not None:
            room = min(room, max(1, self.settings.max_length - prompt_len))
        if params.max_new_tokens > room:
            params = replace(params, max_new_tokens=room)
        return params

    # ---------------------------------------------------------------------------------------------------------------
    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        return self.engine.stream(request)

    def stream_sync(self, request: GenerationRequest) -> Iterator[Delta]:
        return self.engine.stream_sync(request)

    def parse(self, text: str, *, tools_given: bool) -> ParsedReply:
        return self.template.parse_reply(text, tools_given=tools_given)

    def fit_history(self, messages: list[Message], max_new_tokens: int) -> tuple[list[Message], int]:
        """Drop the oldest turns (keeping system prompts) until the prompt leaves room to answer.

        Returns the kept messages and how many were dropped. The last user message always stays; when even it
        alone does not fit, the RequestError from ``request`` tells the user.
        """
        budget = self.max_model_len - min(max_new_tokens, self.max_model_len // 2)
        kept = list(messages)
        dropped = 0
        while True:
            normalized, images = self.normalize(kept)
            length = len(self.build_prompt(normalized, images=images).ids)
            system = [m for m in kept if m["role"] == "system"]
            turns = [m for m in kept if m["role"] != "system"]
            if length <= budget or len(turns) <= 1:
                return kept, dropped
            # Remove the oldest exchange: everything up to (not including) the next user message.
            cut = 1
            while cut < len(turns) - 1 and turns[cut]["role"] != "user":
                cut += 1
            dropped += cut
            kept = system + turns[cut:]
