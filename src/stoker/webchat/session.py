"""One browser session's conversation, and a streamed reply through the chat service.

No Gradio here: the page keeps each session's ``list[Turn]`` in its own ``gr.State`` and calls ``prepare`` then
``stream_reply``. The prompt is built by ``ChatService`` alone, exactly as for the terminal, the API and predict.
"""

from __future__ import annotations

import base64
import json
import mimetypes
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stoker.chat import ChatService, GenerationRequest, PreparedChat, SamplingParams
from stoker.errors import MediaError, RequestError
from stoker.templates.types import Message, Tool, ToolCall

Role = Literal["user", "tool"]
TOOLS_EXAMPLE = '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]'


@dataclass
class Turn:
    """One exchange: what the user said (or a tool result they pasted), and the assistant's reply to it."""

    text: str
    role: Role = "user"
    images: list[str] = field(default_factory=list)  # local paths of uploaded images
    reply: str = ""
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls"; None while streaming or after Stop
    completion_tokens: int = 0
    # For a tool turn: the call it answers.
    tool_call_id: str | None = None
    tool_name: str | None = None


@dataclass
class ChatOptions:
    """The page's controls, as they were when the user pressed Enter."""

    system: str = ""
    tools: list[Tool] = field(default_factory=list)
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    role: Role = "user"
    enable_thinking: bool | None = None  # None: the config's enable_thinking


@dataclass
class Prepared:
    """A message accepted for sending: the history to show (new turn last) and the chat service's request."""

    turns: list[Turn]
    chat: PreparedChat
    dropped_turns: int
    tools_given: bool

    @property
    def request(self) -> GenerationRequest:
        return self.chat.request


# ---------------------------------------------------------------------------------------------------------------
def parse_tools(text: str) -> list[Tool]:
    """The tool-definitions box: a JSON list of OpenAI tools (bare function objects are wrapped); "" means none."""
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(
            f"the tool definitions are not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
            f"Paste a JSON list of tools, e.g. {TOOLS_EXAMPLE}",
            param="tools",
        ) from None
    items = data if isinstance(data, list) else [data]
    tools: list[Tool] = []
    for i, item in enumerate(items):
        function = item.get("function") if isinstance(item, dict) and item.get("type") == "function" else item
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise RequestError(
                f"tool {i + 1} has no \"name\": each tool is {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                f"\"description\": ..., \"parameters\": {{...}}}}}}, e.g. {TOOLS_EXAMPLE}",
                param="tools",
            )
        tools.append({"type": "function", "function": function})
    return tools


