"""Tool calls in the answer: the parser (every split of the text gives the same items) and the runner
(OpenAI-shaped fragments, ``tool_calls`` finish reason, a takeover after any model event rebuilds exactly
the chunks an uninterrupted run stores)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Sequence
from typing import Any

import pytest

from services.api.store.base import StoredEvent
from services.api.store.memory import MemoryStore
from services.api.streaming.collect import _Folded
from services.api.streaming.live import LiveLog
from services.api.streaming.runner import SessionRunner
from services.api.streaming.toolcalls import MAX_BLOCK_CHARS, Call, ToolCallParser, call_id
from services.protocol.events import Delta, Finished, Usage
from tests.api.fakes import FakeModel, FakeStream
from tests.api.test_runner import make_deps, new_record

ANSWER = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call> done <tool_call>{"name": "get_time"'
)
NAMES = ("get_weather", "get_time")


def parse_in_pieces(text: str, cuts: Sequence[int]) -> list[str | Call]:
    parser = ToolCallParser(NAMES)
    items: list[str | Call] = []
    bounds = [0, *cuts, len(text)]
    for a, b in itertools.pairwise(bounds):
        items.extend(parser.feed(text[a:b]))
    items.extend(parser.finish())
    merged: list[str | Call] = []
    for item in items:
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] += item
        else:
            merged.append(item)
    return merged


def test_calls_are_parsed_and_everything_else_is_kept_as_text() -> None:
    items = parse_in_pieces(ANSWER, [])
    assert items == [
        "Let me check.\n",
        Call("get_weather", '{"city": "Paris", "unit": "c"}'),
        '\n<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',  # unknown tool: plain text
        Call("get_time", "{}"),
        ' done <tool_call>{"name": "get_time"',  # never closed: plain text, nothing lost
    ]


def test_every_split_of_the_text_gives_the_same_items() -> None:
    whole = parse_in_pieces(ANSWER, [])
    for cut in range(1, len(ANSWER)):
        assert parse_in_pieces(ANSWER, [cut]) == whole, cut
    assert parse_in_pieces(ANSWER, list(range(1, len(ANSWER)))) == whole  # one character at a time


def test_text_is_held_back_only_while_a_tag_is_undecided() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("hello <tool") == ["hello "]
    assert not parser.clean
    assert parser.feed("s> and more") == ["<tools> and more"]
    assert parser.clean
    assert parser.feed('<tool_call>{"name":"get_time","arguments":"{\\"a\\": 1}"}') == []
    assert parser.feed("</tool_call>") == [Call("get_time", '{"a": 1}')]
    assert parser.feed("<tool_call>[1, 2]</tool_call>") == ["<tool_call>[1, 2]</tool_call>"]


def answer_events(text: str, piece: int = 3) -> list[Delta | Finished]:
    events: list[Delta | Finished] = [Delta(seq=0, reasoning="thinking", tokens=1)]
    for i in range(0, len(text), piece):
        events.append(Delta(seq=len(events), content=text[i : i + piece], tokens=1))
    usage = Usage(prompt_tokens=5, completion_tokens=len(events))
    events.append(Finished(seq=len(events), finish_reason="stop", usage=usage))
    return events


def tool_record() -> Any:
    record = new_record(include_usage=False)
    record.meta["tools"] = list(NAMES)
    return record


async def fold(store: MemoryStore) -> tuple[list[StoredEvent], dict[str, Any]]:
    events = await store.read("s1", -1)
    assert [e.index for e in events] == list(range(len(events)))
    folded = _Folded()
    for event in events:
        if event.data != "[DONE]":
            folded.add(json.loads(event.data))
    (choice,) = folded.response_choices()
    return events, {"message": choice["message"], "finish_reason": choice["finish_reason"]}


@pytest.mark.anyio
async def test_the_runner_streams_openai_fragments_and_finishes_with_tool_calls() -> None:
    store = MemoryStore()
    record = tool_record()
    await store.create(record)
    runner = SessionRunner(
        make_deps(store, FakeModel([])), record, LiveLog("s1", 0), FakeStream(answer_events(ANSWER))
    )
    await asyncio.wait_for(runner.run(), 10)
    events, result = await fold(store)
    assert result["finish_reason"] == "tool_calls"
    calls = result["message"]["tool_calls"]
    assert calls == [
        {
            "id": call_id("chatcmpl-t", 0),
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
        },
        {
            "id": call_id("chatcmpl-t", 1),
            "type": "function",
            "function": {"name": "get_time", "arguments": "{}"},
        },
    ]
    first = [json.loads(e.data)["choices"][0]["delta"] for e in events[:-1] if '"tool_calls"' in e.data]
    assert first[0]["tool_calls"][0] == {
        "index": 0,
        "id": calls[0]["id"],
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert first[1]["tool_calls"][0] == {
        "index": 0,
        "function": {"arguments": '{"city": "Paris", "unit": "c"}'},
    }
    assert '"nope"' in result["message"]["content"] and "done" in result["message"]["content"]
    assert (await store.get("s1")).finish_reason == "tool_calls"  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_a_takeover_after_any_model_event_rebuilds_the_same_result() -> None:
    events = answer_events(ANSWER, piece=7)
    store = MemoryStore()
    await store.create(tool_record())
    whole = SessionRunner(
        make_deps(store, FakeModel([])), tool_record(), LiveLog("s1", 0), FakeStream(events)
    )
    await asyncio.wait_for(whole.run(), 10)
    _, expected = await fold(store)
    held_back = 0  # takeovers that re-folded events the dead runner had seen (a tag or block was held)
    for k in range(1, len(events) - 1):
        store, stale = await killed_after(events, tool_record(), k)
        model = FakeModel(events)
        taker = SessionRunner(
            make_deps(store, model, runner_id="other"), stale, LiveLog("s1", stale.last_index + 1), None
        )
        await asyncio.wait_for(taker.run(), 10)
        _, result = await fold(store)
        assert result == expected, k
        held_back += model.reattached[0] < k - 1
    assert held_back > 5


async def killed_after(events: list[Delta | Finished], first: Any, k: int) -> tuple[MemoryStore, Any]:
    """A runner of session ``first`` (id "s1") that folded ``k`` model events, then died (cancelled: what it
    had not stored is lost); the session is claimed by runner "other". Returns the store and the stale
    record."""
    store = MemoryStore()
    await store.create(first)
    gate: asyncio.Queue[None] = asyncio.Queue()
    runner = SessionRunner(
        make_deps(store, FakeModel([])), first, LiveLog("s1", 0), FakeStream(events, gate=gate)
    )
    task = asyncio.create_task(runner.run())
    for _ in range(k):
        gate.put_nowait(None)
    await wait_stored(store, gate)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    stale = await store.get("s1")
    assert stale is not None
    await store.claim("s1", "other", 5, time.time(), takeover_from=stale.runner_id)
    return store, stale


async def wait_stored(store: MemoryStore, gate: asyncio.Queue[None]) -> None:
    """Until the runner consumed its gate and the store stopped changing (a few flush intervals)."""
    deadline = time.monotonic() + 5
    last = None
    while time.monotonic() < deadline:
        record = await store.get("s1")
        now = (gate.qsize(), record.last_index if record else None)
        if now == last and gate.empty():
            return
        last = now
        await asyncio.sleep(0.03)
    raise AssertionError("the runner did not settle")


HOSTILE = [
    '{"name": {"get_time": 1}, "arguments": {}}',  # a name that is not a string (unhashable)
    '{"name": ["get_time"], "arguments": {}}',
    '{"name": "get_time", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}",  # deeper than any parser
    '{"name": "get_time", "arguments": "' + "[" * 100_000 + "]" * 100_000 + '"}',  # deep JSON in a string
    "{" * 50_000,
]


def test_hostile_blocks_are_plain_content_and_never_raise() -> None:
    for body in HOSTILE:
        block = f"<tool_call>{body}</tool_call>"
        assert parse_in_pieces(block, []) == [block], body[:40]
    ok = '{"name": "get_time", "arguments": {"a": [[["]]]]"]]]}}'  # brackets inside strings do not count
    assert parse_in_pieces(f"<tool_call>{ok}</tool_call>", []) == [Call("get_time", '{"a": [[["]]]]"]]]}')]
    lone = '{"name": "get_time", "arguments": {"a": "\\ud800"}}'  # a lone surrogate stays escaped
    assert parse_in_pieces(f"<tool_call>{lone}</tool_call>", []) == [Call("get_time", '{"a": "\\ud800"}')]


def test_a_block_longer_than_the_bound_is_released_as_content_while_it_streams() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("<tool_call>" + "x" * 1000) == []
    out = parser.feed("y" * MAX_BLOCK_CHARS)
    assert out == ["<tool_call>" + "x" * 1000 + "y" * MAX_BLOCK_CHARS] and parser.clean
    tail = '{"name": "get_time"}</tool_call>'
    assert parser.feed(tail) + parser.finish() == [tail]


@pytest.mark.anyio
async def test_the_runner_survives_hostile_blocks() -> None:
    answer = "".join(f"<tool_call>{b}</tool_call>" for b in HOSTILE)
    answer += '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    store = MemoryStore()
    record = tool_record()
    await store.create(record)
    stream = FakeStream(answer_events(answer, piece=4096))
    runner = SessionRunner(make_deps(store, FakeModel([])), record, LiveLog("s1", 0), stream)
    await asyncio.wait_for(runner.run(), 30)
    _, result = await fold(store)
    assert result["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in result["message"]["tool_calls"]] == ["get_time"]
    assert result["message"]["content"] == "".join(f"<tool_call>{b}</tool_call>" for b in HOSTILE)


def test_one_call_at_most_when_parallel_calls_are_off() -> None:
    parser = ToolCallParser(NAMES, max_calls=1)
    two = '<tool_call>{"name": "get_time"}</tool_call> and <tool_call>{"name": "get_time"}</tool_call>'
    assert parser.feed(two) == [Call("get_time", "{}"), ' and <tool_call>{"name": "get_time"}</tool_call>']
    taken_over = ToolCallParser(NAMES, max_calls=1)
    taken_over.calls = 1  # a takeover: one call is stored already
    assert taken_over.feed(two) == [two]


@pytest.mark.anyio
async def test_the_runner_makes_one_call_when_parallel_calls_are_off_even_after_a_takeover() -> None:
    answer = '<tool_call>{"name": "get_time"}</tool_call>' + '<tool_call>{"name": "get_weather"}</tool_call>'
    events = answer_events(answer, piece=9)
    store = MemoryStore()
    record = tool_record()
    record.meta["parallel_tool_calls"] = False
    await store.create(record)
    runner = SessionRunner(make_deps(store, FakeModel([])), record, LiveLog("s1", 0), FakeStream(events))
    await asyncio.wait_for(runner.run(), 10)
    _, expected = await fold(store)
    assert [c["function"]["name"] for c in expected["message"]["tool_calls"]] == ["get_time"]
    assert expected["message"]["content"] == '<tool_call>{"name": "get_weather"}</tool_call>'
    for k in range(1, len(events) - 1):
        first = tool_record()
        first.meta["parallel_tool_calls"] = False
        store, stale = await killed_after(events, first, k)
        taker = SessionRunner(
            make_deps(store, FakeModel(events), runner_id="other"),
            stale,
            LiveLog("s1", stale.last_index + 1),
            None,
        )
        await asyncio.wait_for(taker.run(), 10)
        assert (await fold(store))[1] == expected, k
