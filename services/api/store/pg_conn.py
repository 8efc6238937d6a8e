"""Connection-level plumbing of the Postgres store: libpq settings that notice a dead or stalled peer, and
calls abandoned at a deadline.

psycopg cannot be relied on to honour a cancellation promptly: a query task cancelled while the server does
not answer first sends a cancel request and then waits for the query to end (up to ~10 s), and without any
bound nothing ends a query on a stalled connection at all. So a bounded call runs in its own task; at the
deadline the caller stops waiting at once and the task is cancelled and left to finish in the background
(``Abandoned``), where psycopg closes or returns its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

# An idle connection whose peer vanished (host gone, network partition) fails after about 5 + 2 * 3 s.
_KEEPALIVES = (("keepalives", 1), ("keepalives_idle", 5), ("keepalives_interval", 2), ("keepalives_count", 3))


def connection_kwargs(
    url: str, *, application_name: str, connect_timeout: float, call_timeout: float, statements: bool
) -> dict[str, Any]:
    """psycopg connect() arguments for the store's connections (seconds in, libpq units out).

    TCP keepalives and ``tcp_user_timeout`` (data unacknowledged for ``call_timeout``) make a dead peer an
    error instead of a silent hang; with ``statements`` the server also ends any statement running longer
    than ``call_timeout`` (``statement_timeout``, added to the URL's own ``options``). Settings the URL
    gives itself win, except ``statement_timeout`` (the last ``-c`` wins on the server)."""
    given = conninfo_to_dict(url)
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "connect_timeout": max(1, round(connect_timeout)),
        "application_name": application_name,
    }
    for key, value in (*_KEEPALIVES, ("tcp_user_timeout", _ms(call_timeout))):
        if key not in given:
            kwargs[key] = value
    if statements:
        own = str(given.get("options") or "")
        kwargs["options"] = f"{own} -c statement_timeout={_ms(call_timeout)}".strip()
    return kwargs


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class Abandoned:
    """Tasks a caller stopped waiting for: cancelled, kept referenced until they end, their outcome
    swallowed; optionally a connection to close once the task has let go of it."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, task: asyncio.Task[Any], close: psycopg.AsyncConnection[Any] | None = None) -> None:
        task.cancel()
        if close is not None:
            task = asyncio.create_task(_close_after(task, close), name="session-store-abandoned")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an abandoned call's error is expected, not news

    async def drain(self, within: float) -> None:
        """Cancel again (psycopg then closes a connection whose query it was still cancelling) and wait for
        every task, at most ``within`` seconds."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=within)


async def _close_after(task: asyncio.Task[Any], conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(BaseException):
        await task
    with contextlib.suppress(Exception):
        await conn.close()


async def within_deadline(
    start: Callable[[asyncio.Future[None]], Awaitable[Any]], limit: float, abandoned: Abandoned
) -> asyncio.Task[Any] | None:
    """Run ``start(acquired)`` in a task. Wait without a deadline until it sets ``acquired`` (the wait for a
    pooled connection is bounded by the pool itself) or ends; from then on at most ``limit`` seconds.
    Returns the finished task (its result or error is the caller's to read), or None after abandoning it
    at the deadline. When the caller is cancelled the task is abandoned too."""
    acquired: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(start(acquired))  # type: ignore[arg-type]
    try:
        await asyncio.wait({task, acquired}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=limit)
    except asyncio.CancelledError:
        abandoned.add(task)
        raise
    if task.done():
        return task
    abandoned.add(task)
    return None
