"""Liveness, readiness and the Prometheus page (not routed by the edge)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from services.api.deps import Hub
from services.api.errors import ServiceUnavailable, error_response, request_id_of
from services.api.store.base import SessionStore, StoreUnavailable

router = APIRouter()
READY_STORE_SECONDS = 2.0  # how long /ready waits for the database's answer


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request, hub: Hub) -> JSONResponse:
    """200 when the database answers and takes writes (``SessionStore.ping``) and at least one model replica
    is ready, else 503 with the reason.
    Both are asked at once, each fresh (no cached model status), so the answer agrees with what a request
    would meet now. A 503 here is the probe's answer, not a failed request: answered, not raised (the error
    handler would log a warning for every poll while the model loads)."""
    retry_after = hub.settings.retry_after_seconds
    reasons: list[str] = []
    probe = request.app.state.store_probe
    store_ok, (model_ok, model_reason) = await asyncio.gather(probe.ok(), hub.model.readiness())
    if not store_ok:
        reasons.append("database unavailable (unreachable or refusing writes)")
    if not model_ok:
        reasons.append(model_reason)
    if reasons:
        message = "not ready: " + "; ".join(reasons)
        error = ServiceUnavailable(message, code="not_ready", retry_after=retry_after)
        return error_response(error, request_id_of(request))
    return JSONResponse({"status": "ready"})


class StoreProbe:
    """The database's readiness for every ``/ready`` caller of this process: one ``SessionStore.ping`` at a
    time, shared by the callers that arrive while it runs (``/ready`` needs no key, and the ping takes the
    database's write lock: a flood of probes costs one ping in flight, not one each). Not cached past it."""

    def __init__(self, store: SessionStore) -> None:
        self._store = store
        self._running: asyncio.Task[bool] | None = None

    async def ok(self, within: float = READY_STORE_SECONDS) -> bool:
        """Whether the store answers and takes writes within ``within`` seconds (False on StoreUnavailable
        or past it: a probe's answer must come before a Kubernetes probe's 3 s timeout)."""
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._ping())
        try:  # shielded: a caller that leaves or times out does not cancel the others' ping
            return await asyncio.wait_for(asyncio.shield(self._running), within)
        except TimeoutError:
            return False

    async def _ping(self) -> bool:
        try:
            await self._store.ping()
        except StoreUnavailable:
            return False
        return True


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)
