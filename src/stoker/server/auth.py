"""Bearer-token check for the ``/v1`` routes when ``API_KEY`` is set. ``/health`` and ``/metrics`` stay open, as in
vLLM, so load balancers and Prometheus need no secret."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from stoker.errors import AuthError


def bearer_auth(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that raises ``AuthError`` (401) unless the request carries ``Bearer <api_key>``."""
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise AuthError(
                "missing API key: send the header 'Authorization: Bearer <key>' (the server's API_KEY).",
                code="invalid_api_key",
            )
        # Compare in constant time so the key cannot be guessed byte by byte from response times.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise AuthError(
                "incorrect API key: send the header 'Authorization: Bearer <key>' with the server's API_KEY.",
                code="invalid_api_key",
            )

    return check
