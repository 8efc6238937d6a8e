"""Session endpoints: status, the EventSource-friendly event stream, and cancel."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from starlette.responses import StreamingResponse

from services.api.deps import Hub, Owner
from services.api.errors import request_id_of, session_not_found
from services.api.openai_schemas import CancelResponse, SessionStatus
from services.api.routes.common import bind_session, resume_point
from services.api.settings import SESSION_ID_PATTERN
from services.api.store.base import SessionRecord
from services.api.streaming.hub import SessionHub
from services.api.streaming.sse import sse_response

router = APIRouter()
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


async def _owned(hub: SessionHub, session_id: str, owner: str, request: Request) -> SessionRecord:
    # A malformed id cannot name a session: same 404 as an unknown one.
    if not _SESSION_ID.fullmatch(session_id):
        raise session_not_found(session_id[:128])
    record = await hub.get_owned(session_id, owner)
    bind_session(request, record.id)
    return record


@router.get("/v1/sessions/{session_id}")
async def session_status(session_id: str, request: Request, hub: Hub, owner: Owner) -> SessionStatus:
    record = await _owned(hub, session_id, owner, request)
    return SessionStatus(
        id=record.id,
        status=record.status,  # type: ignore[arg-type]
        created=int(record.created),
        updated=int(record.updated),
        last_index=record.last_index,
        finish_reason=record.finish_reason,
        usage=record.usage,
    )


@router.get("/v1/sessions/{session_id}/events")
async def session_events(session_id: str, request: Request, hub: Hub, owner: Owner) -> StreamingResponse:
    record = await _owned(hub, session_id, owner, request)
    _sid, after, _given = resume_point(request, record.id)
    hub.metrics.resumes.inc()
    return sse_response(hub, record.id, after, request_id_of(request))


@router.post("/v1/cancel/{session_id}")
async def cancel_session(session_id: str, request: Request, hub: Hub, owner: Owner) -> CancelResponse:
    record = await _owned(hub, session_id, owner, request)
    status = await hub.cancel(record, "manual")
    return CancelResponse(session_id=record.id, status=status)  # type: ignore[arg-type]
