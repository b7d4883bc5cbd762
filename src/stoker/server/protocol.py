"""The OpenAI wire format: pydantic models for requests and responses, and builders for stream chunks.

Only shapes and per-field limits live here; rules that span fields or need the model (context length, adapter ids,
tool names) are checked in ``serving``. Limits follow OpenAI's API reference. Unknown request fields are ignored, as
vLLM does, so clients that send newer or vendor-specific fields keep working.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

# Status for "the client closed the connection before the answer" (nginx's convention); never reaches a client.
CLIENT_CLOSED = 499
# JSON has no -Infinity; impossible tokens are reported with this floor, as OpenAI does.
LOGPROB_FLOOR = -9999.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = "data: [DONE]\n\n"

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
FinishReason = Literal["stop", "length", "tool_calls"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------------------------------------------------
# Chat request
# --------------------------------------------------------------------------------------------------------------------
class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Request):
    url: str


class VideoPart(_Request):
    """LLaMA-Factory's and vLLM's video part (not in OpenAI's API)."""

    type: Literal["video_url"]
    video_url: VideoURL


class AudioPart(_Request):
    """OpenAI's audio parts: accepted here so that the refusal names them (no audio model is supported)."""

    type: Literal["input_audio", "audio_url"]
    input_audio: dict[str, Any] | None = None
    audio_url: dict[str, Any] | None = None


ContentPart = Annotated[TextPart | ImagePart | VideoPart | AudioPart, Field(discriminator="type")]


class FunctionCallIn(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it back


class ToolCallIn(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool results
    reasoning_content: str | None = None


class FunctionDef(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON Schema of the arguments' object.")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _a_json_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """The schema is rendered into the prompt and read back to check calls: refuse one that means nothing."""
        if value is None:
            return value
        import jsonschema  # about 40 ms to import: only requests with tools pay it

        try:
            jsonschema.Draft202012Validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            where = "".join(f"[{p!r}]" for p in exc.absolute_path)
            raise ValueError(f"parameters{where} is not a valid JSON Schema: {exc.message}") from None
        if value.get("type", "object") != "object":
            raise ValueError(f"parameters must describe an object (type 'object'), not {value['type']!r}")
        return value


class ToolDef(_Request):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JSONSchemaFormat(_Request):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's ``structured_outputs``: exactly one of these constrains the output."""

    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class ChatTemplateKwargs(BaseModel):
    """Variables for the chat template (vLLM's ``chat_template_kwargs``): a Jinja template reads any of them."""

    model_config = ConfigDict(extra="allow")
    enable_thinking: StrictBool | None = Field(
        default=None, description="Switch a reasoning model's thinking on or off (default: the config's)."
    )


class StreamOptions(_Request):
    include_usage: bool | None = None


# Rules between fields, for clients and fuzzers that read the schema (``json_schema_extra``); the server checks
# them as well.
_STREAM_OPTIONS_NEED_STREAM = {
    "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
}


class SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: str = Field(description="The base model's id or a LoRA adapter's id, as listed by GET /v1/models.")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, description="Token id (as a string) to a bias in [-100, 100], added to its logit.")
    user: str | None = None
    # Extensions (vLLM's names): not in OpenAI's API, ignored by OpenAI-only clients.
    top_k: int | None = Field(
        default=None, ge=-1, description="Extension: keep the k most likely tokens; 0 or -1 = off."
    )
    repetition_penalty: float | None = Field(
        default=None, ge=0.01, le=10, description="Extension: transformers' multiplicative penalty on seen tokens."
    )
    min_p: float | None = Field(default=None, ge=0, le=1, description="Extension: drop tokens below min_p x the top "
                                "token's probability.")
    min_tokens: int = Field(default=0, ge=0, description="Extension: no stop ends a choice before this many tokens.")
    ignore_eos: bool = Field(default=False, description="Extension: only stop_token_ids (and stop) end a choice.")
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=64)] | None = Field(
        default=None, description="Extension: token ids that end a choice.")
    bad_words: Annotated[list[str], Field(max_length=64)] | None = Field(
        default=None, description="Extension: words never generated.")
    allowed_token_ids: Annotated[list[StrictInt], Field(min_length=1)] | None = Field(
        default=None, description="Extension: only these token ids are generated.")
    prompt_logprobs: int | None = Field(
        default=None, ge=0, le=20, description="Extension: the logprob of every prompt token and its top k "
        "alternatives, as vLLM returns them.")
    structured_outputs: StructuredOutputs | None = Field(
        default=None, description="Extension: constrain the output to a JSON schema, regex, choice or EBNF grammar.")
    # vLLM's older names for structured_outputs' fields.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = Field(
        default=None, description="Extension: variables for the chat template; {'enable_thinking': bool} switches "
        "a reasoning model's thinking."
    )
    add_generation_prompt: bool = Field(
        default=True, description="Extension: end the prompt with the assistant turn's opening.")
    continue_final_message: bool = Field(
        default=False, description="Extension: the last (assistant) message is continued, not answered; needs "
        "add_generation_prompt false.")
    include_reasoning: bool = Field(
        default=True, description="Extension: false leaves reasoning_content out of the answer.")

    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
         "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}},
        _STREAM_OPTIONS_NEED_STREAM,
    ]})


