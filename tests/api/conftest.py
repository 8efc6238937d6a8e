"""Fixtures for the api tests: the session store under test, on every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from services.api.store.base import SessionStore

StoreMaker = Callable[[], Awaitable[SessionStore]]

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=BACKENDS)
def store_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_target(store_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """What a second store instance needs to reach the same data: a file path or a DSN."""
    if store_backend == "sqlite":
        return str(tmp_path / "sessions.db")
    if store_backend == "postgres":
        dsn: str = request.getfixturevalue("postgres_dsn")
        _truncate(dsn)
        return dsn
    return ""


@pytest.fixture
async def make_store(store_backend: str, store_target: str) -> AsyncIterator[StoreMaker]:
    """Open new store instances on the same data (memory: the same instance; it has no other)."""
    opened: list[SessionStore] = []

    async def make() -> SessionStore:
        if store_backend == "memory" and opened:
            return opened[0]
        store = new_store(store_backend, store_target)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(make_store: StoreMaker) -> SessionStore:
    return await make_store()


def new_store(backend: str, target: str) -> SessionStore:
    """A fresh, unopened store of ``backend`` (short poll interval keeps cross-process tests quick)."""
    if backend == "sqlite":
        from services.api.store.sqlite import SqliteStore

        return SqliteStore(target, poll_interval=0.02)
    if backend == "postgres":
        from services.api.store.postgres import PostgresStore

        return PostgresStore(target, max_size=4)
    from services.api.store.memory import MemoryStore

    return MemoryStore()


def _truncate(dsn: str) -> None:
    """Tests share one database per run; each starts from empty tables (created by the first open)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('sessions') IS NOT NULL").fetchone()
        if exists and exists[0]:
            conn.execute("TRUNCATE sessions, events")
