"""SSE framing: ``id: <sid>:<index>`` on every stored event, ``: ping`` while idle, and the response.

Stored chunk strings are sent as they are (no parse, no re-encode). An error that interrupts the sending
(say the database went away) becomes one ``data: {"error":...}`` event and ``[DONE]``; these two carry no
id because they are not part of the session, so the client's Last-Event-ID stays resumable. A reader that
resumes at or past the end of a finished session gets a bare ``data: [DONE]`` (no id), so that every stream
ends with ``[DONE]`` and a client that reconnects after the end stops instead of reconnecting forever.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse

from services.api.errors import ApiError, error_json, internal_error, to_api_error
from services.api.store.base import StoredEvent
from services.api.streaming.hub import SessionHub
from services.api.streaming.replay import follow
from services.api.streaming.translate import DONE

log = logging.getLogger("api.sse")

PING = b": ping\n\n"
DONE_ONLY = f"data: {DONE}\n\n".encode()


def frame(session_id: str, event: StoredEvent) -> bytes:
    return f"id: {session_id}:{event.index}\ndata: {event.data}\n\n".encode()


def sse_headers(session_id: str) -> dict[str, str]:
    return {
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        "X-Session-Id": session_id,
    }


async def event_stream(
    hub: SessionHub, session_id: str, after: int, request_id: str | None
) -> AsyncIterator[bytes]:
    hub.metrics.active_streams.inc()
    done = False
    try:
        async for event in follow(hub, session_id, after):
            yield PING if event is None else frame(session_id, event)
            done = event is not None and event.data == DONE
        if not done:
            yield DONE_ONLY
    except Exception as exc:
        error = to_api_error(exc, hub.settings.retry_after_seconds) or internal_error(request_id)
        if error.status >= 500 and not isinstance(exc, ApiError):
            log.warning("stream of session %s interrupted: %s", session_id, type(exc).__name__)
        yield f"data: {error_json(error)}\n\ndata: {DONE}\n\n".encode()
    finally:
        hub.metrics.active_streams.dec()


def sse_response(hub: SessionHub, session_id: str, after: int, request_id: str | None) -> StreamingResponse:
    return StreamingResponse(
        event_stream(hub, session_id, after, request_id),
        media_type="text/event-stream",
        headers=sse_headers(session_id),
    )
