"""Request helpers shared by the routes: JSON bodies, resume points, client disconnects."""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from services.api.errors import BadRequest
from services.api.logs import session_id_var
from services.api.streaming.replay import LastEventIdError, parse_last_event_id

M = TypeVar("M", bound=BaseModel)


# Bodies above this are parsed in a worker thread: a request carrying a video as a data URL must not stall
# the event loop (and every other stream this process serves) while its JSON is decoded.
OFFLOAD_BYTES = 1024 * 1024


async def read_json(request: Request) -> Any:
    body = await request.body()
    try:
        if len(body) > OFFLOAD_BYTES:
            return await asyncio.to_thread(json.loads, body)
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("malformed JSON in the request body", code="invalid_json") from None


def validate(model: type[M], data: Any) -> M:
    """Validate a body; the 400 names the first offending parameter."""
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise BadRequest(f"{param or 'body'}: {first['msg']}", param=param) from None


def resume_point(request: Request, session_id: str | None) -> tuple[str | None, int, bool]:
    """(session id named by Last-Event-ID, index to resume after, whether a resume point was given).
    The header wins over ``?last_event_id=`` (a browser's EventSource sends the header on reconnect)."""
    value = request.headers.get("last-event-id")
    if value is None:
        value = request.query_params.get("last_event_id")
    try:
        sid, after = parse_last_event_id(value, session_id)
    except LastEventIdError as exc:
        raise BadRequest(str(exc), param="Last-Event-ID") from None
    return sid, after, bool(value and value.strip())


async def wait_disconnect(request: Request) -> None:
    """Return when the client goes away (after its body was read, uvicorn reports only that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def bind_session(request: Request, session_id: str) -> None:
    """Name the session in this request's access line and in every log line from here on."""
    request.state.session_id = session_id
    session_id_var.set(session_id)
