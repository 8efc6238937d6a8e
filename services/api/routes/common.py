"""Request helpers shared by the routes: JSON bodies, resume points, client disconnects."""

from __future__ import annotations

import asyncio
import functools
import typing
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from services.api.errors import BadRequest, validation_error
from services.api.json_body import parse_json_body
from services.api.streaming.replay import LastEventIdError, parse_last_event_id
from services.protocol.logs import session_id_var

M = TypeVar("M", bound=BaseModel)


# Bodies above this are parsed in a worker thread: a request carrying a video as a data URL must not stall
# the event loop (and every other stream this process serves) while its JSON is decoded.
OFFLOAD_BYTES = 1024 * 1024


async def read_json(request: Request) -> Any:
    """The request's JSON body, decoded and checked by ``parse_json_body`` (raises its ``BadRequest``)."""
    body = await request.body()
    if len(body) > OFFLOAD_BYTES:
        return await asyncio.to_thread(parse_json_body, body)
    return parse_json_body(body)


def validate(model: type[M], data: Any) -> M:
    """Validate a body; the 400 names the offending parameter in the ``messages[0].content[1].type`` style."""
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(), _field_names(model)) from None


@functools.cache
def _field_names(model: type[BaseModel]) -> frozenset[str]:
    """Field names (and aliases) of ``model`` and every model nested in its fields' types."""
    names: set[str] = set()
    seen: set[type[BaseModel]] = set()
    todo: list[Any] = [model]
    while todo:
        tp = todo.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                continue
            seen.add(tp)
            for name, info in tp.model_fields.items():
                names.update(n for n in (name, info.alias) if n)
                todo.append(info.annotation)
        else:
            todo.extend(typing.get_args(tp))
    return frozenset(names)


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
