"""The chat service: the one place that turns a conversation into an engine request and engine output into a reply.

Every surface (terminal, web chat, API, predict) goes through it and none touches an engine, so a conversation renders,
is fitted to the context and replies identically everywhere.

    service = open_chat_service(settings)
    chat = service.prepare(messages, service.sampling_params(max_new_tokens=64), tools=[...])
    parser = chat.parser()                  # one per choice
    async for delta in service.stream(chat.request):
        shown = parser.push(delta.text)     # content / reasoning that can be shown now
    rest, reply = parser.finish(delta.finish_reason)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from stoker.chat import budget
from stoker.chat.media import ImagePrompter
from stoker.chat.messages import normalize, with_default_system, with_system_note
from stoker.chat.models import ServedModels, short_name
from stoker.chat.replies import (
    NO_TOOLS,
    Parse,
    Reply,
    ReplyParser,
    ReplyRules,
    ToolPolicy,
    reasoning_prefix,
    system_notes,
    tool_constraint,
    tool_policy,
)
from stoker.config import Settings, generation_defaults
from stoker.engines.base import (
    Completion,
    Delta,
    DeltaFolder,
    Engine,
    EngineInfo,
    GenerationRequest,
    SamplingParams,
    check_token_ids,
)
from stoker.engines.detokenize import decode
from stoker.engines.structured import StructuredOutput, configured
from stoker.errors import RequestError
from stoker.media.video import Video, VideoRef
from stoker.templates.base import Template
from stoker.templates.types import Message, ParsedReply, Tool

logger = logging.getLogger("stoker")

# Prompt tokens decoded to see whether the prompt itself opened a reasoning block.
PROMPT_TAIL_TOKENS = 8


@dataclass
class Prompt:
    ids: list[int]
    media: dict[str, Any] | None = None


@dataclass
class PreparedChat:
    """A conversation accepted for generation: the engine request, and the rules its replies are read by."""

    request: GenerationRequest
    rules: ReplyRules
    truncated: bool = False  # the prompt was cut to ``max_prompt_tokens``

    def parser(self) -> ReplyParser:
        """A fresh incremental parser, for one choice."""
        return self.rules.parser()

    def reply(self, text: str, finish_reason: str) -> Reply:
        """The reply for one choice's whole generated text."""
        return self.rules.reply(text, finish_reason)


