"""create_app(settings): the api service's FastAPI app. Everything long-lived is built in the lifespan and
kept on ``app.state``; nothing happens at import time.

Run: ``gunicorn -c services/api/gunicorn.conf.py 'services.api.main:create_app()'`` (or ``python -m
services.api`` for a single uvicorn process).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from services.api.auth import owner_of
from services.api.errors import install_error_handlers
from services.api.media import build_media_client
from services.api.metrics import ApiMetrics
from services.api.middleware import RequestContextMiddleware
from services.api.model_client import ModelClient
from services.api.openapi import install_openapi
from services.api.routes import chat, health, models, playground, sessions
from services.api.settings import ApiSettings, load_settings
from services.api.store.base import SessionStore, StoreUnavailable
from services.api.store.factory import create_store
from services.api.store.instrumented import InstrumentedStore
from services.api.streaming.hub import SessionHub
from services.protocol.logs import configure_logging

log = logging.getLogger("api.main")


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or load_settings()
    configure_logging(settings.log_level, settings.secrets())
    app = FastAPI(
        title="Qwen3-VL OpenAI-compatible API",
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",  # the public routes, for clients and fuzzers (not routed by the edge)
    )
    app.state.settings = settings
    app.state.key_hashes = settings.key_hashes()
    app.state.metrics = ApiMetrics()
    app.state.started_at = time.time()
    install_error_handlers(app, owner_of)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=app.state.metrics,
        max_body=settings.max_request_bytes,
        retry_after=settings.retry_after_seconds,
    )
    for module in (chat, sessions, models, health, playground):
        app.include_router(module.router)
    install_openapi(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ApiSettings = app.state.settings
    if not app.state.key_hashes:
        log.warning("API_KEYS is not set: every /v1 endpoint is open to anyone who can reach this service")
    store = InstrumentedStore(_build_store(settings), app.state.metrics)
    log.info("session store: %s", describe_store(settings))
    await _open_store(store, settings)
    model = ModelClient(settings)
    limits = settings.fetch_limits()
    media_client = build_media_client(limits)
    hub = SessionHub(settings, store, model, app.state.metrics)
    hub.start()
    app.state.hub, app.state.media_client, app.state.fetch_limits = hub, media_client, limits
    app.state.store_probe = health.StoreProbe(store)
    try:
        yield
    finally:
        await hub.close()
        await model.close()
        await media_client.aclose()
        await store.close()


_HOST = re.compile(r"[A-Za-z0-9._/,\[\]:%-]{1,255}")  # names, IPs (v6 scoped or in brackets), sockets, lists
_PORT = re.compile(r"\d{0,5}(?:,\d{0,5})*")
_DBNAME = re.compile(r"[\w.$-]{1,63}")


def describe_store(settings: ApiSettings) -> str:
    """Which session store the settings choose, without credentials: ``postgres host:port/db`` (a URL or a
    ``key=value`` conninfo, read by psycopg's own parser; ``default`` where libpq picks the host or port,
    ``?`` for a value of an unexpected form), ``sqlite <path>`` or ``memory``. A URL whose password holds
    an unescaped ``/``, ``?`` or ``@`` is split wrongly by libpq, and pieces of the password would land in
    these fields: such a URL (an ``@`` after its authority, or two in it) is not described at all."""
    if settings.database_url:
        from psycopg.conninfo import conninfo_to_dict

        dsn = settings.database_url.get_secret_value()
        if "://" in dsn:
            rest = dsn.split("://", 1)[1]
            cut = re.search(r"[/?#]", rest)
            authority, tail = (rest[: cut.start()], rest[cut.start() :]) if cut else (rest, "")
            if authority.count("@") > 1 or "@" in tail:
                return "postgres (DATABASE_URL not shown: percent-encode / ? @ in its password)"
        try:
            parts = conninfo_to_dict(dsn)
        except Exception:  # psycopg says what is wrong when the store connects; never echo the value
            return "postgres (DATABASE_URL is not a valid connection string)"

        def shown(key: str, form: re.Pattern[str]) -> str:
            value = str(parts.get(key) or "")
            if not value:
                return "default" if key != "dbname" else ""
            return value if form.fullmatch(value) else "?"

        return f"postgres {shown('host', _HOST)}:{shown('port', _PORT)}/{shown('dbname', _DBNAME)}"
    if settings.persist_sessions:
        return f"sqlite {settings.sessions_db_path}"
    return "memory (PERSIST_SESSIONS=0: sessions end with the process)"


def _build_store(settings: ApiSettings) -> SessionStore:
    database_url = settings.database_url.get_secret_value() if settings.database_url else None
    if not database_url and settings.persist_sessions:
        Path(settings.sessions_db_path).parent.mkdir(parents=True, exist_ok=True)
    return create_store(
        persist=settings.persist_sessions,
        sqlite_path=settings.sessions_db_path,
        database_url=database_url,
        fail_fast_seconds=settings.store_fail_fast_seconds,
        call_timeout_seconds=settings.store_call_timeout_seconds,
    )


async def _open_store(store: SessionStore, settings: ApiSettings) -> None:
    try:
        await store.open()
    except StoreUnavailable as exc:
        if settings.database_url is None:
            raise  # a local SQLite file that cannot be opened is a configuration error
        # Postgres may come up after us: serve 503 (and /ready says why) until it answers.
        log.warning("session database unavailable at start: %s", exc)
