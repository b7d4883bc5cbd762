"""The outer layers of the app: request ids, HTTP metrics, a last-resort 500 in OpenAI's error shape, a cap on
request bodies, and paths with a trailing slash served as they are.

Plain ASGI middlewares (not Starlette's BaseHTTPMiddleware, which buffers and breaks streaming cancellation).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from fastapi import HTTPException

from stoker.server.errors import internal_error_body
from stoker.server.metrics import ServerMetrics

logger = logging.getLogger("stoker")

REQUEST_ID_HEADER = b"x-request-id"


def new_request_id() -> str:
    return uuid.uuid4().hex


class ObservabilityMiddleware:
    def __init__(self, app: Any, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        self.metrics.in_progress += 1
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # Anything that escaped the routes' own handling is a bug: log it with the id the client sees, answer
            # 500 in OpenAI's shape if nothing was sent yet, and keep serving.
            logger.exception("request %s (%s %s) failed", request_id, scope.get("method"), scope.get("path"))
            status = 500
            if not response_started:
                body = json.dumps(internal_error_body(request_id)).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (REQUEST_ID_HEADER, request_id.encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            self.metrics.in_progress -= 1
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.http_done(path, scope.get("method", ""), status, time.perf_counter() - started)


class BodyLimitMiddleware:
    """Refuses a request body larger than ``max_bytes`` with a 413 before it is read whole.

    A declared ``Content-Length`` is checked up front; a chunked body is counted as it arrives. Either way the error is
    raised from ``receive`` as FastAPI's ``HTTPException``, which FastAPI passes on (any other error while reading
    the body would become its generic 400) and the app's handler turns into OpenAI's error shape.
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large(int(declared), exact=True)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(received, exact=False)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self, size: int, *, exact: bool) -> HTTPException:
        limit_mb = self.max_bytes / 1024**2
        return HTTPException(
            413, f"the request body is {'' if exact else 'at least '}{size} bytes, more than this "
                 f"server accepts ({limit_mb:g} MiB, api_max_body_mb). Send less (e.g. smaller images), or raise "
                 "api_max_body_mb / API_MAX_BODY_MB.")


class TrailingSlashMiddleware:
    """Serves ``/v1/models/`` as ``/v1/models``, with no redirect.

    Starlette's own answer is a 307 whose ``Location`` is built from the client's ``Host`` header, so ``Host:
    evil.example`` made the server send clients to another site; the app is created with ``redirect_slashes=False``
    and paths are mended here instead.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = dict(scope)
            scope["path"] = path.rstrip("/") or "/"
            raw = scope.get("raw_path")
            if raw:
                scope["raw_path"] = raw.rstrip(b"/") or b"/"
        await self.app(scope, receive, send)
