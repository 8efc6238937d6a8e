"""The runner with n > 1 (a fake model stream): each choice's chunks carry its index, start with its role and
end with its own finish chunk; tool calls are parsed per choice; a takeover after any model event rebuilds
exactly what an uninterrupted run stores (calls and ended choices recounted from the stored chunks)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from services.api.store.memory import MemoryStore
from services.api.streaming.collect import _Folded
from services.api.streaming.live import LiveLog
from services.api.streaming.runner import SessionRunner
from services.protocol.events import Delta, Finished, Usage
from tests.api.fakes import FakeModel, FakeStream
from tests.api.test_runner import make_deps, new_record
from tests.api.test_toolcalls import ANSWER, NAMES, killed_after

OTHER = 'Sure. <tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call> ok'


def two_choices(piece: int = 7) -> list[Delta | Finished]:
    """Choice 0 answers ANSWER, choice 1 OTHER, their deltas interleaved; choice 1 ends first (length),
    choice 0 at the end (stop), then Finished."""
    events: list[Delta | Finished] = [
        Delta(seq=0, index=0, reasoning="thinking", tokens=1),
        Delta(seq=1, index=1, reasoning="pondering", tokens=1),
    ]
    a = [ANSWER[i : i + piece] for i in range(0, len(ANSWER), piece)]
    b = [OTHER[i : i + piece] for i in range(0, len(OTHER), piece)]
    for i in range(max(len(a), len(b))):
        for index, parts in ((0, a), (1, b)):
            if i < len(parts):
                end = "length" if index == 1 and i == len(parts) - 1 else None
                events.append(
                    Delta(seq=len(events), index=index, content=parts[i], tokens=1, finish_reason=end)
                )
    events.append(Delta(seq=len(events), index=0, tokens=1, finish_reason="stop"))
    usage = Usage(prompt_tokens=5, completion_tokens=len(events))
    events.append(Finished(seq=len(events), finish_reason="length", usage=usage))
    return events


def record() -> Any:
    rec = new_record(include_usage=True)
    rec.meta["tools"] = list(NAMES)
    rec.meta["n"] = 2
    return rec


async def fold(store: MemoryStore) -> list[dict[str, Any]]:
    events = await store.read("s1", -1)
    assert [e.index for e in events] == list(range(len(events)))
    folded = _Folded()
    seen: dict[int, list[str]] = {}
    for event in events:
        if event.data == "[DONE]":
            continue
        chunk = json.loads(event.data)
        folded.add(chunk)
        for choice in chunk["choices"]:
            kinds = seen.setdefault(choice["index"], [])
            kinds.append("finish" if choice["finish_reason"] else next(iter(choice["delta"]), "empty"))
    for kinds in seen.values():  # every choice: its role first, its one finish chunk last
        assert kinds[0] == "role" and kinds[-1] == "finish" and kinds.count("finish") == 1, kinds
    assert folded.usage is not None and folded.usage["completion_tokens"] > 0
    return folded.response_choices()


@pytest.mark.anyio
async def test_two_choices_each_with_their_calls_and_finish() -> None:
    store = MemoryStore()
    await store.create(record())
    runner = SessionRunner(
        make_deps(store, FakeModel([])), record(), LiveLog("s1", 0), FakeStream(two_choices())
    )
    await asyncio.wait_for(runner.run(), 10)
    first, second = await fold(store)
    assert first["finish_reason"] == "tool_calls" and second["finish_reason"] == "length"
    assert [c["function"]["name"] for c in first["message"]["tool_calls"]] == ["get_weather", "get_time"]
    assert [c["function"]["arguments"] for c in second["message"]["tool_calls"]] == ['{"tz": "UTC"}']
    ids = [c["id"] for choice in (first, second) for c in choice["message"]["tool_calls"]]
    assert len(set(ids)) == 3
    assert (
        second["message"]["content"] == "Sure.  ok" and second["message"]["reasoning_content"] == "pondering"
    )
    stored = await store.get("s1")
    assert stored is not None and stored.status == "completed" and stored.finish_reason == "length"


@pytest.mark.anyio
async def test_a_takeover_after_any_model_event_rebuilds_every_choice() -> None:
    events = two_choices()
    store = MemoryStore()
    await store.create(record())
    whole = SessionRunner(make_deps(store, FakeModel([])), record(), LiveLog("s1", 0), FakeStream(events))
    await asyncio.wait_for(whole.run(), 10)
    expected = await fold(store)
    for k in range(1, len(events) - 1):
        store, stale = await killed_after(events, record(), k)
        taker = SessionRunner(
            make_deps(store, FakeModel(events), runner_id="other"),
            stale,
            LiveLog("s1", stale.last_index + 1),
            None,
        )
        await asyncio.wait_for(taker.run(), 10)
        assert await fold(store) == expected, k
