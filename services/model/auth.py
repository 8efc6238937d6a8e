"""INTERNAL_TOKEN check for every ``/internal/*`` path, before routing and body parsing.

A pure ASGI middleware rather than a dependency: an unauthenticated caller gets 401 even with a malformed
body or an unknown internal path, and learns nothing about either. The token is read from the settings the
lifespan put on ``app.state``, compared in constant time, and never logged.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from services.protocol.errors import Unauthorized

INTERNAL_PREFIX = "/internal/"


class InternalTokenMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(INTERNAL_PREFIX):
            await self.app(scope, receive, send)
            return
        expected = _expected_header(scope)
        if expected is not None and not _matches(scope, expected):
            await _reject(send)
            return
        await self.app(scope, receive, send)


def _expected_header(scope: Scope) -> bytes | None:
    settings = getattr(scope["app"].state, "settings", None)
    token = settings.internal_token if settings is not None else None
    if token is None or not token.get_secret_value():
        return None
    return b"Bearer " + token.get_secret_value().encode()


def _matches(scope: Scope, expected: bytes) -> bool:
    given = b""
    for name, value in scope["headers"]:
        if name == b"authorization":
            given = value
            break
    return hmac.compare_digest(given, expected)


async def _reject(send: Send) -> None:
    body = json.dumps(Unauthorized("missing or invalid internal token").body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": Unauthorized.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
