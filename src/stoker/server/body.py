"""Request bodies parsed off the event loop, with the cheap checks that keep one body from stalling every client.

FastAPI validates a body on the event loop, and pydantic holds the GIL while it does: a 34 MB body of a million
small messages took 1.4 s, during which no other client (``/health`` included) was answered. So the generation
routes take their body through ``parsed_body``:

1. the raw bytes are read (the size cap is the middleware's);
2. a body with more JSON objects and arrays than a request that fits the context could hold is refused at once
   (counting brackets scans 34 MB in tens of milliseconds; a text that really holds that many brackets would be far
   longer than the context in tokens);
3. validation runs in a worker thread. pydantic's JSON parser refuses lone UTF-16 surrogates (``"\\ud800"``, which
   Python's ``json`` would let through to the tokenizer), and the error then says so.

Errors are FastAPI's ``RequestValidationError``, so they come out as the same 400 as any other invalid field.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from stoker.errors import RequestError

M = TypeVar("M", bound=BaseModel)

# Per token of context, how many JSON objects and arrays a body may hold (messages, content parts, tool schemas),
# plus a floor for small contexts. Each message or part renders to at least one token.
CONTAINERS_PER_TOKEN = 16
CONTAINERS_FLOOR = 10_000
# A \uD800-\uDFFF escape (not itself an escaped backslash) that is not a high surrogate followed by a low one.
_LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*(\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<![89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def parsed_body(model: type[M], max_model_len: Callable[[], int]) -> Callable[[Request], Awaitable[M]]:
    """A FastAPI dependency that reads, bounds and validates a ``model`` body off the event loop."""

    async def dependency(request: Request) -> M:
        raw = await request.body()
        return await asyncio.to_thread(validate_body, model, raw, max_model_len())

    return dependency


def validate_body(model: type[M], raw: bytes, max_model_len: int) -> M:
    limit = CONTAINERS_PER_TOKEN * max_model_len + CONTAINERS_FLOOR
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > limit:
        raise RequestError(
            f"the request body holds about {containers:,} JSON objects and arrays; a request that fits the model's "
            f"context of {max_model_len:,} tokens holds at most {limit:,}. Send fewer messages (or content parts).",
            code="context_length_exceeded")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            surrogate = _LONE_SURROGATE.search(raw)
            if surrogate:
                raise RequestError(
                    f"the request body holds a lone UTF-16 surrogate ({surrogate.group(1).decode()!r} at byte "
                    f"{surrogate.start(1):,}), which is not text: send valid Unicode.") from None
        raise RequestValidationError([{**e, "loc": ("body", *e.get("loc", ()))} for e in errors]) from None
