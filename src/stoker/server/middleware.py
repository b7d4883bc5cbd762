"""The outermost layer of the app: request ids, HTTP metrics, and a last-resort 500 in OpenAI's error shape.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which buffers and breaks streaming cancellation).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

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