class CompletionRequest(SamplingFields):
    # Token ids are strict integers: JSON's true/false are not ids.
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[StrictInt], Field(min_length=1)] | Annotated[
        list[Annotated[list[StrictInt], Field(min_length=1)]], Field(min_length=1)
    ]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for text completions
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=128)

    model_config = ConfigDict(json_schema_extra={"allOf": [
        _STREAM_OPTIONS_NEED_STREAM,
    ]})


# --------------------------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "stoker"
    parent: str | None = Field(default=None, description="For a LoRA adapter: the id of its base model.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None  # 1 for the most likely token; null for a prompt token outside the top k
    decoded_token: str


# vLLM's shape: per prompt token, {token id: its entry} for the token itself and its top k; null for the first.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    prompt_logprobs: PromptLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


# --------------------------------------------------------------------------------------------------------------------
# Tokens in and out (vLLM's /tokenize and /detokenize shapes) and the rendered chat prompt
# --------------------------------------------------------------------------------------------------------------------
class TokenizeRequest(_Request):
    """Either ``prompt`` (text, tokenized as ``/v1/completions`` would) or ``messages`` (rendered with the chat
    template as ``/v1/chat/completions`` would, ``tools`` and ``chat_template_kwargs`` included)."""

    model: str = ""
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[ToolDef] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt (text) or messages (a conversation)")
        return self

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str = ""
    tokens: list[StrictInt] = Field(min_length=1)


class DetokenizeResponse(BaseModel):
    prompt: str


class RenderedChat(BaseModel):
    """The exact prompt a chat completion request gives the model, and how much room it leaves."""

    model: str
    prompt: str
    prompt_token_ids: list[int]
    count: int
    max_model_len: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------------------------------------------------
# Stream chunks. Plain dicts: one is built per token per client, and OpenAI's chunks carry explicit nulls
# ("finish_reason": null, "logprobs": null) that exclude-unset model dumps would drop.
# --------------------------------------------------------------------------------------------------------------------
def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    *,
    with_usage: bool,
    usage_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if with_usage:
        chunk["usage"] = usage_counts  # null on every chunk but the last, as OpenAI does with include_usage
    return chunk


def chat_chunk_choice(
    index: int,
    delta: dict[str, Any],
    *,
    logprobs: dict[str, Any] | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_chunk(
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    *,
    with_usage: bool,
    usage_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if with_usage:
        chunk["usage"] = usage_counts
    return chunk


def prompt_logprobs_json(items: list[Any] | None, k: int) -> list[dict[str, dict[str, Any]] | None] | None:
    """Engine ``TokenLogprob`` entries (None for the first token) in vLLM's ``prompt_logprobs`` shape."""
    if items is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for item in items:
        if item is None:
            out.append(None)
            continue
        entry = {str(tid): {"logprob": max(lp, LOGPROB_FLOOR), "rank": rank, "decoded_token": text}
                 for rank, (tid, text, lp) in enumerate(item.top[:k], start=1)}
        if str(item.token_id) not in entry:
            entry[str(item.token_id)] = {"logprob": max(item.logprob, LOGPROB_FLOOR), "rank": None,
                                         "decoded_token": item.token}
        out.append(entry)
    return out