def image_url(path: str) -> str:
    """An uploaded image as a data: URL, so the chat service's media checks see bytes rather than a server path."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read the uploaded image {file.name}: {exc.strerror}. Upload it again.") from None
    mime = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def prompt_message(turn: Turn) -> Message:
    if turn.role == "tool":
        message: Message = {"role": "tool", "content": turn.text}
        if turn.tool_call_id:
            message["tool_call_id"] = turn.tool_call_id
        if turn.tool_name:
            message["name"] = turn.tool_name
        return message
    if not turn.images:
        return {"role": "user", "content": turn.text}
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_url(p)}} for p in turn.images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": turn.text}]}


def reply_message(turn: Turn) -> Message:
    message: Message = {"role": "assistant", "content": turn.reply}
    if turn.reasoning:
        # The template keeps or drops it as the model's official template does (Qwen3 keeps it after the last
        # user message, e.g. around tool calls; everything else drops it).
        message["reasoning_content"] = turn.reasoning
    if turn.tool_calls:
        message["tool_calls"] = [
            {**({"id": c.id} if c.id else {}), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in turn.tool_calls
        ]
    return message


def to_messages(turns: list[Turn], system: str = "") -> list[Message]:
    """The conversation the chat service renders: system prompt, then every turn; the last turn is the one to
    answer, so its (empty) reply is left out."""
    messages: list[Message] = [{"role": "system", "content": system}] if system.strip() else []
    for i, turn in enumerate(turns):
        messages.append(prompt_message(turn))
        if i < len(turns) - 1:
            messages.append(reply_message(turn))
    return messages


def conversation(turns: list[Turn], system: str = "") -> list[Message]:
    """The whole conversation as OpenAI-style messages, the last reply included (the page's download)."""
    messages = to_messages(turns, system)
    last = turns[-1] if turns else None
    if last is not None and (last.reply or last.tool_calls or last.reasoning):
        messages.append(reply_message(last))
    return messages


def new_turn(turns: list[Turn], text: str, images: list[str], role: Role) -> Turn:
    if not text.strip() and not images:
        raise RequestError("the message is empty: type something (or attach an image) before sending.")
    if role == "user":
        return Turn(text=text, images=list(images))
    if images:
        raise RequestError("a tool result is text only: send images as a user message.")
    calls = turns[-1].tool_calls if turns else []
    if not calls:
        raise RequestError("there is no tool call to answer: the last reply called no tool. Send as 'user' instead.")
    # The result answers the most recent call.
    return Turn(text=text, role="tool", tool_call_id=calls[-1].id or None, tool_name=calls[-1].name)


def sampling(service: ChatService, options: ChatOptions) -> SamplingParams:
    return service.sampling_params(
        max_new_tokens=None if options.max_new_tokens is None else int(options.max_new_tokens),
        temperature=None if options.temperature is None else float(options.temperature),
        top_p=None if options.top_p is None else float(options.top_p),
        top_k=None if options.top_k is None else int(options.top_k),
    )


def prepare(
    service: ChatService, turns: list[Turn], text: str, images: list[str], options: ChatOptions
) -> Prepared:
    """Check a new message and build its request; raises ``StokerError`` (and changes nothing) when it cannot go.

    When the history no longer fits the context, the oldest turns are dropped, as in the terminal chat.
    """
    turn = new_turn(turns, text, images, options.role)
    params = sampling(service, options)
    history = [*turns, turn]
    kept, dropped = service.fit_history(to_messages(history, options.system), params.max_new_tokens)
    # Every earlier turn is two messages (prompt, reply) and fit_history cuts whole exchanges.
    dropped_turns = dropped // 2
    history = history[dropped_turns:]
    chat = service.prepare(kept, params, tools=options.tools or None, enable_thinking=options.enable_thinking)
    return Prepared(turns=history, chat=chat, dropped_turns=dropped_turns, tools_given=bool(options.tools))


async def stream_reply(service: ChatService, prepared: Prepared) -> AsyncIterator[list[Turn]]:
    """Stream the reply into the last turn, yielding the turns after each new piece of it.

    The chat service's reply parser decides what shows (content, reasoning, tool calls), exactly as in the API. The
    yielded list is always a consistent history: if the page stops here (Stop button, closed tab) the partial reply
    stays, and the engine request is aborted by the cancelled stream.
    """
    turns = prepared.turns
    turn = turns[-1]
    parser = prepared.chat.parser()
    yield turns
    # aclosing: when the page stops this generator, the engine stream closes now, which aborts the request.
    async with aclosing(service.stream(prepared.request)) as deltas:
        async for delta in deltas:
            if delta.text:
                part = parser.push(delta.text)
                if part:
                    turn.reply += part.content
                    turn.reasoning = (turn.reasoning or "") + part.reasoning or None
                    yield turns
            if delta.finish_reason is not None:
                turn.completion_tokens = delta.completion_tokens
                _, reply = parser.finish(delta.finish_reason)
                turn.reply = reply.content or ""
                turn.reasoning = reply.reasoning
                turn.tool_calls = list(reply.tool_calls)
                turn.finish_reason = reply.finish_reason
    yield turns


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Column:
    """One model's answer in Compare: the model's id, and its reply so far."""

    model: str
    reply: str = ""
    reasoning: str | None = None
    finish_reason: str | None = None


def compare_choices(service: ChatService) -> list[str]:
    """The ids Compare offers: each adapter alone and the base weights (empty without adapters)."""
    return [m.id for m in service.models.others]


async def compare_replies(service: ChatService, text: str, options: ChatOptions, models: list[str]
                          ) -> AsyncIterator[list[Column]]:
    """One message answered by each of ``models`` at once (one request each, in the same continuous batch),
    yielding every column after each new piece of any of them."""
    import asyncio

    if not text.strip():
        raise RequestError("the message is empty: type something before comparing.")
    if not models:
        raise RequestError("choose at least one model to compare.")
    served = [service.models.resolve(m) for m in models]
    params = sampling(service, options)
    messages = to_messages([Turn(text=text)], options.system)
    chats = [service.prepare(messages, params, adapter=m.adapter if m else None,
                             enable_thinking=options.enable_thinking) for m in served]
    columns = [Column(m) for m in models]
    parsers = [c.parser() for c in chats]
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async with aclosing(service.stream(chats[i].request)) as deltas:
                async for delta in deltas:
                    await queue.put((i, delta))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, exc))
        else:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(chats))]
    try:
        yield columns
        open_streams = len(tasks)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            column = columns[i]
            if item.text:
                part = parsers[i].push(item.text)
                column.reply += part.content
                column.reasoning = (column.reasoning or "") + part.reasoning or None
            if item.finish_reason is not None:
                _, reply = parsers[i].finish(item.finish_reason)
                column.reply, column.reasoning, column.finish_reason = (reply.content or "", reply.reasoning,
                                                                        reply.finish_reason)
            yield columns
    finally:
        for task in tasks:  # the page stopped or a stream failed: the other requests are aborted too
            task.cancel()
