"""What both backends share: requests run on one background thread and report back through a sink.

A backend turns a ``GenerationRequest`` into its own prepared request (``_prepare``), hands prepared requests to
its thread (``_submit``) and can cancel one from any thread (``_cancel``). Its thread calls the request's ``sink``
with each list of new deltas, or with an exception that ends the request. On top of those three, this module
builds the two ways in that ``Engine`` promises: an async ``stream`` and a blocking ``generate_batch``.
"""

from __future__ import annotations

import abc
import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stoker.engines.base import Completion, Delta, Engine, GenerationRequest, SamplingParams, collect
from stoker.errors import RequestError

Sink = Callable[[list[Delta] | BaseException], None]


@dataclass(eq=False)
class PreparedRequest:
    """The part of a backend's prepared request that this module needs."""

    uid: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink | None = field(default=None, kw_only=True)
    aborted: bool = field(default=False, kw_only=True)


class ThreadedEngine(Engine):
    """An engine whose requests run on a background thread; subclasses implement the hooks below and set
    ``_cond`` (guarding their queues), ``_closed`` and ``_thread`` (which returns once ``_closed`` is set)."""

    _cond: threading.Condition
    _closed: bool
    _thread: threading.Thread

    @abc.abstractmethod
    def _prepare(self, request: GenerationRequest, position: int | None = None) -> Any:
        """Validate ``request`` (raising ``RequestError``) and return the backend's ``PreparedRequest``."""

    @abc.abstractmethod
    def _submit(self, requests: list[Any], *, bounded: bool) -> None:
        """Queue prepared requests; ``bounded``: raise ``OverloadedError`` when the queue is full."""

    @abc.abstractmethod
    def _cancel(self, req: Any) -> None:
        """Abort a prepared request from any thread and free its resources."""

    @abc.abstractmethod
    def _send(self, req: Any, item: list[Delta] | BaseException) -> None:
        """Hand ``item`` to the request's sink (the thread that calls this must not hold ``_cond``)."""

    @abc.abstractmethod
    def _take_unfinished(self) -> list[Any]:
        """After the thread has stopped: remove and return every request that has not finished."""

    def _after_close(self) -> None:
        """Release what the backend holds besides its thread (processes, memory)."""

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        error = RequestError("the engine was shut down before this request finished")
        for req in self._take_unfinished():
            self._send(req, error)
        self._after_close()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:  # type: ignore[override]
        req = self._prepare(request)
        mailbox = _mailbox(asyncio.get_running_loop())
        inbox: asyncio.Queue[list[Delta] | BaseException] = asyncio.Queue()
        req.sink = lambda item: mailbox.post(inbox, item)
        self._submit([req], bounded=True)
        open_choices = req.params.n
        try:
            while open_choices:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    open_choices = 0
                    raise item
                for delta in item:
                    if delta.finish_reason is not None:
                        open_choices -= 1
                    yield delta
        finally:
            if open_choices:  # the caller left early (disconnect, break, cancellation): free the slot now
                self._cancel(req)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        prepared = [self._prepare(r, position=i) for i, r in enumerate(requests)]
        if not prepared:
            return []
        deltas: list[list[Delta]] = [[] for _ in prepared]
        unfinished = [r.params.n for r in prepared]
        remaining = [len(prepared)]
        errors: list[BaseException] = []
        done = threading.Event()

        def make_sink(i: int) -> Sink:
            # Runs on the engine's thread.
            def sink(item: list[Delta] | BaseException) -> None:
                if isinstance(item, BaseException):
                    errors.append(item)
                    done.set()
                    return
                deltas[i].extend(item)
                finished = sum(d.finish_reason is not None for d in item)
                if finished:
                    unfinished[i] -= finished
                    if unfinished[i] == 0:
                        remaining[0] -= 1
                        if remaining[0] == 0:
                            done.set()

            return sink

        for i, req in enumerate(prepared):
            req.sink = make_sink(i)
        self._submit(prepared, bounded=False)
        try:
            while not done.wait(0.5):  # a timed wait, so that Ctrl-C reaches this thread
                pass
        finally:
            if not done.is_set() or errors:  # interrupted (Ctrl-C) or failed: free every slot
                for req in prepared:
                    self._cancel(req)
        if errors:
            raise errors[0]
        return [collect(d, r.request_id, r.params.n) for d, r in zip(deltas, prepared)]


class _Mailbox:
    """Hands items from the engine's thread to the queues of one event loop, one wake-up for a burst of them.

    A decode step has news for every running stream; most of them live on the same loop (the API server's), and
    waking that loop once per step instead of once per stream saves a self-pipe write and a GIL hand-off each.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []
        self._scheduled = False

    def post(self, queue: asyncio.Queue[Any], item: Any) -> None:
        if self.loop.is_closed():  # the caller's loop is gone: the engine aborts the request (see _send)
            raise RuntimeError("event loop is closed")
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = _Mailbox(loop)
        return box
