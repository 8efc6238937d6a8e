"""Pick the session store from the settings (called once, in the api lifespan; open() is the caller's)."""

from __future__ import annotations

from services.api.store.base import SessionStore


def create_store(
    *,
    persist: bool,
    sqlite_path: str,
    database_url: str | None,
    fail_fast_seconds: float = 1.0,
    call_timeout_seconds: float = 5.0,
) -> SessionStore:
    """Postgres when ``database_url`` is set (it wins), else SQLite at ``sqlite_path``, or memory when
    ``persist`` is false. ``fail_fast_seconds``: how long a Postgres call waits for a connection and an
    answer while the database is failing; ``call_timeout_seconds``: how long it waits for an answer
    otherwise. Backends are imported here so an unused driver is never loaded."""
    if database_url:
        from services.api.store.postgres import PostgresStore

        return PostgresStore(
            database_url, fail_fast_timeout=fail_fast_seconds, call_timeout=call_timeout_seconds
        )
    if not persist:
        from services.api.store.memory import MemoryStore

        return MemoryStore()
    from services.api.store.sqlite import SqliteStore

    return SqliteStore(sqlite_path)
