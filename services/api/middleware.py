"""The request context middleware (pure ASGI, so streaming responses pass through untouched):

- ``X-Request-Id`` on every response, taken from the request when it carries a sane one;
- the body limit (MAX_REQUEST_BYTES): 413 from Content-Length at once, or while a chunked body arrives;
- ``api_requests_total`` / ``api_request_duration_seconds`` by route template and one access log line;
- the last resort for unexpected exceptions: a 500 with the request id and no stack trace.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import PayloadTooLarge, error_response, internal_error, to_api_error
from services.api.metrics import ApiMetrics
from services.protocol.logs import request_id_var, session_id_var

log = logging.getLogger("api.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics, max_body: int, retry_after: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        rid_token, sid_token = request_id_var.set(request_id), session_id_var.set(None)
        outcome = _Outcome()
        started = time.perf_counter()
        try:
            await self._handle(scope, receive, send, request_id, outcome)
        finally:
            self._record(scope, outcome.status, time.perf_counter() - started)
            request_id_var.reset(rid_token)
            session_id_var.reset(sid_token)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, outcome: _Outcome
    ) -> None:
        header = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", header)]
                outcome.status = message["status"]
            await send(message)

        length = _content_length(scope)
        if length is not None and length > self.max_body:
            await self._send_error(
                scope, receive, send_with_id, PayloadTooLarge(self._too_large()), request_id
            )
            return
        try:
            await self.app(scope, self._limited(receive), send_with_id)
        except Exception as exc:
            if outcome.status is not None:
                log.exception("error after the response started")
                return
            error = to_api_error(exc, self.retry_after)
            if error is None:
                log.exception("unhandled error")
                error = internal_error(request_id)
            await self._send_error(scope, receive, send_with_id, error, request_id)

    def _limited(self, receive: Receive) -> Receive:
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise PayloadTooLarge(self._too_large())
            return message

        return limited

    def _too_large(self) -> str:
        return f"request body larger than {self.max_body} bytes"

    async def _send_error(
        self, scope: Scope, receive: Receive, send: Send, error: Any, request_id: str
    ) -> None:
        await error_response(error, request_id)(scope, receive, send)

    def _record(self, scope: Scope, status: int | None, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        code = str(status or 500)
        self.metrics.requests.labels(template, scope["method"], code).inc()
        self.metrics.request_duration.labels(template).observe(seconds)
        state = scope.get("state", {})
        log.info(
            "%s %s %s",
            scope["method"],
            template,
            code,
            extra={
                "method": scope["method"],
                "path": scope.get("path", ""),
                "status": int(code),
                "duration_ms": round(seconds * 1000, 1),
                "session_id": state.get("session_id"),
            },
        )


class _Outcome:
    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status: int | None = None


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1").strip()
            if _SANE_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
