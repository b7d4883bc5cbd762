"""Errors a user can cause. Each carries a message meant for a human: what is wrong and how to fix it.

The CLI prints them without a traceback (exit code 2); the server maps them to OpenAI-style 4xx JSON.
"""

from __future__ import annotations


class StokerError(Exception):
    """Base class for every error caused by user input (config, files, requests, data)."""

    http_status = 400
    # OpenAI's error "type" field for HTTP surfaces.
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ConfigError(StokerError):
    """A bad config key, value or file."""


class ModelLoadError(StokerError):
    """The model, tokenizer or adapter cannot be loaded (missing folder, offline hub id, mismatched adapter)."""


class TemplateError(StokerError):
    """A conversation the chat template cannot render (bad roles, order, unknown template)."""


class RequestError(StokerError):
    """A malformed or impossible generation request (e.g. a prompt longer than the context)."""


class NotFoundError(StokerError):
    http_status = 404
    error_type = "not_found_error"


class AuthError(StokerError):
    http_status = 401
    error_type = "authentication_error"


class OverloadedError(StokerError):
    """The engine's queue is full; the client should retry later."""

    http_status = 429
    error_type = "rate_limit_error"


class MediaError(StokerError):
    """A bad image input: unreadable, too large, unsupported, or not allowed."""


class DataError(StokerError):
    """A bad dataset file, dataset_info entry or row."""
