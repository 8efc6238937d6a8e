"""Liveness, readiness and the Prometheus page (not routed by the edge)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from services.api.deps import Hub
from services.api.errors import ServiceUnavailable
from services.api.store.base import StoreUnavailable

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(hub: Hub) -> JSONResponse:
    """200 when the database answers and at least one model replica is ready, else 503 with the reason."""
    retry_after = hub.settings.retry_after_seconds
    reasons: list[str] = []
    try:
        await hub.store.ping()
    except StoreUnavailable:
        reasons.append("database unreachable")
    model_ok, model_reason = await hub.model.readiness()
    if not model_ok:
        reasons.append(model_reason)
    if reasons:
        message = "not ready: " + "; ".join(reasons)
        raise ServiceUnavailable(message, code="not_ready", retry_after=retry_after)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)
