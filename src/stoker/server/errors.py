"""Every error the server returns has OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Request validation fails with 400 (as OpenAI does, rather than FastAPI's 422), with messages that name the field.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from stoker.errors import StokerError

logger = logging.getLogger("stoker")

_HTTP_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_body(message: str, error_type: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    error_type: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param=param, code=code), status_code=status, headers=headers)


def stoker_error_body(exc: StokerError) -> dict[str, Any]:
    return error_body(exc.message, exc.error_type, param=exc.param, code=exc.code)


def stoker_error_response(exc: StokerError) -> JSONResponse:
    # Retry-After: the queue drains as the batch finishes sequences, typically within a second or two.
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else {"Retry-After": "1"} if (
        exc.http_status == 429) else None
    return JSONResponse(stoker_error_body(exc), status_code=exc.http_status, headers=headers)


def internal_error_body(request_id: str) -> dict[str, Any]:
    return error_body(
        f"the server hit an unexpected error while answering this request (request id {request_id}); it is logged "
        "under that id. Retry, and report it if it persists.",
        "server_error",
        code="internal_error",
    )


# --------------------------------------------------------------------------------------------------------------------
# Validation messages
# --------------------------------------------------------------------------------------------------------------------
def _field_path(loc: tuple[Any, ...]) -> str:
    """``("body", "messages", 0, "content", "str")`` -> ``messages[0].content``.

    Pydantic puts the tag of the union member it tried into the location (``str``, ``list[str]``, ``NamedToolChoice``,
    or a discriminator value repeated before the field of the same name); those say nothing to a client.
    """
    items = list(loc[1:] if loc and loc[0] == "body" else loc)
    parts: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        text = str(item)
        repeated = i + 1 < len(items) and items[i + 1] == item
        if "[" in text or text in _TYPE_TAGS or text[:1].isupper() or repeated:
            continue
        parts.append(("." if parts else "") + text)
    return "".join(parts)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One human message for a list of pydantic errors, and the first offending field (OpenAI's ``param``)."""
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return f"the request body is not valid JSON ({detail}). Send a JSON object.", None
    if any(tuple(err.get("loc", ())) == ("body",) and err.get("type") != "value_error" for err in errors):
        return "the request body must be a JSON object (with Content-Type: application/json).", None
    grouped: dict[str, list[str]] = {}
    for err in errors:
        path = _field_path(tuple(err.get("loc", ()))) or "body"
        msg = _message(err)
        if msg not in grouped.setdefault(path, []):
            grouped[path].append(msg)
    # A union field whose list branch failed deeper down also reports "should be a valid string": keep the deeper one.
    paths = list(grouped)
    grouped = {p: m for p, m in grouped.items() if not any(q.startswith((p + "[", p + ".")) for q in paths)}
    lines = [f"{path}: {', or '.join(msgs)}" for path, msgs in grouped.items()]
    first = next(iter(grouped), None)
    return "invalid request: " + "; ".join(lines[:5]) + (" ..." if len(lines) > 5 else ""), first


def _message(err: dict[str, Any]) -> str:
    kind = err.get("type")
    if kind == "missing":
        return "field required"
    if kind == "too_short" and err.get("loc", ())[-1:] == ("messages",):
        return "must hold at least one message (e.g. [{'role': 'user', 'content': 'Hello'}])"
    if kind == "value_error":  # a rule of the model's own: its text is the message
        return str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "union_tag_invalid":
        ctx = err.get("ctx") or {}
        return f"unknown type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    return str(err.get("msg", "invalid value"))


# --------------------------------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------------------------------
def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return error_response(400, message, "invalid_request_error", param=param)

    @app.exception_handler(StokerError)
    async def _stoker(request: Request, exc: StokerError) -> JSONResponse:
        return stoker_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            message = f"no route {request.method} {request.url.path}; see GET /docs for the API."
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        return error_response(
            status,
            message,
            _HTTP_TYPES.get(status, "invalid_request_error"),
            headers=getattr(exc, "headers", None),
        )


def sse_error(exc: StokerError | None, request_id: str) -> str:
    """An error inside a stream whose 200 headers are already sent: one SSE event, which the openai client raises."""
    body = stoker_error_body(exc) if exc is not None else internal_error_body(request_id)
    return f"data: {json.dumps(body)}\n\n"
