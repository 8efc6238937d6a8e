"""Typed fakes for fast unit tests of the runner and hub (same protocol as ModelClient's streams)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from services.api.model_client import StreamBroken
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
    ) -> None:
        self._events = list(events)
        self._gate = gate
        self._break_after = break_after
        self.closed = False

    async def events(self) -> AsyncIterator[Delta | Finished]:
        for i, event in enumerate(self._events):
            if i == self._break_after:
                raise StreamBroken("fake break")
            if self._gate is not None:
                await self._gate.get()
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
