"""Async plumbing between engine streams and HTTP: admission before headers, merging, and client disconnects.

Cancellation contract (the engine's, through ``ChatService.stream``): closing an engine stream, or cancelling the task that iterates it, aborts
the request and frees its slot. Everything here therefore closes streams explicitly (``aclosing``) instead of
leaving them to the garbage collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from stoker.chat import ChatService, Delta, GenerationRequest
from stoker.errors import StokerError
from stoker.server.errors import sse_error
from stoker.server.metrics import ServerMetrics
from stoker.server.protocol import CLIENT_CLOSED, SSE_DONE, SSE_HEADERS, usage

logger = logging.getLogger("stoker")

T = TypeVar("T")


Streams = list[AsyncIterator[Delta]]


async def respond(
    http: Request,
    metrics: ServerMetrics,
    service: ChatService,
    requests: Sequence[GenerationRequest],
    *,
    started: float,
    stream: bool,
    events: Callable[[Streams], AsyncIterator[str]],
    result: Callable[[Streams], Awaitable[dict[str, Any]]],
) -> Response:
    """The shape every generation route shares: admit the requests (an error here is an HTTP status), then answer
    as server-sent ``events`` or as one JSON ``result``. A client that leaves first gets its slots freed."""
    present, streams = await until_disconnected(http, admitted_streams(service, requests))
    if not present or streams is None:
        metrics.aborted += 1
        return Response(status_code=CLIENT_CLOSED)
    metrics.first_token(time.perf_counter() - started)
    if stream:
        return StreamingResponse(events(streams), media_type="text/event-stream", headers=SSE_HEADERS)
    present, body = await until_disconnected(http, result(streams))
    if not present:
        for s in streams:
            await s.aclose()  # type: ignore[attr-defined]
        metrics.aborted += 1
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(body)


@dataclass
class StreamTally:
    """What a streamed answer counts as it goes: choices still open, tokens and finish reasons."""

    open_choices: int
    prompt_tokens: int
    completion_tokens: int = 0
    reasons: list[str] = field(default_factory=list)

    def finished(self, reason: str, completion_tokens: int) -> None:
        self.open_choices -= 1
        self.completion_tokens += completion_tokens
        self.reasons.append(reason)


async def sse_answer(
    events: AsyncIterator[str],
    tally: StreamTally,
    metrics: ServerMetrics,
    request_id: str,
    usage_event: Callable[[dict[str, int]], str] | None,
) -> AsyncIterator[str]:
    """The events of a streamed answer, then its usage event (when asked for) and ``[DONE]``.

    The 200 headers are out by the time ``events`` runs, so a failure becomes an error event, and a client that
    leaves (Starlette closes this generator) is counted as aborted; closing ``events`` aborts its engine requests.
    """
    failed = False
    try:
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for event in events:
                yield event
    except StokerError as exc:  # e.g. a JSON-mode reply that is not JSON
        failed = True
        yield sse_error(exc, request_id)
    except Exception:
        failed = True
        logger.exception("request %s failed while streaming", request_id)
        yield sse_error(None, request_id)
    finally:
        if tally.open_choices and not failed:
            metrics.aborted += 1
        metrics.generation_done(tally.prompt_tokens, tally.completion_tokens, tally.reasons)
    if usage_event is not None and not tally.open_choices:
        yield usage_event(usage(tally.prompt_tokens, tally.completion_tokens))
    yield SSE_DONE


async def admitted_stream(service: ChatService, request: GenerationRequest) -> AsyncIterator[Delta]:
    """Start ``request`` and wait for its first delta, then return a stream of all its deltas.

    Waiting for the first delta means a full queue (429) or an impossible request (400) is an HTTP status, not an
    error event after a 200 header.
    """
    stream = service.stream(request)
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        return _empty()
    except BaseException:
        await stream.aclose()
        raise
    return _prepend(first, stream)


async def _empty() -> AsyncIterator[Delta]:
    return
    yield  # pragma: no cover - makes this an async generator


async def _prepend(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    async with contextlib.aclosing(rest):  # type: ignore[type-var]
        yield first
        async for delta in rest:
            yield delta


async def admitted_streams(service: ChatService, requests: Sequence[GenerationRequest]) -> list[AsyncIterator[Delta]]:
    """``admitted_stream`` for several requests at once. If one fails, or the caller is cancelled, every stream
    already started is closed (aborting its request) before the error propagates."""
    tasks = [asyncio.ensure_future(admitted_stream(service, r)) for r in requests]
    try:
        await asyncio.wait(tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        await _close_started(tasks)
        raise
    failed = [t.exception() for t in tasks if t.exception() is not None]
    if failed:
        await _close_started(tasks)
        raise failed[0]  # type: ignore[misc]
    return [t.result() for t in tasks]


async def _close_started(tasks: Sequence[asyncio.Future[AsyncIterator[Delta]]]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is None:
            await task.result().aclose()  # type: ignore[attr-defined]


async def merge(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's position. Closing the merge closes them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):  # type: ignore[type-var]
            async for item in streams[0]:
                yield 0, item
        return
    done = object()
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    await queue.put((i, item, None))
        except Exception as exc:  # handed to the consumer, raised there
            await queue.put((i, done, exc))
            return
        await queue.put((i, done, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                open_streams -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def until_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Run ``work`` unless the client hangs up first, in which case it is cancelled (freeing its engine slots).

    Returns ``(True, result)`` or ``(False, None)`` when the client left. Streaming responses need none of this:
    Starlette cancels their body iterator when the client goes.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False, None


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
