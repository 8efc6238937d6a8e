"""Typed errors of the api service and the ONE place that turns any exception into OpenAI error JSON.

Routes and helpers raise; ``to_api_error`` maps model-service errors, store outages and our own types onto
the public contract's statuses; ``error_response`` renders the body; the handlers are installed by main.py.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api.store.base import StoreUnavailable
from services.protocol import errors as model_errors

log = logging.getLogger("api.errors")


class ApiError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(ApiError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(ApiError):
    status = 503
    type = "service_unavailable_error"
    code = "service_unavailable"


class InternalError(ApiError):
    status = 500
    type = "server_error"
    code = "internal_error"


def session_not_found(session_id: str) -> NotFound:
    # One message for "unknown", "expired" and "another key's": existence must not leak across keys.
    return NotFound(f"session {session_id!r} not found", param="session_id", code="session_not_found")


def param_path(loc: Sequence[str | int]) -> str:
    """The one style of ``param`` in every error: ``("messages", 0, "content", 1, "type")`` ->
    ``"messages[0].content[1].type"`` (list indexes in brackets, field names joined by dots)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# Python object reprs (``<_io.BytesIO object at 0x7f...>``) and absolute file paths say nothing to a client
# and describe our internals: they never reach an error message.
_INTERNAL_TEXT = re.compile(r"<[^<>]{0,200} at 0x[0-9a-fA-F]+>|(?<![\w.])/(?:[\w.-]+/)+[\w.-]*")


def public_text(message: str, limit: int = 300) -> str:
    """A message from another component made fit for a client: object reprs and file paths removed,
    at most ``limit`` characters."""
    text = _INTERNAL_TEXT.sub("…", message).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def from_model_error(exc: model_errors.ModelServiceError, retry_after: int) -> ApiError:
    """Map a typed model-service error onto the public contract (its text scrubbed by ``public_text``)."""
    message = public_text(exc.message)
    if isinstance(exc, model_errors.PromptTooLong):
        return BadRequest(message, param="messages", code="context_length_exceeded")
    if isinstance(exc, model_errors.InvalidMedia):
        return BadRequest(message, param=exc.param, code="invalid_media")
    if isinstance(exc, model_errors.InvalidSchema):
        return BadRequest(message, param=exc.param, code="invalid_schema")
    if isinstance(exc, model_errors.InvalidValue):
        return BadRequest(message, param=exc.param, code="invalid_value")
    if isinstance(exc, model_errors.InvalidRequest):
        return BadRequest(message, param="messages", code="invalid_request")
    if isinstance(exc, model_errors.Overloaded):
        return RateLimited(f"the model service is at capacity: {message}", retry_after=retry_after)
    if isinstance(exc, model_errors.NotReady):
        return ServiceUnavailable(
            f"the model service is not ready: {message}", code="model_not_ready", retry_after=retry_after
        )
    # unauthorized (INTERNAL_TOKEN mismatch), conflict, internal: our fault, not the client's
    return InternalError("the model service failed to handle the request")


def to_api_error(exc: BaseException, retry_after: int) -> ApiError | None:
    """The typed ApiError for a known exception, or None when it is unexpected (a 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, model_errors.ModelServiceError):
        return from_model_error(exc, retry_after)
    if isinstance(exc, StoreUnavailable):
        return ServiceUnavailable(
            "the session database is unavailable", code="database_unavailable", retry_after=retry_after
        )
    return None


def error_response(error: ApiError, request_id: str | None) -> JSONResponse:
    """The error's JSON response. The ``X-Request-Id`` header is the middleware's (set once there); a 5xx
    body names the request id so a user can quote it."""
    body = error.body()
    if request_id and error.status >= 500 and request_id not in error.message:
        body["error"]["message"] = f"{error.message} (request id {request_id})"
    return JSONResponse(body, status_code=error.status, headers=error.headers())


def internal_error(request_id: str | None) -> ApiError:
    return InternalError(f"internal server error (request id {request_id})")


def error_json(error: ApiError) -> str:
    """The error as one SSE data payload, for errors after a stream started."""
    return json.dumps(error.body(), separators=(",", ":"))


def validation_error(errors: Sequence[Any], fields: frozenset[str] = frozenset()) -> BadRequest:
    """The 400 for pydantic errors: the most specific one (the deepest location: inside a union that is
    the member the input was meant for), its ``param`` in the one path style. ``fields`` are the field
    names of the validated models; other string segments of a location are union tags and are dropped."""
    if not errors:
        return BadRequest("invalid request")
    best = max(errors, key=lambda e: len(e.get("loc", ())))  # max keeps the first of equals
    where = tuple(best.get("loc", ()))
    unknown = where[-1:] if best.get("type") == "extra_forbidden" else ()  # a refused key: named too
    loc = [
        p
        for p in where[: len(where) - len(unknown)]
        if isinstance(p, int)
        or (p not in ("body", "query", "path", "header") and (not fields or p in fields))
    ] + list(unknown)
    param = param_path(loc) or None
    msg = str(best.get("msg", "invalid value")).removeprefix("Value error, ")
    return BadRequest(f"{param or 'request'}: {msg}", param=param)


def _validation_error(exc: RequestValidationError) -> BadRequest:
    return validation_error(exc.errors())


def _http_error(exc: StarletteHTTPException) -> ApiError:
    if exc.status_code == 404:
        return NotFound("unknown route")
    if exc.status_code == 405:
        return MethodNotAllowed("method not allowed for this route")
    if exc.status_code == 413:
        return PayloadTooLarge("request body too large")
    if 400 <= exc.status_code < 500:
        error = BadRequest(str(exc.detail))
        error.status = exc.status_code
        return error
    return InternalError(str(exc.detail))


def from_payload(error: dict[str, Any], retry_after: int) -> ApiError:
    """An error event's payload back into its typed error (a non-streaming reader answers its status)."""
    kind = {
        BadRequest.type: BadRequest,
        RateLimited.type: RateLimited,
        ServiceUnavailable.type: ServiceUnavailable,
    }
    cls = kind.get(str(error.get("type")), InternalError)
    code, param = error.get("code"), error.get("param")
    return cls(
        str(error.get("message", "generation failed")),
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, str) else None,
        retry_after=retry_after if cls in (RateLimited, ServiceUnavailable) else None,
    )


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def install_error_handlers(app: FastAPI, authenticate: Callable[[Request], object]) -> None:
    """``authenticate`` raises Unauthorized for a caller without a valid key: an unmatched ``/v1`` route
    answers 401 to such a caller before 404/405, as every ``/v1`` call needs the key."""
    retry_after = app.state.settings.retry_after_seconds

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(_validation_error(exc), request_id_of(request))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error = _http_error(exc)
        if error.status in (404, 405) and request.url.path.startswith("/v1/"):
            try:
                authenticate(request)
            except Unauthorized as denied:
                error = denied
        return error_response(error, request_id_of(request))

    async def on_known(request: Request, exc: Exception) -> JSONResponse:
        error = to_api_error(exc, retry_after) or internal_error(request_id_of(request))
        if error.status >= 500:
            log.warning("request failed: %s (%s)", error.message, type(exc).__name__)
        return error_response(error, request_id_of(request))

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for exc_type in (ApiError, model_errors.ModelServiceError, StoreUnavailable):
        app.add_exception_handler(exc_type, on_known)
