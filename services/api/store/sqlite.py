"""SQLite SessionStore (the default; SESSIONS_DB_PATH), shared by every worker process on one machine.

Concurrency design:
- One connection per store, used only by one dedicated thread: every call is a job on that thread, so the
  event loop never blocks on disk and the connection needs no lock.
- WAL mode: readers never block the writer nor see a half-written batch. Every write that reads before it
  writes (append, delete_expired, migration) runs in ``BEGIN IMMEDIATE``, which takes the database write lock
  up front, so check-then-write is atomic across processes; claim and create are single statements.
- ``busy_timeout`` lets a writer wait for another process's short transaction instead of failing.
- Set-up (open, WAL mode, pragmas) runs under an exclusive ``flock`` on a sidecar file ``<path>.setup-lock``:
  switching a fresh file to WAL is not covered by ``busy_timeout``, and several workers starting at once on a
  new file raced there (``database is locked``). The switch is also retried with back-off, for processes that
  do not take the lock (the sqlite3 shell). The schema migration is idempotent (``BEGIN IMMEDIATE``).
- wait(): appends made through this store wake its waiters at once. Appends from other processes are seen by
  one poller task per store, which reads (last_index, status) of every waited session in one query each
  ``poll_interval`` while anyone waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from services.api.store.base import (
    FINAL_STATUSES,
    AppendBatch,
    SessionExists,
    SessionRecord,
    StoredEvent,
    StoreUnavailable,
)
from services.api.store.common import (
    COLUMNS,
    JSON_COLUMNS,
    Waiter,
    Waiters,
    check_batch,
    check_runner,
    check_status,
    check_update_fields,
    record_from_row,
    wait_event,
    with_updated,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Each entry: (version, statements). Applied in order, once, inside one write transaction.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE sessions (
                id TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                status TEXT NOT NULL,
                created REAL NOT NULL,
                updated REAL NOT NULL,
                last_index INTEGER NOT NULL DEFAULT -1,
                finish_reason TEXT,
                usage TEXT,
                model_url TEXT,
                model_request_id TEXT,
                model_seq INTEGER NOT NULL DEFAULT -1,
                runner_id TEXT,
                lease_until REAL NOT NULL DEFAULT 0,
                reader_seen_at REAL NOT NULL DEFAULT 0,
                meta TEXT NOT NULL DEFAULT '{}'
            )""",
            """CREATE TABLE events (
                session_id TEXT NOT NULL,
                idx INTEGER NOT NULL,
                data TEXT NOT NULL,
                PRIMARY KEY (session_id, idx)
            ) WITHOUT ROWID""",
            "CREATE INDEX sessions_status_updated ON sessions (status, updated)",
        ),
    ),
)
_FINAL_SQL = "(" + ",".join(f"'{s}'" for s in sorted(FINAL_STATUSES)) + ")"
_IN_CHUNK = 500  # stay far below SQLite's host-parameter limit
_PING_BUSY_SECONDS = 0.25  # how long a readiness ping waits for another writer's lock


