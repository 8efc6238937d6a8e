"""A small SSE reader for tests over httpx streams, and helpers to check streams against the contract."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from tests.api.openai_shapes import check_event_data


@dataclass
class SseEvent:
    id: str | None
    data: str

    @property
    def index(self) -> int:
        assert self.id is not None
        return int(self.id.rsplit(":", 1)[1])

    def json(self) -> Any:
        return json.loads(self.data)


def iter_sse(response: httpx.Response) -> Iterator[SseEvent | None]:
    """Events as they arrive; None for each comment line (``: ping``). Every event's data is checked
    against the OpenAI shapes (``openai_shapes.check_event_data``) on the way."""
    event_id: str | None = None
    data: list[str] = []
    for line in response.iter_lines():
        if line.startswith(":"):
            yield None
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            check_event_data("\n".join(data))
            yield SseEvent(event_id, "\n".join(data))
            event_id, data = None, []


def read_sse(response: httpx.Response, limit: int | None = None) -> list[SseEvent]:
    """All events (stop after ``limit`` events: the caller then drops the connection)."""
    events: list[SseEvent] = []
    for event in iter_sse(response):
        if event is None:
            continue
        events.append(event)
        if limit is not None and len(events) >= limit:
            break
    return events


def text_of(events: list[SseEvent]) -> tuple[str, str]:
    """(reasoning, content) concatenated over all chunks."""
    reasoning, content = [], []
    for event in events:
        if event.data == "[DONE]":
            continue
        for choice in event.json().get("choices", []):
            reasoning.append(choice["delta"].get("reasoning_content") or "")
            content.append(choice["delta"].get("content") or "")
    return "".join(reasoning), "".join(content)


def check_stream(events: list[SseEvent], session_id: str, first: int = 0) -> None:
    """Consecutive ids ``<sid>:<n>`` from ``first``, one chunk id, and the stream ends with [DONE]."""
    assert [e.id for e in events] == [f"{session_id}:{first + i}" for i in range(len(events))]
    assert events and events[-1].data == "[DONE]"
    ids = {e.json()["id"] for e in events[:-1] if "error" not in e.json()}
    assert len(ids) <= 1


def finish_reason(events: list[SseEvent]) -> str | None:
    for event in events:
        if event.data != "[DONE]" and "choices" in event.json():
            for choice in event.json()["choices"]:
                if choice.get("finish_reason"):
                    return choice["finish_reason"]
    return None
