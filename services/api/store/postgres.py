"""Postgres SessionStore (DATABASE_URL): shared by every api replica and worker process.

Concurrency design:
- A psycopg 3 AsyncConnectionPool in autocommit mode: every call is one statement, hence one transaction and
  (with psycopg's automatic prepared statements) one round trip.
- append() is a single statement: a CTE updates the session only ``WHERE last_index = first - 1`` (so two
  runners can never both extend a session; the loser gets AppendConflict), inserts the batch with unnest()
  and calls pg_notify(). Events, the session row and the notification commit together, so a reader either
  sees the whole batch with its new last_index or none of it.
- wait(): one LISTEN connection per store, read by a background task that wakes the asyncio waiters of the
  notified session; appends through this store also wake local waiters directly. No polling.
- claim() is one conditional UPDATE: concurrent claims serialise on the row lock and the loser re-checks the
  condition against the winner's lease.
- The schema is created/migrated at open() under a transaction-scoped advisory lock, so replicas starting
  together do not race on CREATE TABLE.

Outages: after a failed call the store is "failing" until a call succeeds; meanwhile calls wait at most
``fail_fast_timeout`` for a connection (503 within ~1 s instead of the pool timeout). The pool's own
reconnection backs off to many seconds, so while failing the store probes the server itself (one direct
connection at most every ``_PROBE_INTERVAL``) and, once it answers, swaps in a fresh pool: service resumes
within about a second of the server's return. A store that could not connect at start (re)connects on the
first call that needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from services.api.store.base import (
    FINAL_STATUSES,
    AppendConflict,
    SessionExists,
    SessionRecord,
    StoredEvent,
    StoreUnavailable,
)
from services.api.store.common import (
    COLUMNS,
    JSON_COLUMNS,
    Waiters,
    check_batch,
    check_status,
    check_update_fields,
    record_from_row,
    wait_event,
    with_updated,
)

log = logging.getLogger(__name__)

CHANNEL = "qvl_session_events"
POOL_APP_NAME = "qvl-session-store"
LISTEN_APP_NAME = "qvl-session-store-listen"
_MIGRATION_LOCK = 0x71766C5F73746F72  # arbitrary advisory-lock key owned by this schema
_DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
_FINAL = sorted(FINAL_STATUSES)
_PROBE_INTERVAL = 0.5  # seconds between reconnection attempts while failing

# Each entry: (version, statements), applied once, in order, in one transaction.
# No index on sessions.updated: every append changes it, and an index would turn those frequent updates into
# non-HOT ones; delete_expired's occasional sequential scan of a TTL-bounded table is cheaper.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE IF NOT EXISTS sessions (
                id text PRIMARY KEY,
                owner text NOT NULL,
                status text NOT NULL,
                created double precision NOT NULL,
                updated double precision NOT NULL,
                last_index integer NOT NULL DEFAULT -1,
                finish_reason text,
                usage jsonb,
                model_url text,
                model_request_id text,
                model_seq integer NOT NULL DEFAULT -1,
                runner_id text,
                lease_until double precision NOT NULL DEFAULT 0,
                reader_seen_at double precision NOT NULL DEFAULT 0,
                meta jsonb NOT NULL DEFAULT '{}'
            ) WITH (fillfactor = 80)""",
            """CREATE TABLE IF NOT EXISTS events (
                session_id text NOT NULL,
                idx integer NOT NULL,
                data text NOT NULL,
                PRIMARY KEY (session_id, idx)
            )""",
        ),
    ),
    (
        2,
        (
            # orphans(): unfinished sessions by lease end. Partial, so finished sessions (nearly all rows)
            # are not in it; only claims (every lease/3 per running session) touch its column.
            """CREATE INDEX IF NOT EXISTS sessions_unfinished_lease ON sessions (lease_until)
               WHERE status IN ('queued', 'running')""",
        ),
    ),
)

_APPEND_SQL = """
WITH s AS (
    UPDATE sessions SET last_index = last_index + %(n)s, model_seq = %(model_seq)s, updated = %(now)s,
        status = coalesce(%(status)s, status), finish_reason = coalesce(%(finish_reason)s, finish_reason),
        usage = coalesce(%(usage)s, usage)
    WHERE id = %(id)s AND (%(n)s = 0 OR last_index = %(prev)s)
      AND (%(runner)s::text IS NULL OR runner_id = %(runner)s::text)
    RETURNING id
), ins AS (
    INSERT INTO events (session_id, idx, data)
    SELECT s.id, e.idx, e.data
    FROM s CROSS JOIN unnest(%(idxs)s::integer[], %(datas)s::text[]) AS e(idx, data)
)
SELECT pg_notify(%(channel)s, s.id) FROM s
"""

