"""Following a session: the stored events after an index, then the live tail, until ``[DONE]``.

Same-process readers of a running session follow its ``LiveLog`` (no database hop); others read the store
and ``wait`` on it. A reader that finds the session running with a lapsed lease takes it over (the hub
re-attaches to the model replica), so a resume after a crash continues with the next index.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator

from services.api.store.base import FINAL_STATUSES, StoredEvent
from services.api.streaming.hub import SessionHub, reader_heartbeat_seconds
from services.api.streaming.translate import DONE


class LastEventIdError(ValueError):
    pass


# ``<session_id>:<index>`` or ``<index>``; ASCII digits only (``str.isdigit`` takes "²", ``int`` does not),
# at most 19 of them, and the value itself is checked against int64 below. -1 means "before the first event".
_LAST_EVENT_ID = re.compile(r"(?:([A-Za-z0-9_-]{1,128}):)?(-1|[0-9]{1,19})", re.ASCII)
MAX_INDEX = 2**63 - 1


def parse_last_event_id(value: str | None, session_id: str | None) -> tuple[str | None, int]:
    """``<sid>:<n>`` or a bare ``<n>`` -> (sid or None, n). None/empty -> (None, -1): from the first event.

    Raises ``LastEventIdError`` for anything else: a malformed value, a session id outside the id rules, an
    index beyond int64, or an id that names another session than ``session_id``."""
    if value is None or not value.strip():
        return None, -1
    match = _LAST_EVENT_ID.fullmatch(value.strip())
    if match is None or int(match.group(2)) > MAX_INDEX:
        raise LastEventIdError(
            "Last-Event-ID must be `<session_id>:<index>` or `<index>`, "
            "the index an integer from -1 to 2^63-1"
        )
    sid, index = match.group(1), int(match.group(2))
    if sid is not None and session_id is not None and sid != session_id:
        raise LastEventIdError("Last-Event-ID belongs to another session")
    return sid, index


async def follow(hub: SessionHub, session_id: str, after: int) -> AsyncIterator[StoredEvent | None]:
    """Yield the events with index > ``after`` in order, then stop after ``[DONE]`` (or when the session
    is final and fully read). Yields None whenever nothing came for SSE_PING_SECONDS (send a ping)."""
    settings = hub.settings
    beat_every = reader_heartbeat_seconds(settings.cancel_after_disconnect_seconds)
    next_index = after + 1
    last_yield = time.monotonic()
    last_beat = -math.inf  # present once the first look shows a live session (``read_elsewhere``)
    hub.attachments.attach(session_id)
    try:
        while True:
            now = time.monotonic()
            first = last_beat == -math.inf
            beat_left = beat_every - (now - last_beat)  # the next mark is due within one beat, not two
            timeout = max(0.01, min(settings.sse_ping_seconds - (now - last_yield), beat_left))
            events, ended = await _step(hub, session_id, next_index, 0.01 if first else timeout)
            for event in events:
                yield event
                if event.data == DONE:
                    return
            if ended:
                return  # a finished session read in one go (up to 1000 events) writes nothing
            now = time.monotonic()
            if first or now - last_beat >= beat_every:
                last_beat = now
                if not hub.runs_locally(session_id):
                    await hub.heartbeat(session_id)
            if events:
                next_index = events[-1].index + 1
                last_yield = time.monotonic()
            elif time.monotonic() - last_yield >= settings.sse_ping_seconds:
                yield None
                last_yield = time.monotonic()
    finally:
        hub.attachments.detach(session_id)


async def _step(
    hub: SessionHub, session_id: str, next_index: int, within: float
) -> tuple[list[StoredEvent], bool]:
    """The next events from ``next_index`` (waiting up to ``within`` seconds for them), and whether the
    session ended without more events."""
    live = hub.live(session_id)
    if live is not None and live.covers(next_index):
        events = live.since(next_index)
        if not events and not live.closed:
            await live.wait(next_index, within)
            events = live.since(next_index)
        if events or not live.closed:
            return events, False
        # the runner stopped here without more events (lease lost, shutdown): the store has the truth
    events = await hub.store.read(session_id, next_index - 1)
    if events:
        return events, False
    record = await hub.store.get(session_id)
    if record is None:
        return [], True
    if record.status in FINAL_STATUSES and record.last_index < next_index:
        return [], True
    await hub.ensure_runner(record)  # nobody runs it (lapsed lease, dead owner process): run it here
    if hub.runs_locally(session_id):
        return [], False
    await hub.store.wait(session_id, next_index - 1, min(within, hub.settings.runner_lease_seconds / 2))
    return [], False
