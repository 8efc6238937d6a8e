"""POST /v1/chat/completions: validate, create or attach to the session, then stream or collect it."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from services.api.convert import media_plan, to_media, to_messages, to_sampling, to_structure
from services.api.deps import Hub, Owner
from services.api.errors import BadRequest, request_id_of, session_not_found
from services.api.media import FetchLimits, MediaKind, resolve_media
from services.api.media_budget import MediaBudget
from services.api.openai_schemas import ChatCompletionRequest, count_error, tool_error, unsupported_params
from services.api.routes.common import bind_session, read_json, resume_point, validate, wait_disconnect
from services.api.store.base import SessionRecord
from services.api.streaming.collect import collect
from services.api.streaming.hub import NewSession, SessionHub
from services.api.streaming.sse import sse_response

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, hub: Hub, owner: Owner) -> Response:
    started = time.monotonic()
    req = validate(ChatCompletionRequest, await read_json(request))
    s = hub.settings
    too_many = count_error(req, s.max_messages, s.max_content_parts, s.max_n)
    if too_many is not None:
        raise BadRequest(too_many[0], param=too_many[1], code="too_many_items")
    param = unsupported_params(req)
    if param is not None:
        raise BadRequest(
            f"`{param}` is not supported by this server", param=param, code="unsupported_parameter"
        )
    mismatch = tool_error(req)
    if mismatch is not None:
        raise BadRequest(mismatch[0], param=mismatch[1], code="invalid_value")
    named_sid, after, resuming = resume_point(request, req.session_id)
    session_id = req.session_id or named_sid
    record = await hub.find(session_id, owner) if session_id else None
    if record is None and resuming:
        raise session_not_found(session_id or "")
    created = record is None
    if record is None:
        record, created = await _start(request, hub, req, owner, session_id or uuid.uuid4().hex, started)
    if not created:
        hub.metrics.resumes.inc()
    bind_session(request, record.id)
    if req.stream:
        return sse_response(hub, record.id, after if not created else -1, request_id_of(request))
    return await _complete(request, hub, record, created)


async def _start(
    request: Request, hub: SessionHub, req: ChatCompletionRequest, owner: str, session_id: str, started: float
) -> tuple[SessionRecord, bool]:
    """Start a generation; when another request created the session meanwhile, attach to that one."""
    client, limits = request.app.state.media_client, request.app.state.fetch_limits

    async def fetch(url: str, kind: MediaKind, capped: FetchLimits) -> bytes:
        return await resolve_media(url, kind, client, capped)

    s = hub.settings
    budget = MediaBudget(fetch, limits, s.media_max_request_bytes, s.media_fetch_concurrency)
    new = NewSession(
        session_id=session_id,
        owner=owner,
        messages=await to_messages(req.messages, budget, media_plan(req, s)),
        sampling=to_sampling(req),
        structure={**to_structure(req), "media": to_media(req)},
        tool_names=req.called_tools(),
        parallel_tool_calls=req.parallel_tool_calls is not False,
        include_usage=req.include_usage,
        stream=req.stream,
        started_at=started,
    )
    record = await hub.create(new)
    if record is None:
        return await hub.get_owned(session_id, owner), False
    return record, True


async def _complete(request: Request, hub: SessionHub, record: SessionRecord, created: bool) -> JSONResponse:
    """Collect the whole answer. A client that leaves first cancels its generation at once (the contract)
    — the one its request ``created``, and only while nobody else reads it: no client of this process
    follows it and none of another process has marked itself present since it began. A request that
    attached to an existing session leaves it to auto-cancel (someone else's generation)."""
    retry_after = hub.settings.retry_after_seconds
    collecting = asyncio.create_task(collect(hub, record.id, retry_after))
    leaving = asyncio.create_task(wait_disconnect(request))
    try:
        await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        if not collecting.done():
            collecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collecting
    if collecting.cancelled():
        if created and not await hub.read_elsewhere(record.id):
            await hub.cancel(record, "auto", wait=False)
        return JSONResponse({}, status_code=499)  # nobody reads it; keeps the access log honest
    return JSONResponse(collecting.result(), headers={"X-Session-Id": record.id})