class SqliteStore:
    def __init__(self, path: str, *, poll_interval: float = 0.025, busy_timeout: float = 5.0) -> None:
        self._path = path
        self._poll_interval = poll_interval
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._poller: asyncio.Task[None] | None = None
        self._waiters = Waiters()
        self._probe: sqlite3.Connection | None = None  # ping's own connection (never the store thread's)
        self._probe_lock = threading.Lock()  # guards _probe and _probe_closed (ping threads, close)
        self._probe_closed = False

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def open(self) -> None:
        parent = Path(self._path).parent
        if self._path != ":memory:" and not parent.is_dir():
            raise StoreUnavailable(f"SESSIONS_DB_PATH={self._path}: directory {parent} does not exist")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._probe_closed = False
        try:
            self._conn = await self._submit(self._connect_sync)
            await self._run(self._migrate_sync)
        except BaseException:
            await self.close()
            raise
        self._poller = asyncio.create_task(self._poll_loop(), name="sqlite-store-poller")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        self._waiters.notify_all()
        await asyncio.to_thread(self._close_probe)  # a ping in flight holds its lock up to 0.25 s
        conn, executor = self._conn, self._executor
        self._conn = self._executor = None
        if executor is not None:
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(executor, conn.close)
            executor.shutdown(wait=False)

    async def ping(self) -> None:
        """Readiness: the file answers and takes writes. ``BEGIN IMMEDIATE`` takes the write lock (waiting up
        to 0.25 s for another writer) and is rolled back at once, writing nothing; a read-only file, or a lock
        held past that wait, raises StoreUnavailable. It runs on a connection and thread of its own: the store
        thread, which every request's calls share, never waits for it."""
        if self._conn is None:
            raise StoreUnavailable("the SQLite session store is closed")
        try:
            await asyncio.to_thread(self._ping_sync)
        except sqlite3.Error as exc:  # locked, read-only, not a database, closed meanwhile
            raise StoreUnavailable(f"SQLite session store: {exc}") from exc

    def _ping_sync(self) -> None:
        with self._probe_lock:
            if self._probe_closed:
                raise sqlite3.OperationalError("the store is closed")
            if self._probe is None:
                self._probe = sqlite3.connect(
                    self._path, timeout=_PING_BUSY_SECONDS, isolation_level=None, check_same_thread=False
                )
            try:
                self._probe.execute("BEGIN IMMEDIATE")
                self._probe.execute("ROLLBACK")
            except sqlite3.Error:
                if self._probe.in_transaction:  # never keep a connection that may hold the write lock
                    self._probe.close()
                    self._probe = None
                raise

    def _close_probe(self) -> None:
        with self._probe_lock:
            self._probe_closed = True
            if self._probe is not None:
                self._probe.close()
                self._probe = None

    # ---- protocol --------------------------------------------------------------------------------------

    async def create(self, record: SessionRecord) -> None:
        check_status(record.status)
        await self._run(_create_sync, record)

    async def get(self, session_id: str) -> SessionRecord | None:
        return await self._run(_get_sync, session_id)

    async def append(self, session_id: str, batch: AppendBatch) -> None:
        check_status(batch.status)
        changes = {"model_seq": batch.model_seq, "status": batch.status, "finish_reason": batch.finish_reason}
        changes["usage"] = None if batch.usage is None else json.dumps(batch.usage)
        await self._run(_append_sync, session_id, list(batch.events), changes, batch.now, batch.runner_id)
        self._waiters.notify(session_id)

    async def update(self, session_id: str, *, now: float, **fields: Any) -> None:
        check_update_fields(fields)
        await self._run(_update_sync, session_id, with_updated(fields, now))
        if "status" in fields:
            self._waiters.notify(session_id)

    async def read(self, session_id: str, after: int, limit: int = 1000) -> list[StoredEvent]:
        return await self._run(_read_sync, session_id, after, limit)

    async def wait(self, session_id: str, after: int, timeout: float) -> None:  # noqa: ASYNC109
        # Register first, then look: an append landing in between still wakes us.
        with self._waiters.register(session_id, after) as waiter:
            states = await self._run(_states_sync, [session_id])
            state = states.get(session_id)
            if state is None or state[0] > after:
                return
            waiter.status = state[1]
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
        until = now + lease_seconds
        return await self._run(_claim_sync, session_id, runner_id, until, now, takeover_from)

    async def release(self, session_id: str, runner_id: str) -> bool:
        return await self._run(_release_sync, session_id, runner_id)

    async def orphans(self, lapsed_before: float, limit: int) -> list[SessionRecord]:
        return await self._run(_orphans_sync, lapsed_before, limit)

    async def delete_expired(self, now: float, ttl_seconds: float) -> int:
        count = await self._run(_delete_expired_sync, now - ttl_seconds)
        if count:
            self._waiters.notify_all()  # waiters of a deleted session must not sleep to their timeout
        return count

    # ---- plumbing --------------------------------------------------------------------------------------

    def _connect_sync(self) -> sqlite3.Connection:
        deadline = time.monotonic() + max(self._busy_timeout, 1.0)
        with _setup_lock(self._path, deadline):
            try:
                # isolation_level=None: no implicit transactions; writes that need one say BEGIN IMMEDIATE.
                conn = sqlite3.connect(
                    self._path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
                )
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"SESSIONS_DB_PATH={self._path}: cannot open ({exc})") from exc
            conn.row_factory = sqlite3.Row
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                mode = _enable_wal(conn, deadline)
                # NORMAL in WAL mode survives a process crash (a power loss may drop the last commits).
                conn.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.DatabaseError as exc:  # e.g. the path is some other kind of file
                conn.close()
                raise StoreUnavailable(
                    f"SESSIONS_DB_PATH={self._path}: not a usable database ({exc})"
                ) from exc
        if mode not in {"wal", "memory"}:
            log.warning(
                "SESSIONS_DB_PATH=%s: journal mode %s (WAL unavailable on this filesystem)", self._path, mode
            )
        return conn

    @staticmethod
    def _migrate_sync(conn: sqlite3.Connection) -> None:
        with _immediate(conn):
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            latest = MIGRATIONS[-1][0]
            if current > latest:
                raise RuntimeError(f"sessions database schema v{current} is newer than this code (v{latest})")
            for version, statements in MIGRATIONS:
                if version > current:
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    async def _submit(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreUnavailable("the SQLite session store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on the store thread; operational errors become StoreUnavailable."""
        conn = self._conn
        if conn is None:
            raise StoreUnavailable("the SQLite session store is closed")
        try:
            return await self._submit(fn, conn, *args)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"SQLite session store: {exc}") from exc

    async def _poll_loop(self) -> None:
        """Wake waiters whose session changed in another process (one query per tick for all of them)."""
        while True:
            await asyncio.sleep(self._poll_interval)
            ids = self._waiters.sessions()
            if not ids:
                continue
            try:
                states = await self._run(_states_sync, ids)
            except Exception as exc:  # keep polling: waiters still return at their timeout meanwhile
                log.warning("session store poll failed: %s", exc)
                continue
            for session_id in ids:
                state = states.get(session_id)
                for waiter in self._waiters.of(session_id):
                    if _changed(waiter, state):
                        waiter.event.set()


@contextlib.contextmanager
def _setup_lock(path: str, deadline: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<path>.setup-lock`` (created when missing; kept: removing a lock file
    is racy) until the block ends. Waits until ``deadline`` (time.monotonic()), then raises StoreUnavailable.
    No lock for ``:memory:``."""
    if path == ":memory:":
        yield
        return
    lock_path = f"{path}.setup-lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreUnavailable(
            f"SESSIONS_DB_PATH={path}: cannot create {lock_path} ({exc.strerror})"
        ) from exc
    try:
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        f"SESSIONS_DB_PATH={path}: set-up lock {lock_path} is held"
                    ) from None
                time.sleep(delay)  # another process is setting up (milliseconds); poll the lock
                delay = min(delay * 2, 0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


def _enable_wal(conn: sqlite3.Connection, deadline: float) -> str:
    """Switch to WAL (a no-op when already on); return the resulting journal mode. ``busy_timeout`` does not
    cover this statement, so "database is locked" is retried with back-off until ``deadline``."""
    delay = 0.005
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)  # another connection holds a lock for a moment
        delay = min(delay * 2, 0.1)


def _changed(waiter: Waiter, state: tuple[int, str] | None) -> bool:
    if state is None:
        return True
    last_index, status = state
    return last_index > waiter.after or (waiter.status is not None and status != waiter.status)


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that holds the database write lock from its first statement."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _encode(name: str, value: Any) -> Any:
    return json.dumps(value) if name in JSON_COLUMNS and value is not None else value


def _create_sync(conn: sqlite3.Connection, record: SessionRecord) -> None:
    values = [_encode(name, getattr(record, name)) for name in COLUMNS]
    sql = f"INSERT INTO sessions ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    try:
        conn.execute(sql, values)
    except sqlite3.IntegrityError as exc:
        raise SessionExists(record.id) from exc


def _get_sync(conn: sqlite3.Connection, session_id: str) -> SessionRecord | None:
    row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM sessions WHERE id = ?", (session_id,)).fetchone()
    return None if row is None else record_from_row(row, decode_json=True)


def _append_sync(
    conn: sqlite3.Connection,
    session_id: str,
    events: list[StoredEvent],
    changes: dict[str, Any],
    now: float,
    runner_id: str | None,
) -> None:
    with _immediate(conn):
        query = "SELECT last_index, runner_id FROM sessions WHERE id = ?"
        row = conn.execute(query, (session_id,)).fetchone()
        last_index = None if row is None else row[0]
        check_batch(session_id, events, last_index)
        assert last_index is not None
        check_runner(session_id, runner_id, row[1])
        conn.executemany(
            "INSERT INTO events (session_id, idx, data) VALUES (?, ?, ?)",
            [(session_id, e.index, e.data) for e in events],
        )
        conn.execute(
            """UPDATE sessions SET last_index = ?, model_seq = ?, updated = ?,
                 status = coalesce(?, status), finish_reason = coalesce(?, finish_reason),
                 usage = coalesce(?, usage)
               WHERE id = ?""",
            (
                last_index + len(events),
                changes["model_seq"],
                now,
                changes["status"],
                changes["finish_reason"],
                changes["usage"],
                session_id,
            ),
        )


def _update_sync(conn: sqlite3.Connection, session_id: str, columns: dict[str, Any]) -> None:
    if not columns:
        return
    # Column names come from the UPDATABLE allow-list (checked by the caller), never from user input.
    assignments = ", ".join(f"{name} = ?" for name in columns)
    values = [_encode(name, value) for name, value in columns.items()]
    conn.execute(f"UPDATE sessions SET {assignments} WHERE id = ?", [*values, session_id])


def _read_sync(conn: sqlite3.Connection, session_id: str, after: int, limit: int) -> list[StoredEvent]:
    rows = conn.execute(
        "SELECT idx, data FROM events WHERE session_id = ? AND idx > ? ORDER BY idx LIMIT ?",
        (session_id, after, limit),
    ).fetchall()
    return [StoredEvent(row[0], row[1]) for row in rows]


def _states_sync(conn: sqlite3.Connection, ids: list[str]) -> dict[str, tuple[int, str]]:
    states: dict[str, tuple[int, str]] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        sql = f"SELECT id, last_index, status FROM sessions WHERE id IN ({', '.join('?' * len(chunk))})"
        for row in conn.execute(sql, chunk):
            states[row[0]] = (row[1], row[2])
    return states


def _claim_sync(
    conn: sqlite3.Connection, session_id: str, runner_id: str, until: float, now: float, dead: str | None
) -> bool:
    cursor = conn.execute(
        f"""UPDATE sessions SET runner_id = ?, lease_until = ?
            WHERE id = ? AND status NOT IN {_FINAL_SQL}
              AND (runner_id IS NULL OR runner_id = ? OR lease_until < ? OR runner_id = ?)""",
        (runner_id, until, session_id, runner_id, now, dead),
    )
    return cursor.rowcount == 1


def _release_sync(conn: sqlite3.Connection, session_id: str, runner_id: str) -> bool:
    cursor = conn.execute(
        "UPDATE sessions SET runner_id = NULL, lease_until = 0 WHERE id = ? AND runner_id = ?",
        (session_id, runner_id),
    )
    return cursor.rowcount == 1


def _orphans_sync(conn: sqlite3.Connection, lapsed_before: float, limit: int) -> list[SessionRecord]:
    rows = conn.execute(
        f"""SELECT {", ".join(COLUMNS)} FROM sessions
            WHERE status NOT IN {_FINAL_SQL} AND lease_until < ? ORDER BY lease_until LIMIT ?""",
        (lapsed_before, max(limit, 0)),
    ).fetchall()
    return [record_from_row(row, decode_json=True) for row in rows]


def _delete_expired_sync(conn: sqlite3.Connection, cutoff: float) -> int:
    expired = f"SELECT id FROM sessions WHERE status IN {_FINAL_SQL} AND updated < ?"
    with _immediate(conn):
        conn.execute(f"DELETE FROM events WHERE session_id IN ({expired})", (cutoff,))
        return conn.execute(f"DELETE FROM sessions WHERE id IN ({expired})", (cutoff,)).rowcount