@dataclass
class ChatService:
    engine: Engine
    tokenizer: Any
    template: Template
    settings: Settings
    generation: dict[str, Any]  # resolved generation defaults (see config.generation_defaults)
    model_name: str = "model"  # the model as people say it, for messages (API_MODEL_NAME, or the folder's name)
    processor: Any = None
    adapters: list[str] = field(default_factory=list)  # the config's adapters by id, in the order they apply
    per_request_adapters: bool = False  # requests may choose an adapter, or the base weights, by model id
    constraint: StructuredOutput | None = None  # the config's json_schema / response_format: every reply's default

    # ---------------------------------------------------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

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
            structured=self.constraint,
        )
        return replace(params, **{k: v for k, v in overrides.items() if v is not None})

    # --- the way in: a conversation -> an engine request ------------------------------------------------------------
    def prepare(
        self,
        messages: list[Message],
        params: SamplingParams | None = None,
        *,
        tools: ToolPolicy | Sequence[Tool] | None = None,
        json_mode: bool = False,
        adapter: str | None = None,
        enable_thinking: bool | None = None,
        request_id: str | None = None,
        images: Sequence[Any] = (),
        max_prompt_tokens: int | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> PreparedChat:
        """Normalize, render and package a conversation as an engine request, fitted to the context.

        ``tools``: a policy (see ``chat.replies.tool_policy``), or a list of tools the model may call (``auto``).
        ``json_mode``: OpenAI's JSON mode: the system prompt asks for JSON and, unless ``params`` constrain the
        output already, decoding is constrained to one JSON object.
        ``images``: images and videos (``VideoRef`` / ``Video``) beyond the messages' own parts (a dataset row's),
        already loaded or trusted.
        ``max_prompt_tokens``: a longer prompt keeps its end (predict's ``cutoff_len``) instead of being refused.
        ``add_generation_prompt``, ``continue_final_message``, ``template_kwargs``: as vLLM's request fields (see
        ``Template.render``); the reply of a continued message is the continuation only.
        """
        if continue_final_message and add_generation_prompt:
            raise RequestError("continue_final_message continues the last message, and add_generation_prompt opens "
                               "a new one: set add_generation_prompt to false.", param="continue_final_message")
        policy = tools if isinstance(tools, ToolPolicy) else tool_policy(tools or (), "auto" if tools else None)
        note = system_notes(policy, json_mode)
        if note:
            messages = with_system_note(messages, note, self.settings.default_system)
        normalized, part_images = normalize(messages)
        if max_prompt_tokens is None:  # a prompt that may be cut (predict's cutoff_len) is not refused
            self.check_text_length(sum(len(m["content"]) for m in normalized), "the conversation's text", "messages")
        prompt = self.build_prompt(normalized, tools=policy.tools if policy.active else None,
                                   enable_thinking=enable_thinking, images=[*part_images, *images],
                                   add_generation_prompt=add_generation_prompt,
                                   continue_final_message=continue_final_message, template_kwargs=template_kwargs)
        ids, truncated = prompt.ids, False
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            if prompt.media:
                raise RequestError(
                    f"the prompt is {len(ids)} tokens with its images, over the limit of {max_prompt_tokens} "
                    "(cutoff_len, and room to answer in the model's context); a prompt with images cannot be cut. "
                    "Raise cutoff_len or shorten the conversation.",
                    param="messages",
                )
            ids, truncated = budget.truncate(ids, max_prompt_tokens, getattr(self.tokenizer, "bos_token_id", None)), True
        params = params or self.sampling_params()
        params = self.with_template_stops(params)
        forced = tool_constraint(policy, self.template.tools)
        if forced is not None:
            # A request's own constraint cannot be combined with a forced call; the config's default gives way.
            if params.structured is not None and params.structured != self.constraint:
                raise RequestError(f"tool_choice forces a call, and {params.structured.param} constrains the output "
                                   "too: send only one of them.", param="tool_choice")
            params = replace(params, structured=forced)
        elif json_mode and params.structured is None:
            params = replace(params, structured=StructuredOutput("json_object", "", "response_format"))
        params = self.fit_params(len(ids), params)
        self.check_params(params)
        request = GenerationRequest(prompt_ids=ids, params=params, adapter=adapter, media=prompt.media)
        if request_id:
            request.request_id = request_id
        rules = ReplyRules(self._reply_parse(ids), self.template.tools, self.template.reasoning_markers, policy)
        return PreparedChat(request, rules, truncated)

    def request(self, messages: list[Message], params: SamplingParams | None = None, **options: Any
                ) -> GenerationRequest:
        """``prepare(...).request``: the engine request alone, for callers that read no reply."""
        return self.prepare(messages, params, **options).request

    def build_prompt(
        self,
        messages: list[Message],
        *,
        tools: list[Tool] | None = None,
        enable_thinking: bool | None = None,
        images: Sequence[Any] = (),
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> Prompt:
        """Render an already normalized conversation (see ``normalize``) into prompt ids and media."""
        messages = with_default_system(messages, self.settings.default_system)
        media = None
        if images:
            if not self.info.vision:
                kind = "videos" if any(isinstance(r, (Video, VideoRef)) for r in images) else "images"
                raise RequestError(
                    f"the model {self.model_name!r} takes no {kind}: send text only, or serve a vision-language model.",
                    param="messages",
                )
            messages, media = self._images.place(messages, images)
        thinking = self.settings.enable_thinking if enable_thinking is None else enable_thinking
        ids = self.template.encode(
            self.tokenizer, messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
            enable_thinking=thinking, continue_final_message=continue_final_message, variables=template_kwargs,
        )
        return Prompt(ids=ids, media=media)

    def check_params(self, params: SamplingParams) -> None:
        """The engine's own checks, e.g. compiling a structured output (slow: call it off the event loop)."""
        self.engine.check_params(params)

    def with_template_stops(self, params: SamplingParams) -> SamplingParams:
        """The template's stop words and ids added to the request's; ``ignore_eos`` keeps only the request's ids."""
        stop_ids = params.stop_token_ids if params.ignore_eos else [*params.stop_token_ids, *self.stop_token_ids]
        return replace(params, stop=list(dict.fromkeys([*params.stop, *self.template.stop_words])),
                       stop_token_ids=list(dict.fromkeys(stop_ids)))

    @cached_property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a reply: the template's (eos, end-of-turn tokens) and the engine's eos ids."""
        return list(dict.fromkeys([*self.template.stop_token_ids(self.tokenizer), *self.info.eos_ids]))

    @cached_property
    def _images(self) -> ImagePrompter:
        return ImagePrompter(self.settings, self.processor, self.template, self.tokenizer,
                             expand=self.info.expands_images, model_name=self.model_name)

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for: the longest entry of the vocabulary."""
        return max((len(token) for token in self.tokenizer.get_vocab()), default=1) or 1

    def check_text_length(self, chars: int, what: str, param: str) -> None:
        budget.check_text_length(chars, what, param, max_model_len=self.max_model_len,
                                 max_token_chars=self.max_token_chars)

    def fit_params(self, prompt_len: int, params: SamplingParams, *, param: str = "messages") -> SamplingParams:
        """Check the prompt fits the context and cap max_new_tokens by max_length and what is left."""
        return budget.fit_new_tokens(prompt_len, params, max_model_len=self.max_model_len,
                                     max_length=self.settings.max_length, param=param)

    def check_budget(self, prompt_tokens: int, params: SamplingParams, requested: int | None, param: str) -> None:
        """Refuse an explicit ``max_tokens`` the context cannot hold, and a request over the engine's token cap."""
        budget.check_requested(prompt_tokens, requested, param, max_model_len=self.max_model_len,
                               max_length=self.settings.max_length)
        budget.check_in_flight(prompt_tokens, params, param, max_batch_tokens=self.info.max_batch_tokens)

    def fit_history(self, messages: list[Message], max_new_tokens: int) -> tuple[list[Message], int]:
        """Drop the oldest turns (keeping system prompts) until the prompt leaves room to answer.

        Returns the kept messages and how many were dropped. The last user message always stays; when even it
        alone does not fit, the RequestError from ``prepare`` tells the user.
        """
        limit = budget.prompt_budget(self.max_model_len, max_new_tokens)
        kept = list(messages)
        dropped = 0
        while True:
            normalized, images = normalize(kept)
            length = len(self.build_prompt(normalized, images=images).ids)
            system = [m for m in kept if m["role"] == "system"]
            turns = [m for m in kept if m["role"] != "system"]
            if length <= limit or len(turns) <= 1:
                return kept, dropped
            # Remove the oldest exchange: everything up to (not including) the next user message.
            cut = 1
            while cut < len(turns) - 1 and turns[cut]["role"] != "user":
                cut += 1
            dropped += cut
            kept = system + turns[cut:]

    # --- raw prompts (text completions): no template ------------------------------------------------------------------
    def tokenize_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """Text prompts tokenized as is, with the tokenizer's own special tokens (BOS where it adds one); token-id
        prompts as given, once they are checked to be in the vocabulary."""
        out: list[list[int]] = []
        for i, item in enumerate(prompt_list(prompt)):
            if isinstance(item, str):
                if not item:
                    raise RequestError(f"prompt[{i}] is empty: send some text.", param="prompt")
                self.check_text_length(len(item), f"prompt[{i}]", "prompt")
                ids = list(self.tokenizer(item)["input_ids"])
                if not ids:
                    raise RequestError(f"prompt[{i}] tokenizes to nothing: send some text.", param="prompt")
                out.append(ids)
            else:
                ids = list(item)
                check_token_ids(ids, self.info.vocab_size, f"prompt[{i}]")
                out.append(ids)
        return out

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return decode(self.tokenizer, ids, skip_special_tokens)

    def prompt_text(self, ids: Sequence[int]) -> str:
        """A prompt's text with its special tokens, as LLaMA-Factory writes it into predictions."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # --- the way out: engine deltas -> a reply --------------------------------------------------------------------------
    def parse(self, text: str, *, tools_given: bool) -> ParsedReply:
        return self.template.parse_reply(text, tools_given=tools_given)

    def _reply_parse(self, prompt_ids: list[int]) -> Parse:
        """The template's parser as it must see this prompt's replies: behind the reasoning opener the prompt wrote."""
        prefix = ""
        if self.template.reasoning_markers:
            tail = self.decode(prompt_ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
            prefix = reasoning_prefix(self.template, tail)
        return lambda text, *, tools_given: self.parse(prefix + text, tools_given=tools_given)

    # --- running -----------------------------------------------------------------------------------------------------
    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        return self.engine.stream(request)

    def stream_sync(self, request: GenerationRequest) -> Iterator[Delta]:
        return self.engine.stream_sync(request)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        return self.engine.generate_batch(requests)

    async def complete(self, stream: AsyncIterator[Delta], request: GenerationRequest) -> Completion:
        """Every delta of an (already started) stream folded into a Completion; closing early aborts the request."""
        import contextlib

        folder = DeltaFolder(request.request_id, request.params.n)
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for delta in stream:
                folder.add(delta)
        return folder.completion()

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def close(self) -> None:
        self.engine.close()

    @cached_property
    def models(self) -> ServedModels:
        """The models this service answers as, by id (see ``chat.models``)."""
        return ServedModels.build(model=str(self.settings.model_name_or_path), name=self.settings.api_model_name,
                                  adapters=self.adapters, selectable=self.per_request_adapters)

    def describe(self) -> str:
        """The configured model, for banners and titles: ``base + adapter1 + adapter2``."""
        return self.models.configured.description


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts a text completion's ``prompt`` holds: one string, or one list of token ids, is one prompt."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def open_chat_service(settings: Settings, *, per_request_adapters: bool = False) -> ChatService:
    """Load the model, start its engine (``engines.factory``) and bind the chat template to its tokenizer.

    ``per_request_adapters``: keep LoRA adapters separate so each request can pick one (the API); otherwise the
    config's adapters apply to every request, merged into the weights in order where the backend can (chat, web
    chat, predict), unless ``merge_adapters: false`` keeps the one adapter apart.
    """
    from stoker.engines.factory import open_engine
    from stoker.templates import check_template_mismatch, get_template

    constraint = configured(settings)  # a bad schema stops before the model loads
    opened = open_engine(settings, per_request_adapters=per_request_adapters)
    info = opened.engine.info
    try:
        template = get_template(settings.template, opened.tokenizer, extra_stop_ids=info.eos_ids,
                                tool_format=settings.tool_format, preserve_thinking=settings.preserve_thinking)
    except BaseException:
        opened.engine.close()
        raise
    if settings.template not in (None, "auto"):
        warning = check_template_mismatch(template, opened.tokenizer)
        if warning:
            logger.warning(warning)
    return ChatService(
        engine=opened.engine,
        tokenizer=opened.tokenizer,
        template=template,
        settings=settings,
        generation=generation_defaults(settings, opened.generation_config),
        model_name=settings.api_model_name or short_name(str(settings.model_name_or_path)),
        processor=opened.processor,
        adapters=opened.adapters,
        per_request_adapters=per_request_adapters,
        constraint=constraint,
    )
