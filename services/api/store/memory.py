"""In-memory SessionStore (PERSIST_SESSIONS=0): one process only, lost on restart.

Every method runs on the event loop without awaiting in between its check and its write, so each one is
atomic with respect to other tasks without a lock.
"""

from __future__ import annotations

import copy
from typing import Any

from services.api.store.base import FINAL_STATUSES, AppendBatch, SessionExists, SessionRecord, StoredEvent
from services.api.store.common import (
    Waiters,
    check_batch,
    check_runner,
    check_status,
    check_update_fields,
    wait_event,
    with_updated,
)


class MemoryStore:
    def __init__(self) -> None:
        self._sessions: dict[str, SessionRecord] = {}
        self._events: dict[str, list[str]] = {}
        self._waiters = Waiters()

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self._waiters.notify_all()

    async def ping(self) -> None:
        return None

    async def create(self, record: SessionRecord) -> None:
        if record.id in self._sessions:
            raise SessionExists(record.id)
        check_status(record.status)
        self._sessions[record.id] = _copy(record)
        self._events[record.id] = []

    async def get(self, session_id: str) -> SessionRecord | None:
        record = self._sessions.get(session_id)
        if record is None:
            return None
        return _copy(record)

    async def append(self, session_id: str, batch: AppendBatch) -> None:
        check_status(batch.status)
        record = self._sessions.get(session_id)
        check_batch(session_id, batch.events, record.last_index if record else None)
        assert record is not None
        check_runner(session_id, batch.runner_id, record.runner_id)
        self._events[session_id].extend(event.data for event in batch.events)
        record.last_index += len(batch.events)
        record.model_seq = batch.model_seq
        record.updated = batch.now
        if batch.status is not None:
            record.status = batch.status
        if batch.finish_reason is not None:
            record.finish_reason = batch.finish_reason
        if batch.usage is not None:
            record.usage = dict(batch.usage)
        self._waiters.notify(session_id)

    async def update(self, session_id: str, *, now: float, **fields: Any) -> None:
        check_update_fields(fields)
        record = self._sessions.get(session_id)
        if record is None:
            return
        for name, value in with_updated(fields, now).items():
            setattr(record, name, copy.deepcopy(value))
        if "status" in fields:
            self._waiters.notify(session_id)

    async def read(self, session_id: str, after: int, limit: int = 1000) -> list[StoredEvent]:
        data = self._events.get(session_id, [])
        start = max(after + 1, 0)
        return [StoredEvent(i, d) for i, d in enumerate(data[start : start + limit], start)]

    async def wait(self, session_id: str, after: int, timeout: float) -> None:  # noqa: ASYNC109
        record = self._sessions.get(session_id)
        if record is None or record.last_index > after:
            return
        with self._waiters.register(session_id, after) as waiter:
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
        record = self._sessions.get(session_id)
        if record is None or record.status in FINAL_STATUSES:
            return False
        held_by_other = record.runner_id not in (None, runner_id) and record.runner_id != takeover_from
        if held_by_other and record.lease_until >= now:
            return False
        record.runner_id = runner_id
        record.lease_until = now + lease_seconds
        return True

    async def release(self, session_id: str, runner_id: str) -> bool:
        record = self._sessions.get(session_id)
        if record is None or record.runner_id != runner_id:
            return False
        record.runner_id, record.lease_until = None, 0.0
        return True

    async def orphans(self, lapsed_before: float, limit: int) -> list[SessionRecord]:
        found = [
            r
            for r in self._sessions.values()
            if r.status not in FINAL_STATUSES and r.lease_until < lapsed_before
        ]
        found.sort(key=lambda r: r.lease_until)
        return [_copy(r) for r in found[: max(limit, 0)]]

    async def delete_expired(self, now: float, ttl_seconds: float) -> int:
        cutoff = now - ttl_seconds
        gone = [r.id for r in self._sessions.values() if r.status in FINAL_STATUSES and r.updated < cutoff]
        for session_id in gone:
            del self._sessions[session_id]
            del self._events[session_id]
            self._waiters.notify(session_id)
        return len(gone)


def _copy(record: SessionRecord) -> SessionRecord:
    """Callers and the store never share mutable state (as with a real database)."""
    return copy.deepcopy(record)
