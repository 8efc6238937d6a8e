"""Typed errors of the model service, shared by both sides.

The model service answers a failed call with HTTP ``status`` and body
``{"error": {"code": <code>, "message": <text>}}``; the api service maps ``code`` back to the exception
and then to the public OpenAI error (400 / 404 / 429 / 503 / 500).
"""

from __future__ import annotations

import re


class ModelServiceError(Exception):
    code = "internal"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidRequest(ModelServiceError):
    code = "invalid_request"
    status = 400


class InvalidMedia(InvalidRequest):
    """Undecodable image/video, too many pixels or frames, decompression bomb. A message about one part
    starts with its path and ``": "`` (``messages[i].content[j]``, read back by ``param``)."""

    code = "invalid_media"

    @property
    def param(self) -> str:
        head = self.message.split(": ", 1)[0]
        return head if re.fullmatch(r"messages\[\d{1,6}\]\.content\[\d{1,6}\]", head) else "messages"


class PromptTooLong(InvalidRequest):
    """The prompt plus ``max_tokens`` does not fit the model's context."""

    code = "prompt_too_long"


class InvalidSchema(InvalidRequest):
    """A JSON schema the grammar compiler rejects (``response_format`` or a tool's ``parameters``). The
    message starts with the public parameter path and ``": "`` (``param_of`` reads it back)."""

    code = "invalid_schema"

    @property
    def param(self) -> str:
        return param_of(self.message)


class InvalidValue(InvalidRequest):
    """A request value over one of the service's caps (``mm_processor_kwargs``, ``n``). The message starts
    with the public parameter path and ``": "`` (``param``)."""

    code = "invalid_value"

    @property
    def param(self) -> str:
        head = self.message.split(": ", 1)[0]
        return head if re.fullmatch(r"mm_processor_kwargs\.[a-z_]{1,32}|n", head) else "mm_processor_kwargs"


def param_of(message: str) -> str:
    """The parameter path an ``InvalidSchema`` message starts with; ``response_format`` when none."""
    head = message.split(": ", 1)[0]
    if head in ("response_format", "tools") or re.fullmatch(r"tools\[\d{1,3}\]\.function\.parameters", head):
        return head
    return "response_format"


class NotFound(ModelServiceError):
    code = "not_found"
    status = 404


class Unauthorized(ModelServiceError):
    code = "unauthorized"
    status = 401


class Overloaded(ModelServiceError):
    """The queue is full: answered at once, never an unbounded wait (api: 429 + Retry-After)."""

    code = "overloaded"
    status = 429


class NotReady(ModelServiceError):
    """Weights not loaded yet, load failed, or shutting down (api: 503 + Retry-After)."""

    code = "not_ready"
    status = 503


class Conflict(ModelServiceError):
    """A request with this id already exists."""

    code = "conflict"
    status = 409


_BY_CODE: dict[str, type[ModelServiceError]] = {
    cls.code: cls
    for cls in (
        ModelServiceError,
        InvalidRequest,
        InvalidMedia,
        PromptTooLong,
        InvalidSchema,
        InvalidValue,
        NotFound,
        Unauthorized,
        Overloaded,
        NotReady,
        Conflict,
    )
}


def error_from_body(status: int, body: object) -> ModelServiceError:
    """Rebuild the typed error from a model service error response."""
    code, message = "internal", f"model service answered HTTP {status}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code", code))
        message = str(body["error"].get("message", message))
    return error_from_code(code, message)


def error_from_code(code: str, message: str) -> ModelServiceError:
    """The typed error of a model-service error ``code`` (an error response's, or a ``Finished`` event's);
    an unknown code is ``ModelServiceError`` (internal)."""
    return _BY_CODE.get(code, ModelServiceError)(message)
