"""In-process view of the sessions this process runs, and of the clients attached here.

A ``LiveLog`` holds a running session's events *after* they were stored (durable before visible: a client
never sees an event that a restarted process could produce differently), so readers in the same process
follow it without a database hop. ``Attachments`` counts this process's readers per session, for
auto-cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

from services.api.store.base import StoredEvent


class LiveLog:
    def __init__(self, session_id: str, first_index: int) -> None:
        self.session_id = session_id
        self.first_index = first_index  # index of events[0]
        self._events: list[str] = []
        self._changed = asyncio.Event()
        self.closed = False  # the runner stopped here (finished, lost its lease, or shut down)
        self.final_status: str | None = None

    @property
    def next_index(self) -> int:
        return self.first_index + len(self._events)

    def covers(self, index: int) -> bool:
        return self.first_index <= index

    def since(self, index: int) -> list[StoredEvent]:
        start = max(index - self.first_index, 0)
        return [StoredEvent(self.first_index + i, d) for i, d in enumerate(self._events[start:], start)]

    def publish(self, events: Sequence[StoredEvent]) -> None:
        self._events.extend(e.data for e in events)
        self._wake()

    def close(self, final_status: str | None) -> None:
        self.closed = True
        self.final_status = final_status
        self._wake()

    async def wait(self, next_index: int, within: float) -> None:
        """Until an event at ``next_index`` exists, the log closes, or ``within`` seconds passed."""
        if self.next_index > next_index or self.closed:
            return
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), within)

    def _wake(self) -> None:
        # Waiters hold the old event; a fresh one serves the next round.
        self._changed.set()
        self._changed = asyncio.Event()


class Attachments:
    """Readers attached to each session in this process, and when the last one left."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}
        self._left_at: dict[str, float] = {}

    def attach(self, session_id: str) -> None:
        self._count[session_id] = self._count.get(session_id, 0) + 1

    def detach(self, session_id: str) -> None:
        left = self._count.get(session_id, 1) - 1
        if left <= 0:
            self._count.pop(session_id, None)
            self._left_at[session_id] = time.monotonic()
        else:
            self._count[session_id] = left

    def count(self, session_id: str) -> int:
        return self._count.get(session_id, 0)

    def idle_for(self, session_id: str, since: float) -> float:
        """Seconds without a local reader (counting from ``since`` when none ever attached here)."""
        if self.count(session_id):
            return 0.0
        return time.monotonic() - max(self._left_at.get(session_id, since), since)

    def forget(self, session_id: str) -> None:
        self._left_at.pop(session_id, None)
