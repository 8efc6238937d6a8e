"""SQLite set-up is race-free: many processes opening one fresh database file at once all succeed (WAL mode
and the schema are set once), the situation of gunicorn's workers on the first `make run`."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from services.api.store.sqlite import SqliteStore, _enable_wal

pytestmark = [pytest.mark.integration]

PROCESSES = 8
TRIALS = 40


def _open_each(paths: list[str], barrier: Any, results: Any) -> None:
    """Child process: for each fresh path, wait for every sibling, then open (and close) a store on it."""

    async def open_close(path: str) -> None:
        store = SqliteStore(path)
        await store.open()
        await store.close()

    for path in paths:
        barrier.wait(timeout=30)
        try:
            asyncio.run(open_close(path))
            results.put((path, None))
        except Exception:
            results.put((path, traceback.format_exc(limit=3)))


def test_many_processes_set_up_one_fresh_file_at_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    paths = [str(tmp_path / f"trial-{i}" / "sessions.db") for i in range(TRIALS)]
    for path in paths:
        Path(path).parent.mkdir()
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [ctx.Process(target=_open_each, args=(paths, barrier, results)) for _ in range(PROCESSES)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=60) for _ in range(PROCESSES * TRIALS)]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    failures = [(path, err) for path, err in outcomes if err is not None]
    assert not failures, f"{len(failures)} of {len(outcomes)} set-ups failed; first:\n{failures[0][1]}"
    for path in paths:
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1


def test_wal_switch_waits_for_a_connection_outside_the_set_up_lock(tmp_path: Path) -> None:
    """A process that does not take the set-up lock (the sqlite3 shell) holds the fresh file exclusively for a
    moment: the store retries the WAL switch instead of failing with "database is locked"."""
    path = str(tmp_path / "sessions.db")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE other (x)")
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(0.3, holder.rollback)  # how long the other process holds the lock
    release.start()

    async def open_close() -> None:
        store = SqliteStore(path, busy_timeout=5.0)
        await store.open()
        await store.close()

    try:
        asyncio.run(open_close())
    finally:
        release.join()
        holder.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


class _LockedTwice:
    """A connection whose WAL switch reports "database is locked" twice, as SQLite does without calling the
    busy handler when waiting could deadlock."""

    def __init__(self) -> None:
        self.calls = 0

    def execute(self, sql: str) -> _LockedTwice:
        self.calls += 1
        if self.calls <= 2:
            raise sqlite3.OperationalError("database is locked")
        return self

    def fetchone(self) -> tuple[str]:
        return ("wal",)


def test_wal_switch_is_retried_while_locked_then_gives_up_at_the_deadline() -> None:
    conn = _LockedTwice()
    assert _enable_wal(conn, time.monotonic() + 5) == "wal"  # type: ignore[arg-type]
    assert conn.calls == 3
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _enable_wal(_LockedTwice(), time.monotonic() - 1)  # type: ignore[arg-type]