# Column names are the SessionRecord field names: plain lower-case identifiers, never user input.
_INSERT_SQL = f"INSERT INTO sessions ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
_SELECT_SQL = f"SELECT {', '.join(COLUMNS)} FROM sessions WHERE id = %s"

_CLAIM_SQL = """
UPDATE sessions SET runner_id = %(runner)s, lease_until = %(until)s
WHERE id = %(id)s AND status <> ALL(%(final)s)
  AND (runner_id IS NULL OR runner_id = %(runner)s OR lease_until < %(now)s OR runner_id = %(dead)s::text)
"""

_RELEASE_SQL = "UPDATE sessions SET runner_id = NULL, lease_until = 0 WHERE id = %s AND runner_id = %s"
_ORPHANS_SQL = f"""
SELECT {", ".join(COLUMNS)} FROM sessions
WHERE status IN ('queued', 'running') AND lease_until < %s ORDER BY lease_until LIMIT %s
"""

_DELETE_EXPIRED_SQL = """
WITH gone AS (
    DELETE FROM sessions WHERE status = ANY(%(final)s) AND updated < %(cutoff)s RETURNING id
), ev AS (
    DELETE FROM events WHERE session_id IN (SELECT id FROM gone)
)
SELECT count(*) FROM gone
"""


class PostgresStore:
    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        connect_timeout: float = 5.0,
        pool_timeout: float = 5.0,
        fail_fast_timeout: float = 1.0,
    ) -> None:
        self._url = url
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self._fail_fast = fail_fast_timeout
        self._pool: AsyncConnectionPool | None = None
        self._listener: asyncio.Task[None] | None = None
        self._setup_lock = asyncio.Lock()
        self._waiters = Waiters()
        self._failing = False  # the last call failed: wait at most fail_fast_timeout for a connection
        self._probe_at = -1e9  # monotonic time of the last reconnection attempt
        self._reviving: asyncio.Task[None] | None = None
        self._closed = False  # close() was called: no call reconnects

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, migrate, start listening. Raises StoreUnavailable when the server cannot be reached;
        the store stays usable: a later ping() retries the whole setup (readiness recovers by itself)."""
        async with self._setup_lock:
            self._closed = False
            if self._pool is None:
                await self._setup()

    async def close(self) -> None:
        async with self._setup_lock:  # an open() in flight finishes first, so nothing it makes leaks
            self._closed = True
            await self._close()

    async def _close(self) -> None:
        if self._reviving is not None:
            self._reviving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reviving
            self._reviving = None
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        self._waiters.notify_all()

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.execute("SELECT 1")

    # ---- protocol --------------------------------------------------------------------------------------

    async def create(self, record: SessionRecord) -> None:
        check_status(record.status)
        values = [_param(name, getattr(record, name)) for name in COLUMNS]
        async with self._connection() as conn:
            try:
                await conn.execute(_INSERT_SQL, values)
            except psycopg.errors.UniqueViolation as exc:
                raise SessionExists(record.id) from exc

    async def get(self, session_id: str) -> SessionRecord | None:
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(_SELECT_SQL, (session_id,))
            row = await cursor.fetchone()
        return None if row is None else record_from_row(row, decode_json=False)

    async def append(
        self,
        session_id: str,
        events: Sequence[StoredEvent],
        *,
        model_seq: int,
        status: str | None = None,
        finish_reason: str | None = None,
        usage: dict[str, Any] | None = None,
        now: float,
        runner_id: str | None = None,
    ) -> None:
        check_status(status)
        prev = events[0].index - 1 if events else -1
        check_batch(session_id, events, prev)  # the batch itself is consecutive; the database checks prev
        params = {
            "id": session_id,
            "n": len(events),
            "prev": prev,
            "idxs": [e.index for e in events],
            "datas": [e.data for e in events],
            "model_seq": model_seq,
            "now": now,
            "status": status,
            "finish_reason": finish_reason,
            "usage": None if usage is None else Jsonb(usage),
            "channel": CHANNEL,
            "runner": runner_id,
        }
        async with self._connection() as conn:
            cursor = await conn.execute(_APPEND_SQL, params)
            matched = await cursor.fetchone()
        if matched is None:
            raise AppendConflict(
                f"session {session_id} is missing, its last_index is not {prev}, or another runner holds it"
            )
        self._waiters.notify(session_id)

    async def update(self, session_id: str, *, now: float, **fields: Any) -> None:
        check_update_fields(fields)
        columns = with_updated(fields, now)
        if not columns:
            return
        assignments = [sql.SQL("{} = %s").format(sql.Identifier(name)) for name in columns]
        query = sql.SQL("UPDATE sessions SET {} WHERE id = %s").format(sql.SQL(", ").join(assignments))
        values = [*(_param(name, value) for name, value in columns.items()), session_id]
        if "status" in fields:
            # Readers wait on status changes too (a cancel, a failure without a final event).
            query = sql.SQL("WITH u AS ({} RETURNING id) SELECT pg_notify(%s, u.id) FROM u").format(query)
            values.append(CHANNEL)
        async with self._connection() as conn:
            await conn.execute(query, values)
        if "status" in fields:
            self._waiters.notify(session_id)

    async def read(self, session_id: str, after: int, limit: int = 1000) -> list[StoredEvent]:
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT idx, data FROM events WHERE session_id = %s AND idx > %s ORDER BY idx LIMIT %s",
                (session_id, after, limit),
            )
            rows = await cursor.fetchall()
        return [StoredEvent(idx, data) for idx, data in rows]

    async def wait(self, session_id: str, after: int, timeout: float) -> None:  # noqa: ASYNC109
        # Register first, then look: a notification arriving in between still wakes us.
        with self._waiters.register(session_id, after) as waiter:
            async with self._connection() as conn:
                cursor = await conn.execute("SELECT last_index FROM sessions WHERE id = %s", (session_id,))
                row = await cursor.fetchone()
            if row is None or row[0] > after:
                return
            await wait_event(waiter.event, timeout)

    async def claim(
        self,
        session_id: str,
        runner_id: str,
        lease_seconds: float,
        now: float,
        *,
        takeover_from: str | None = None,
    ) -> bool:
        params = {
            "id": session_id,
            "runner": runner_id,
            "until": now + lease_seconds,
            "now": now,
            "final": _FINAL,
            "dead": takeover_from,
        }
        async with self._connection() as conn:
            cursor = await conn.execute(_CLAIM_SQL, params)
            return cursor.rowcount == 1

    async def release(self, session_id: str, runner_id: str) -> bool:
        async with self._connection() as conn:
            cursor = await conn.execute(_RELEASE_SQL, (session_id, runner_id))
            return cursor.rowcount == 1

    async def orphans(self, lapsed_before: float, limit: int) -> list[SessionRecord]:
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(_ORPHANS_SQL, (lapsed_before, max(limit, 0)))
            rows = await cursor.fetchall()
        return [record_from_row(row, decode_json=False) for row in rows]

    async def delete_expired(self, now: float, ttl_seconds: float) -> int:
        async with self._connection() as conn:
            cursor = await conn.execute(_DELETE_EXPIRED_SQL, {"final": _FINAL, "cutoff": now - ttl_seconds})
            row = await cursor.fetchone()
        count = int(row[0]) if row else 0
        if count:
            self._waiters.notify_all()  # waiters of a deleted session must not sleep to their timeout
        return count

    # ---- plumbing --------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        pool = self._pool or await self._reconnect()
        timeout = self._fail_fast if self._failing else self._pool_timeout
        try:
            async with pool.connection(timeout=timeout) as conn:
                yield conn
        except _DB_ERRORS as exc:  # includes the pool's PoolTimeout and PoolClosed
            self._failing = True
            if isinstance(exc, PoolTimeout):
                self._revive()
            elif not isinstance(exc, PoolClosed):
                # A dead connection usually means a server restart: drop the pool's other dead idle
                # connections now, so one request answers 503 instead of one per pooled connection.
                with contextlib.suppress(Exception):
                    await pool.check()
            raise StoreUnavailable(f"Postgres session store: {_first_line(exc)}") from exc
        self._failing = False

    async def _reconnect(self) -> AsyncConnectionPool:
        """No pool (the server was down at start): set up now, at most once per _PROBE_INTERVAL and within
        the fail-fast timeout. Raises StoreUnavailable."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise StoreUnavailable("the Postgres session store is closed")
        if loop.time() - self._probe_at < _PROBE_INTERVAL or self._setup_lock.locked():
            raise StoreUnavailable("the Postgres session store is not connected")
        self._probe_at = loop.time()
        try:
            async with asyncio.timeout(max(self._fail_fast, 1.0)):
                await self.open()
        except TimeoutError:
            raise StoreUnavailable("the Postgres session store is not connected (timeout)") from None
        if self._pool is None:
            raise StoreUnavailable("the Postgres session store is not connected")
        return self._pool

    def _revive(self) -> None:
        """The pool has no connection for us: probe the server in the background (rate limited) and, once it
        answers, replace the pool, whose own reconnection may be backing off for many seconds."""
        loop = asyncio.get_running_loop()
        if self._reviving is not None and not self._reviving.done():
            return
        if loop.time() - self._probe_at < _PROBE_INTERVAL:
            return
        self._probe_at = loop.time()
        self._reviving = asyncio.create_task(self._replace_pool(), name="session-store-revive")

    async def _replace_pool(self) -> None:
        try:
            async with asyncio.timeout(max(self._fail_fast, 1.0)):
                probe = await self._connect()
            await probe.close()
        except (StoreUnavailable, TimeoutError) as exc:
            log.info("session store still unreachable: %s", _first_line(exc))
            return
        fresh = self._new_pool()
        try:
            await fresh.open(wait=True, timeout=self._connect_timeout)
        except BaseException as exc:
            await fresh.close()
            if isinstance(exc, _DB_ERRORS):
                return
            raise
        if self._pool is None:  # closed meanwhile
            await fresh.close()
            return
        old, self._pool = self._pool, fresh  # one step on the loop: callers see the old or the new pool
        log.warning("session store reachable again: connection pool replaced")
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close(timeout=1.0)

    def _new_pool(self) -> AsyncConnectionPool:
        return AsyncConnectionPool(
            self._url,
            min_size=self._min_size,
            max_size=self._max_size,
            timeout=self._pool_timeout,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, round(self._connect_timeout)),
                "application_name": POOL_APP_NAME,
            },
            open=False,
            name="session-store",
        )

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        """The migration/LISTEN connection (named, so operators can tell it from the pool's)."""
        try:
            return await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=max(1, round(self._connect_timeout)),
                application_name=LISTEN_APP_NAME,
            )
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"Postgres session store: {_first_line(exc)}") from exc

    async def _setup(self) -> None:
        listen_conn = await self._connect()
        try:
            await _migrate(listen_conn)
            await listen_conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
            pool = self._new_pool()
            await pool.open(wait=True, timeout=self._connect_timeout)
        except BaseException as exc:
            await listen_conn.close()
            if isinstance(exc, _DB_ERRORS):
                raise StoreUnavailable(f"Postgres session store: {_first_line(exc)}") from exc
            raise
        self._pool = pool
        self._listener = asyncio.create_task(self._listen_loop(listen_conn), name="session-store-listener")

    async def _listen_loop(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        """Dispatch NOTIFYs to waiters; reconnect with backoff when the connection drops."""
        delay = 0.1
        try:
            while True:
                try:
                    if conn is None:
                        conn = await self._connect()
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                        self._waiters.notify_all()  # notifications may have been missed meanwhile
                        delay = 0.1
                    async for note in conn.notifies():
                        self._waiters.notify(note.payload)
                except Exception as exc:  # never die: cross-process wake-ups depend on this task
                    level = logging.WARNING if delay <= 0.1 else logging.DEBUG  # once per outage
                    log.log(level, "session store LISTEN connection lost (%s); retrying", _first_line(exc))
                    if conn is not None:
                        await conn.close()
                    conn = None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)  # one attempt a second at most: wake-ups resume soon
        finally:
            if conn is not None:
                await conn.close()


async def _migrate(conn: psycopg.AsyncConnection[Any]) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")
        row = await cursor.fetchone()
        current = int(row[0]) if row else 0
        latest = MIGRATIONS[-1][0]
        if current > latest:
            raise RuntimeError(f"sessions database schema v{current} is newer than this code (v{latest})")
        for version, statements in MIGRATIONS:
            if version > current:
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))


def _param(name: str, value: Any) -> Any:
    return Jsonb(value) if name in JSON_COLUMNS and value is not None else value


def _first_line(exc: BaseException) -> str:
    """Driver messages can span lines (hints, context); one line is enough for logs and 503 bodies."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
