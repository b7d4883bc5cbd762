"""The FastAPI app of ``stoker api``: OpenAI's chat and text completion routes over one batching engine.

One uvicorn worker serves every client: concurrency comes from the engine batching requests step by step, not
from processes (each of which would load its own copy of the model).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

from stoker import __version__
from stoker.errors import ConfigError, NotFoundError
from stoker.server.auth import bearer_auth
from stoker.server.body import parsed_body
from stoker.server.docs_page import docs_html
from stoker.server.errors import install_error_handlers
from stoker.server.middleware import BodyLimitMiddleware, ObservabilityMiddleware, TrailingSlashMiddleware
from stoker.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    RenderedChat,
    TokenizeRequest,
    TokenizeResponse,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)
from stoker.server.serving_chat import create_chat_completion
from stoker.server.serving_completions import create_completion
from stoker.server.serving_tokens import detokenize, render_chat, tokenize
from stoker.server.state import ServerState

if TYPE_CHECKING:
    from stoker.chat import ChatService
    from stoker.config import Settings

logger = logging.getLogger("stoker")

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (bad JSON, field, role, or too many tokens)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (when API_KEY is set)"},
    404: {"model": ErrorResponse, "description": "Unknown model id"},
    429: {"model": ErrorResponse, "description": "The engine's queue is full; retry later"},
    500: {"model": ErrorResponse, "description": "Unexpected server error (logged with the request id)"},
}
_STREAMABLE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def create_app(service: ChatService, settings: Settings) -> FastAPI:
    """The app over an opened chat service: ``chat.open_chat_service(settings, per_request_adapters=True)``."""
    state = ServerState(service=service, settings=settings)
    app = FastAPI(
        title="Stoker",
        version=__version__,
        description="OpenAI-compatible API. Send 'Authorization: Bearer <API_KEY>' when the server has a key.",
        redirect_slashes=False,  # TrailingSlashMiddleware serves such paths without a redirect
        docs_url=None,  # FastAPI's pages load scripts from a CDN: /docs below is one local page instead
        redoc_url=None,
    )
    app.state.stoker = state
    install_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer_auth(settings.api_key))], responses=_ERRORS)

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=state.model_cards())

    @v1.get("/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str) -> ModelCard:
        served = service.models.resolve(model_id)
        if served is None:
            known = ", ".join(repr(card.id) for card in state.model_cards())
            raise NotFoundError(f"The model {model_id!r} does not exist on this server. Served models: {known}.",
                                param="model", code="model_not_found")
        return next(card for card in state.model_cards() if card.id == served.id)

    context = lambda: service.max_model_len  # noqa: E731
    chat_body = Depends(parsed_body(ChatCompletionRequest, context))
    completion_body = Depends(parsed_body(CompletionRequest, context))

    @v1.post("/chat/completions", response_model=ChatCompletion, responses=_STREAMABLE,
             openapi_extra=_request_body("ChatCompletionRequest"))
    async def chat_completions(request: Request, body: ChatCompletionRequest = chat_body) -> Response:
        return await create_chat_completion(state, body, request)

    @v1.post("/completions", response_model=Completion, responses=_STREAMABLE,
             openapi_extra=_request_body("CompletionRequest"))
    async def completions(request: Request, body: CompletionRequest = completion_body) -> Response:
        return await create_completion(state, body, request)

    @v1.post("/chat/completions/render", response_model=RenderedChat,
             openapi_extra=_request_body("ChatCompletionRequest"))
    async def render(request: Request, body: ChatCompletionRequest = chat_body) -> RenderedChat:
        return await render_chat(state, body, "render-" + request.state.request_id)

    app.include_router(v1)
    tokens = APIRouter(dependencies=[Depends(bearer_auth(settings.api_key))], responses=_ERRORS)

    @tokens.post("/tokenize", response_model=TokenizeResponse, openapi_extra=_request_body("TokenizeRequest"))
    async def tokenize_route(request: Request,
                             body: TokenizeRequest = Depends(parsed_body(TokenizeRequest, context))) -> TokenizeResponse:
        return await tokenize(state, body, "tokenize-" + request.state.request_id)

    @tokens.post("/detokenize", response_model=DetokenizeResponse, openapi_extra=_request_body("DetokenizeRequest"))
    async def detokenize_route(body: DetokenizeRequest = Depends(parsed_body(DetokenizeRequest, context))
                               ) -> DetokenizeResponse:  # fmt: skip
        return await detokenize(state, body)

    app.include_router(tokens)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(model=state.configured_model)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_html(app.openapi()))

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        text = state.metrics.render(service.stats())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.api_max_body_mb * 1024**2)
    app.add_middleware(TrailingSlashMiddleware)
    app.add_middleware(ObservabilityMiddleware, metrics=state.metrics)  # added last: the outermost
    ids = [card.id for card in state.model_cards()]
    app.openapi = lambda: _openapi_with_model_ids(app, ids, strict=settings.api_strict_model)  # type: ignore
    return app


def _request_body(name: str) -> dict[str, Any]:
    """The OpenAPI request body of a route whose body ``parsed_body`` reads (FastAPI sees only a dependency)."""
    schema = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi_with_model_ids(app: FastAPI, model_ids: list[str], *, strict: bool) -> dict[str, Any]:
    """FastAPI's schema, plus the request bodies' schemas, with the served model ids as the values ``model`` takes
    (clients and fuzzers see them): the only ones allowed with ``api_strict_model``, else examples (any id gets
    the configured model)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi
        from pydantic.json_schema import models_json_schema

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, bodies = models_json_schema([(m, "validation") for m in (ChatCompletionRequest, CompletionRequest,
                                                                    TokenizeRequest, DetokenizeRequest)],
                                       ref_template="#/components/schemas/{model}")  # fmt: skip
        for name, definition in bodies["$defs"].items():
            schema["components"]["schemas"].setdefault(name, definition)
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            schema["components"]["schemas"][name]["properties"]["model"]["enum" if strict else "examples"] = model_ids
        app.openapi_schema = schema
    return app.openapi_schema


def run_api(settings: Settings) -> int:
    """Load the model, serve until Ctrl-C / SIGTERM, then release the engine. Returns the exit code."""
    import uvicorn

    from stoker.chat import open_chat_service

    # Bind before loading the model: a busy port should fail in a second, not after the load.
    sock = _bind(settings.api_host, settings.api_port)
    if settings.api_host in ("0.0.0.0", "::", "") and not settings.api_key:
        logger.warning("listening on every network interface (api_host %r) without an API key: anyone who can reach "
                       "this machine can use the model. Set API_KEY, or API_HOST=127.0.0.1 to serve this machine "
                       "only.", settings.api_host)
    service = open_chat_service(settings, per_request_adapters=True)
    try:
        app = create_app(service, settings)
        state: ServerState = app.state.stoker
        shown_host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::") else settings.api_host
        logger.info(
            "serving %s (%s) on http://%s:%d/v1 (models: %s)%s",
            state.configured_model,
            service.describe(),
            shown_host,
            sock.getsockname()[1],
            ", ".join(card.id for card in state.model_cards()),
            "; API key required" if settings.api_key else "",
        )
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.close()
        sock.close()
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): another process may use the port. Set "
            "api_port (or API_PORT) to a free port, or api_host (API_HOST) to an address of this machine."
        ) from None
    sock.set_inheritable(True)
    return sock
