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

Outages: every call gets its answer within ``call_timeout`` (STORE_CALL_TIMEOUT_SECONDS) or raises
StoreUnavailable: a stalled server (packets held, sockets open) cannot hang a caller; the given-up query is
cancelled in the background (``pg_conn.Abandoned``). libpq keepalives and ``tcp_user_timeout`` turn a
vanished peer into an error, and the server's ``statement_timeout`` ends statements nobody waits for. After
a connection-level failure (a dead connection, a missed deadline, a failed probe) the store is "failing"
until a call succeeds; meanwhile calls wait at most ``fail_fast_timeout`` for a connection and for the
answer (503 within ~1 s). A pool timeout alone is not an outage (a saturated pool under load): it starts a
probe, and only a failed probe makes the store failing. The pool's own reconnection backs off to many
seconds, so while failing the store probes the server itself (one direct connection at most every
``_PROBE_INTERVAL``) and, once it answers, swaps in a fresh pool: service resumes within about a second of
the server's return. A store that could not connect at start (re)connects on the first call that needs it.
The LISTEN connection is checked with a trivial query after ``_LISTEN_CHECK_SECONDS`` without a
notification and replaced when it does not answer within the call timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from services.api.store.base import (
    FINAL_STATUSES,
    AppendBatch,
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
from services.api.store.pg_conn import Abandoned, connection_kwargs, within_deadline

log = logging.getLogger(__name__)

CHANNEL = "qvl_session_events"
POOL_APP_NAME = "qvl-session-store"
LISTEN_APP_NAME = "qvl-session-store-listen"
_MIGRATION_LOCK = 0x71766C5F73746F72  # arbitrary advisory-lock key owned by this schema
_DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
# a server that answers but takes no writes (a standby, default_transaction_read_only, a role without rights)
_REFUSED_WRITES = (psycopg.errors.ReadOnlySqlTransaction, psycopg.errors.InsufficientPrivilege)
_FINAL = sorted(FINAL_STATUSES)
_PROBE_INTERVAL = 0.5  # seconds between reconnection attempts while failing
_LISTEN_CHECK_SECONDS = 5.0  # a LISTEN connection quiet this long is asked a trivial query
_Conn = psycopg.AsyncConnection[Any]
T = TypeVar("T")

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

_PING_SQL = """
WITH s AS (UPDATE sessions SET updated = updated WHERE false RETURNING 1)
DELETE FROM events WHERE false
"""

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
        call_timeout: float = 5.0,
    ) -> None:
        """``url``: a libpq URL. Seconds: ``connect_timeout`` (a new connection), ``pool_timeout`` (the wait
        for a pooled connection), ``fail_fast_timeout`` (that wait, and the answer, while failing),
        ``call_timeout`` (the answer to one call; also the server-side statement_timeout)."""
        self._url = url
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self._fail_fast = fail_fast_timeout
        self._call_timeout = call_timeout
        self._abandoned = Abandoned()  # calls given up at their deadline, finishing in the background
        self._replacements = 0
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
        await self._abandoned.drain(within=2.0)
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        self._waiters.notify_all()

    async def ping(self) -> None:
        """Readiness: the server answers and takes writes. One statement updates and deletes no row of
        ``sessions`` and ``events``: it takes both tables' write locks, waiting at most half the call timeout
        and 1 s at most (``lock_timeout``) for a lock held against writers, and fails on a read-only server
        (``default_transaction_read_only``, a standby) or without the privileges; it writes nothing. A lock
        or a refusal is an answer: the store does not switch to failing for it (only a missed deadline or a
        lost connection does, as for any call). Raises StoreUnavailable."""
        lock_ms = max(1, int(min(self._call_timeout / 2, 1.0) * 1000))

        async def op(conn: _Conn) -> None:
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = {lock_ms}")
                    await conn.execute(_PING_SQL)
            except (*_REFUSED_WRITES, psycopg.errors.LockNotAvailable) as exc:
                raise StoreUnavailable(f"Postgres session store: {_first_line(exc)}") from exc

        await self._call(op)

    # ---- protocol --------------------------------------------------------------------------------------

    async def create(self, record: SessionRecord) -> None:
        check_status(record.status)
        values = [_param(name, getattr(record, name)) for name in COLUMNS]

        async def op(conn: _Conn) -> None:
            try:
                await conn.execute(_INSERT_SQL, values)
            except psycopg.errors.UniqueViolation as exc:
                raise SessionExists(record.id) from exc

        await self._call(op)

    async def get(self, session_id: str) -> SessionRecord | None:
        async def op(conn: _Conn) -> dict[str, Any] | None:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(_SELECT_SQL, (session_id,))
            return await cursor.fetchone()

        row = await self._call(op)
        return None if row is None else record_from_row(row, decode_json=False)

    async def append(self, session_id: str, batch: AppendBatch) -> None:
        check_status(batch.status)
        events = batch.events
        prev = events[0].index - 1 if events else -1
        check_batch(session_id, events, prev)  # the batch itself is consecutive; the database checks prev
        params = {
            "id": session_id,
            "n": len(events),
            "prev": prev,
            "idxs": [e.index for e in events],
            "datas": [e.data for e in events],
            "model_seq": batch.model_seq,
            "now": batch.now,
            "status": batch.status,
            "finish_reason": batch.finish_reason,
            "usage": None if batch.usage is None else Jsonb(batch.usage),
            "channel": CHANNEL,
            "runner": batch.runner_id,
        }

        async def op(conn: _Conn) -> Any:
            cursor = await conn.execute(_APPEND_SQL, params)
            return await cursor.fetchone()

        if await self._call(op) is None:
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

        async def op(conn: _Conn) -> None:
            await conn.execute(query, values)

        await self._call(op)
        if "status" in fields:
            self._waiters.notify(session_id)

    async def read(self, session_id: str, after: int, limit: int = 1000) -> list[StoredEvent]:
        async def op(conn: _Conn) -> list[tuple[int, str]]:
            cursor = await conn.execute(
                "SELECT idx, data FROM events WHERE session_id = %s AND idx > %s ORDER BY idx LIMIT %s",
                (session_id, after, limit),
            )
            return await cursor.fetchall()

        return [StoredEvent(idx, data) for idx, data in await self._call(op)]

    async def wait(self, session_id: str, after: int, timeout: float) -> None:  # noqa: ASYNC109
        async def op(conn: _Conn) -> Any:
            cursor = await conn.execute("SELECT last_index FROM sessions WHERE id = %s", (session_id,))
            return await cursor.fetchone()

        # Register first, then look: a notification arriving in between still wakes us. The look is a
        # bounded call; the wait itself holds no connection (the LISTEN task wakes it).
        with self._waiters.register(session_id, after) as waiter:
            row = await self._call(op)
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
        return await self._call(_rowcount(_CLAIM_SQL, params)) == 1

    async def release(self, session_id: str, runner_id: str) -> bool:
        return await self._call(_rowcount(_RELEASE_SQL, (session_id, runner_id))) == 1

    async def orphans(self, lapsed_before: float, limit: int) -> list[SessionRecord]:
        async def op(conn: _Conn) -> list[dict[str, Any]]:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(_ORPHANS_SQL, (lapsed_before, max(limit, 0)))
            return await cursor.fetchall()

        return [record_from_row(row, decode_json=False) for row in await self._call(op)]

    async def delete_expired(self, now: float, ttl_seconds: float) -> int:
        async def op(conn: _Conn) -> Any:
            cursor = await conn.execute(_DELETE_EXPIRED_SQL, {"final": _FINAL, "cutoff": now - ttl_seconds})
            return await cursor.fetchone()

        row = await self._call(op)
        count = int(row[0]) if row else 0
        if count:
            self._waiters.notify_all()  # waiters of a deleted session must not sleep to their timeout
        return count

    # ---- state -----------------------------------------------------------------------------------------

    @property
    def failing(self) -> bool:
        """The last call failed at the connection level (or a probe did): calls wait at most the fail-fast
        timeout for a connection and for an answer until one succeeds."""
        return self._failing

    @property
    def pool_replacements(self) -> int:
        """How many times a probe found the server back and a fresh pool replaced the old one."""
        return self._replacements

    # ---- plumbing --------------------------------------------------------------------------------------

    async def _call(self, op: Callable[[_Conn], Awaitable[T]]) -> T:
        """Run ``op`` on a pooled connection. The wait for a connection is bounded by the pool timeout
        (fail-fast while failing), the answer by the call timeout (fail-fast while failing). Raises
        StoreUnavailable; switches to failing (and probes) only on a connection-level error, a missed
        deadline or a failed probe: a saturated pool is not an outage."""
        pool = self._pool or await self._reconnect()
        failing = self._failing
        wait = self._fail_fast if failing else self._pool_timeout
        limit = self._fail_fast if failing else self._call_timeout

        async def attempt(acquired: asyncio.Future[None]) -> T:
            async with pool.connection(timeout=wait) as conn:
                acquired.set_result(None)
                return await op(conn)

        task = await within_deadline(attempt, limit, self._abandoned)
        if task is None:
            self._failing = True
            self._revive(replace=True)
            raise StoreUnavailable(f"Postgres session store: no answer within {limit:g} s")
        try:
            result = task.result()
        except PoolTimeout as exc:
            self._revive(replace=self._failing)  # saturated, or the server gone: a probe tells
            raise StoreUnavailable(f"Postgres session store: {_first_line(exc)}") from exc
        except psycopg.errors.QueryCanceled as exc:  # statement_timeout: slow, not unreachable
            raise StoreUnavailable(f"Postgres session store: {_first_line(exc)}") from exc
        except _DB_ERRORS as exc:  # includes PoolClosed (the pool was replaced or closed meanwhile)
            self._failing = True
            self._revive(replace=True)
            if not isinstance(exc, PoolClosed):
                # A dead connection usually means a server restart: drop the pool's other dead idle
                # connections now, so one request answers 503 instead of one per pooled connection.
                await self._check_pool(pool)
            raise StoreUnavailable(f"Postgres session store: {_first_line(exc)}") from exc
        self._failing = False
        return result

    async def _check_pool(self, pool: AsyncConnectionPool) -> None:
        async def check(acquired: asyncio.Future[None]) -> None:
            acquired.set_result(None)
            await pool.check()

        with contextlib.suppress(Exception):
            await within_deadline(check, self._fail_fast, self._abandoned)

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

    def _revive(self, *, replace: bool) -> None:
        """Probe the server in the background (one prober at a time, rate limited). Unreachable: the store
        is failing, and the prober keeps probing until the server answers. Reachable after failing (or with
        ``replace``): swap in a fresh pool, since the old one's reconnection may be backing off for many
        seconds. Reachable at the first probe without ``replace``: the pool was only saturated."""
        loop = asyncio.get_running_loop()
        if self._reviving is not None and not self._reviving.done():
            return
        if loop.time() - self._probe_at < _PROBE_INTERVAL:
            return
        self._probe_at = loop.time()
        self._reviving = asyncio.create_task(self._probe(replace), name="session-store-revive")

    async def _probe(self, replace: bool) -> None:
        """Probe until the server answers (every ``_PROBE_INTERVAL`` while it does not, so each process
        heals within about a second of its return without a request paying for it); then, when we were
        failing, replace the pool."""
        failures = 0
        while not self._closed:
            try:
                async with asyncio.timeout(max(self._fail_fast, 1.0)):
                    probe = await self._connect()
                await probe.close()
            except (StoreUnavailable, TimeoutError) as exc:
                self._failing = replace = True
                failures += 1
                level = logging.INFO if failures == 1 else logging.DEBUG
                log.log(level, "session store unreachable: %s", _first_line(exc) if str(exc) else "timeout")
                await asyncio.sleep(_PROBE_INTERVAL)
                self._probe_at = asyncio.get_running_loop().time()
                if not self._failing:  # a call succeeded meanwhile: the pool healed by itself
                    return
                continue
            if replace and await self._replace_pool():
                self._failing = False  # the fresh pool connected: calls get the normal bounds again
            return

    async def _replace_pool(self) -> bool:
        """Open a fresh pool and swap it in; False when it could not connect (or the store closed)."""
        fresh = self._new_pool()
        try:
            await fresh.open(wait=True, timeout=self._connect_timeout)
        except BaseException as exc:
            await fresh.close()
            if isinstance(exc, _DB_ERRORS):
                return False
            raise
        if self._pool is None:  # closed meanwhile
            await fresh.close()
            return False
        old, self._pool = self._pool, fresh  # one step on the loop: callers see the old or the new pool
        self._replacements += 1
        log.warning("session store reachable again: connection pool replaced")
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close(timeout=1.0)
        return True

    def _new_pool(self) -> AsyncConnectionPool:
        return AsyncConnectionPool(
            self._url,
            min_size=self._min_size,
            max_size=self._max_size,
            timeout=self._pool_timeout,
            kwargs=self._kwargs(POOL_APP_NAME, statements=True),
            open=False,
            name="session-store",
        )

    def _kwargs(self, application_name: str, *, statements: bool) -> dict[str, Any]:
        return connection_kwargs(
            self._url,
            application_name=application_name,
            connect_timeout=self._connect_timeout,
            call_timeout=self._call_timeout,
            statements=statements,
        )

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        """The migration/LISTEN connection (named, so operators can tell it from the pool's)."""
        try:
            return await psycopg.AsyncConnection.connect(
                self._url, **self._kwargs(LISTEN_APP_NAME, statements=False)
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
            if isinstance(exc, (*_DB_ERRORS, *_REFUSED_WRITES)):
                raise StoreUnavailable(f"Postgres session store: {_first_line(exc)}") from exc
            raise
        self._pool = pool
        self._listener = asyncio.create_task(self._listen_loop(listen_conn), name="session-store-listener")

    async def _listen_loop(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        """Dispatch NOTIFYs to waiters; reconnect with backoff when the connection drops, or when it does
        not answer a check (every ``_LISTEN_CHECK_SECONDS`` without a notification) within the call timeout:
        a stalled connection would otherwise wait for notifications forever."""
        delay = 0.1
        try:
            while True:
                try:
                    if conn is None:
                        conn = await self._connect()
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                        self._waiters.notify_all()  # notifications may have been missed meanwhile
                        delay = 0.1
                    async for note in conn.notifies(timeout=_LISTEN_CHECK_SECONDS):
                        self._waiters.notify(note.payload)
                    await self._check_listener(conn)
                except Exception as exc:  # never die: cross-process wake-ups depend on this task
                    level = logging.WARNING if delay <= 0.1 else logging.DEBUG  # once per outage
                    log.log(level, "session store LISTEN connection lost (%s); retrying", _first_line(exc))
                    if conn is not None and not conn.closed and not isinstance(exc, _Stalled):
                        await conn.close()
                    conn = None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)  # one attempt a second at most: wake-ups resume soon
        finally:
            if conn is not None:
                await conn.close()

    async def _check_listener(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Raise _Stalled (the connection is left to close in the background) when a trivial query gets no
        answer within the call timeout."""
        check = asyncio.create_task(conn.execute("SELECT 1"))
        await asyncio.wait({check}, timeout=self._call_timeout)
        if not check.done():
            self._abandoned.add(check, close=conn)
            raise _Stalled(f"no answer within {self._call_timeout:g} s")
        check.result()


class _Stalled(Exception):
    """The LISTEN connection did not answer its check in time."""


def _rowcount(query: Any, params: Any) -> Callable[[_Conn], Awaitable[int]]:
    async def op(conn: _Conn) -> int:
        cursor = await conn.execute(query, params)
        return cursor.rowcount

    return op


async def _migrate(conn: psycopg.AsyncConnection[Any]) -> None:
    """Bring the schema to the latest of ``MIGRATIONS`` under an advisory lock (workers starting together
    do not race). A schema already at the latest version is only read: a server with
    ``default_transaction_read_only`` then opens, and readiness (``ping``) says it refuses writes (a hot
    standby refuses the store's LISTEN, so there the setup keeps failing: unavailable either way). Raises
    RuntimeError for a newer schema."""
    if await _schema_version(conn) == MIGRATIONS[-1][0]:
        return
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


async def _schema_version(conn: psycopg.AsyncConnection[Any]) -> int:
    """The schema's version, 0 without a ``schema_version`` table; reads only."""
    cursor = await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    row = await cursor.fetchone()
    if not (row and row[0]):
        return 0
    cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


def _param(name: str, value: Any) -> Any:
    return Jsonb(value) if name in JSON_COLUMNS and value is not None else value


def _first_line(exc: BaseException) -> str:
    """Driver messages can span lines (hints, context); one line is enough for logs and 503 bodies."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
