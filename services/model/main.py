"""The model service's app factory: settings, metrics, registry and engine are built in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from services.model.auth import InternalTokenMiddleware
from services.model.generations import GenerationRegistry
from services.model.http_errors import install_error_handlers
from services.model.lifecycle import EngineFactory, GiveUpHook, ModelService, build_engine
from services.model.metrics import ModelMetrics
from services.model.routes import router
from services.model.settings import ModelSettings

log = logging.getLogger(__name__)


def create_app(
    settings: ModelSettings | None = None,
    engine_factory: EngineFactory | None = None,
    on_give_up: GiveUpHook | None = None,
) -> FastAPI:
    """``settings`` None: read the environment at startup (a bad value stops the service, naming it).
    ``engine_factory`` None: ENGINE decides (tests pass their own to control loading).
    ``on_give_up(reason)``: called on the loop once the engine cannot be healed (``__main__`` exits)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings if settings is not None else ModelSettings()
        metrics = ModelMetrics()
        registry = GenerationRegistry(
            asyncio.get_running_loop(),
            metrics,
            resolved.finished_retention_seconds,
            stream_interval_seconds=resolved.stream_interval_ms / 1000,
            retention_bytes=resolved.finished_retention_bytes,
        )
        service = ModelService(resolved, metrics, registry, engine_factory or build_engine, on_give_up)
        app.state.settings = resolved
        app.state.service = service
        if resolved.internal_token is None:
            log.warning("INTERNAL_TOKEN is not set: the internal API is open to anyone who can reach it")
        service.start_loading()
        sweeper = asyncio.create_task(registry.run_sweeper(), name="retention-sweeper")
        try:
            yield
        finally:
            await service.close()
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    app = FastAPI(title="model service", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(InternalTokenMiddleware)
    install_error_handlers(app)
    app.include_router(router)
    return app
