"""Typed fakes for fast unit tests of the runner and hub (same protocol as ModelClient's streams)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from services.api.model_client import StreamBroken
from services.api.store.base import (
    AppendBatch,
    AppendConflict,
    SessionRecord,
    SessionStore,
    StoredEvent,
    StoreUnavailable,
)
from services.protocol import paths
from services.protocol.events import Delta, Finished, Usage


def script(reasoning: Sequence[str], content: Sequence[str], reason: str = "stop") -> list[Delta | Finished]:
    """Model events: reasoning deltas, then content deltas, then Finished (seq 0, 1, 2, ...)."""
    events: list[Delta | Finished] = []
    for text in reasoning:
        events.append(Delta(seq=len(events), reasoning=text, tokens=1))
    for text in content:
        events.append(Delta(seq=len(events), content=text, tokens=1))
    usage = Usage(prompt_tokens=7, completion_tokens=len(events))
    events.append(Finished(seq=len(events), finish_reason=reason, usage=usage))  # type: ignore[arg-type]
    return events


class FakeStream:
    """Yields its events; ``gate`` (when given) is awaited before each one so a test paces the stream;
    ``break_after`` raises StreamBroken after that many events."""

    def __init__(
        self,
        events: Sequence[Delta | Finished],
        *,
        gate: asyncio.Queue[None] | None = None,
        break_after: int = -1,
        step_seconds: float = 0.0,
    ) -> None:
        self._events = list(events)
        self._gate = gate
        self._break_after = break_after
        self._step_seconds = step_seconds  # a model's decode step: time between events
        self.closed = False

    async def events(self) -> AsyncIterator[Delta | Finished]:
        for i, event in enumerate(self._events):
            if i == self._break_after:
                raise StreamBroken("fake break")
            if self._gate is not None:
                await self._gate.get()
            if self._step_seconds:
                await asyncio.sleep(self._step_seconds)
            yield event
        if not self._events or not isinstance(self._events[-1], Finished):
            raise StreamBroken("fake stream ended early")

    async def aclose(self) -> None:
        self.closed = True


class FakeModel:
    """Re-attach serves the script after ``after``; cancel records the call and (optionally) ends the
    stream the runner has open with Finished(cancelled)."""

    def __init__(self, events: Sequence[Delta | Finished], *, known: bool = True, breaks: int = 0) -> None:
        self.events_script = list(events)
        self.known = known
        self.breaks = breaks  # how many re-attaches break again at once
        self.reattached: list[int] = []
        self.cancelled: list[str] = []
        self.cancel_called = asyncio.Event()

    async def events(self, url: str, request_id: str, after: int) -> FakeStream:
        from services.protocol.errors import NotFound

        if not self.known:
            raise NotFound("unknown request")
        self.reattached.append(after)
        rest = [e for e in self.events_script if e.seq > after]
        if self.breaks > 0:
            self.breaks -= 1
            return FakeStream(rest, break_after=0)
        return FakeStream(rest)

    async def cancel(self, url: str, request_id: str) -> paths.CancelResult | None:
        self.cancelled.append(request_id)
        self.cancel_called.set()
        return paths.CancelResult(request_id=request_id, status="cancelled")


class FlakyStore:
    """Wraps a real store and injects store failures: every call but ``wait`` fails while ``down``; the
    appends numbered in ``fail_appends`` (1-based) fail before writing; those in ``lose_answers`` are
    written and then fail (a commit whose answer was lost); those in ``late_commits`` fail at once and are
    written just before the next append runs (a write abandoned at its deadline that reaches the database
    later). ``failures`` counts every StoreUnavailable the caller saw, injected or real (SQLite locked past
    its busy timeout)."""

    def __init__(
        self,
        inner: SessionStore,
        *,
        fail_appends: Sequence[int] = (),
        lose_answers: Sequence[int] = (),
        late_commits: Sequence[int] = (),
    ) -> None:
        self.inner = inner
        self.down = False
        self.fail_appends = set(fail_appends)
        self.lose_answers = set(lose_answers)
        self.late_commits = set(late_commits)
        self._late: tuple[str, AppendBatch] | None = None
        self.appends = 0
        self.failures = 0
        self.claims_while_down = 0

    def _check(self) -> None:
        if self.down:
            self.failures += 1
            raise StoreUnavailable("injected outage")

    async def _call(self, name: str, *args: Any, **kw: Any) -> Any:
        self._check()
        try:
            return await getattr(self.inner, name)(*args, **kw)
        except StoreUnavailable:
            self.failures += 1
            raise

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        await self._call("ping")

    async def create(self, record: SessionRecord) -> None:
        await self._call("create", record)

    async def get(self, session_id: str) -> SessionRecord | None:
        return await self._call("get", session_id)

    async def append(self, session_id: str, batch: AppendBatch) -> None:
        self._check()
        self.appends += 1
        if self._late is not None:
            late, self._late = self._late, None
            with contextlib.suppress(AppendConflict):  # a stale late write changes nothing, as in SQL
                await self.inner.append(*late)
        if self.appends in self.late_commits:
            self._late = (session_id, batch)
            self.failures += 1
            raise StoreUnavailable(f"injected deadline of append {self.appends} (it commits later)")
        if self.appends in self.fail_appends:
            self.failures += 1
            raise StoreUnavailable(f"injected failure of append {self.appends}")
        await self._call("append", session_id, batch)
        if self.appends in self.lose_answers:
            self.failures += 1
            raise StoreUnavailable(f"injected lost answer of append {self.appends}")

    async def update(self, session_id: str, *, now: float, **fields: Any) -> None:
        await self._call("update", session_id, now=now, **fields)

    async def read(self, session_id: str, after: int, limit: int = 1000) -> list[StoredEvent]:
        return await self._call("read", session_id, after, limit)

    async def wait(self, session_id: str, after: int, timeout: float) -> None:  # noqa: ASYNC109
        if self.down:
            await asyncio.sleep(min(timeout, 0.01))  # a reader's long poll during an outage
            return
        await self.inner.wait(session_id, after, timeout)

    async def claim(
        self, session_id: str, runner_id: str, lease_seconds: float, now: float, **kw: Any
    ) -> bool:
        if self.down:
            self.claims_while_down += 1
        return await self._call("claim", session_id, runner_id, lease_seconds, now, **kw)

    async def release(self, session_id: str, runner_id: str) -> bool:
        return await self._call("release", session_id, runner_id)

    async def orphans(self, lapsed_before: float, limit: int) -> list[SessionRecord]:
        return await self._call("orphans", lapsed_before, limit)

    async def delete_expired(self, now: float, ttl_seconds: float) -> int:
        return await self._call("delete_expired", now, ttl_seconds)
