"""Pieces shared by the store backends: column names, argument checks, in-process waiters."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.api.store.base import STATUSES, AppendConflict, SessionRecord, StoredEvent

COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SessionRecord))
JSON_COLUMNS = frozenset({"usage", "meta"})
# last_index only moves with append() (with its events); id/owner/created never change; updated is `now`.
UPDATABLE = frozenset(COLUMNS) - {"id", "owner", "created", "updated", "last_index"}


# Bookkeeping, not a change of the session: writing only these leaves `updated` (and so the TTL) alone.
BOOKKEEPING = frozenset({"reader_seen_at", "runner_id", "lease_until"})


def with_updated(fields: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The columns an update() writes: ``fields``, plus ``updated`` when the session itself changed."""
    columns = dict(fields)
    if set(fields) - BOOKKEEPING:
        columns["updated"] = now
    return columns


def check_status(status: str | None) -> None:
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown session status {status!r}")


def check_update_fields(fields: Mapping[str, Any]) -> None:
    """Reject unknown or append-only fields early: a typo must not be silently dropped."""
    bad = set(fields) - UPDATABLE
    if bad:
        raise ValueError(f"fields not updatable: {sorted(bad)}")
    check_status(fields.get("status"))


def check_batch(session_id: str, events: Sequence[StoredEvent], last_index: int | None) -> None:
    """The batch must continue the session exactly (no gap, no overlap)."""
    if last_index is None:
        raise AppendConflict(f"session {session_id} does not exist")
    for offset, event in enumerate(events):
        if event.index != last_index + 1 + offset:
            raise AppendConflict(
                f"session {session_id}: event index {event.index} does not follow {last_index + offset}"
            )


def check_runner(session_id: str, expected: str | None, actual: str | None) -> None:
    """Fencing: an append that names its runner fails when another runner holds the session."""
    if expected is not None and actual != expected:
        raise AppendConflict(f"session {session_id} is run by another runner now")


def record_from_row(row: Mapping[str, Any], decode_json: bool) -> SessionRecord:
    """Build a record from a row mapping; SQLite keeps JSON as text, Postgres decodes jsonb itself."""
    values = {name: row[name] for name in COLUMNS}
    if decode_json:
        import json

        for name in JSON_COLUMNS:
            if values[name] is not None:
                values[name] = json.loads(values[name])
    if values["meta"] is None:
        values["meta"] = {}
    return SessionRecord(**values)


@dataclass(eq=False, slots=True)
class Waiter:
    after: int
    status: str | None = None  # status seen when waiting began (pollers wake on a change)
    event: asyncio.Event = field(default_factory=asyncio.Event)


class Waiters:
    """Per-session asyncio waiters of one store instance; notify() wakes those of one session."""

    def __init__(self) -> None:
        self._by_session: dict[str, set[Waiter]] = {}

    @contextlib.contextmanager
    def register(self, session_id: str, after: int) -> Iterator[Waiter]:
        waiter = Waiter(after)
        self._by_session.setdefault(session_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            group = self._by_session.get(session_id)
            if group is not None:
                group.discard(waiter)
                if not group:
                    del self._by_session[session_id]

    def sessions(self) -> list[str]:
        return list(self._by_session)

    def of(self, session_id: str) -> tuple[Waiter, ...]:
        return tuple(self._by_session.get(session_id, ()))

    def notify(self, session_id: str) -> None:
        for waiter in self._by_session.get(session_id, ()):
            waiter.event.set()

    def notify_all(self) -> None:
        for group in self._by_session.values():
            for waiter in group:
                waiter.event.set()


async def wait_event(event: asyncio.Event, seconds: float) -> None:
    """Wait for ``event`` at most ``seconds``; running out of time is a normal return."""
    if seconds <= 0 or event.is_set():
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
