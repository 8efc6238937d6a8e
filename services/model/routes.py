"""The model service's HTTP API (paths in services/protocol/paths.py).

Generate streams a generation's events as NDJSON. The stream is only a reader of the registry: when the
caller goes away the generation keeps running and can be re-attached with ``events?after=N``; only
``cancel`` stops it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from services.model.deps import RegistryDep, ServiceDep
from services.model.generations import Generation
from services.model.lifecycle import ModelService
from services.protocol import paths
from services.protocol.codec import MEDIA_TYPE, encode_event
from services.protocol.errors import NotReady, Overloaded
from services.protocol.generate import GenerateRequest
from services.protocol.paths import CancelResult, LoadInfo

# How long cancel waits for the engine to confirm (one decode step, or a prefill in progress).
CANCEL_CONFIRM_SECONDS = 5.0
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

router = APIRouter()


@router.post(paths.GENERATE)
async def generate(body: GenerateRequest, service: ServiceDep) -> StreamingResponse:
    generation = await _admit(service, body)
    return _stream(generation, after=-1, interval=service.registry.stream_interval)


@router.get(paths.EVENTS)
async def events(
    request_id: str, registry: RegistryDep, after: Annotated[int, Query(ge=-1)] = -1
) -> StreamingResponse:
    return _stream(registry.get(request_id), after=after, interval=registry.stream_interval)


@router.post(paths.CANCEL)
async def cancel(request_id: str, service: ServiceDep) -> CancelResult:
    generation = service.registry.get(request_id)
    engine = service.engine()
    if generation.finished is None and engine is not None and engine.cancel(request_id):
        service.metrics.cancellations.inc()
    # Either we just cancelled it or its FinalOutput is on its way: answer with how it really ended.
    finished = generation.finished or await generation.wait_finished(CANCEL_CONFIRM_SECONDS)
    ended_otherwise = finished is not None and finished.finish_reason != "cancelled"
    return CancelResult(request_id=request_id, status="finished" if ended_otherwise else "cancelled")


@router.get(paths.STATUS)
async def status(service: ServiceDep) -> LoadInfo:
    stats = service.stats()
    return LoadInfo(
        ready=service.ready,
        model=service.settings.model_repo_id,
        running=stats.running,
        queued=stats.queued,
        max_batch_size=service.settings.max_batch_size,
        max_queue=service.settings.max_queue,
    )


@router.get("/health")
async def health(service: ServiceDep) -> JSONResponse:
    """Liveness: 200 while the process can serve or heal itself (loading, restarting its engine); 503 once
    the engine could not be healed within ENGINE_MAX_RESTARTS, so that the orchestrator restarts us."""
    if service.live:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "failed", **NotReady(service.reason).body()}, status_code=NotReady.status)


@router.get("/ready")
async def ready(service: ServiceDep) -> JSONResponse:
    if service.ready:
        return JSONResponse({"status": "ready", "model": service.settings.model_repo_id})
    body = {"status": service.state, **NotReady(service.reason).body()}
    return JSONResponse(body, status_code=NotReady.status)


@router.get("/metrics")
async def metrics(service: ServiceDep) -> Response:
    def queue_and_running() -> tuple[int, int]:
        stats = service.stats()
        return stats.queued, stats.running

    service.metrics.ready.set(1 if service.ready else 0)  # mirrors the state (an engine process may die)
    return Response(service.metrics.render(queue_and_running), media_type=CONTENT_TYPE_LATEST)


async def _admit(service: ModelService, body: GenerateRequest) -> Generation:
    """Admit into the engine; a refusal for capacity or readiness counts as outcome "rejected".

    The generation exists before the engine is asked (its outputs may arrive before ``admit`` returns, from
    an engine process) and is discarded when the engine refuses."""
    try:
        engine = service.admitting_engine()
        generation = service.registry.create(body.request_id, prompt_tokens=0)
        try:
            admitted = await engine.admit(body)
        except BaseException:
            service.registry.discard(body.request_id)
            raise
    except (Overloaded, NotReady):
        service.metrics.requests.labels("rejected").inc()
        raise
    service.registry.admitted(generation, admitted.prompt_tokens)
    service.metrics.prompt_tokens.inc(admitted.prompt_tokens)
    return generation


def _stream(generation: Generation, after: int, interval: float) -> StreamingResponse:
    async def frames() -> AsyncIterator[bytes]:
        # Everything already there goes out in one write; then one write per engine step, or per
        # STREAM_INTERVAL_MS when steps come faster (the first and the last event are never held back).
        async for ready in generation.follow(after, interval):
            yield b"".join(encode_event(event) for event in ready)

    return StreamingResponse(frames(), media_type=MEDIA_TYPE, headers=STREAM_HEADERS)
