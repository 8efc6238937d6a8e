"""The runner against typed fakes of the model stream and the in-memory store: batching, coalescing,
durable-before-visible, takeover without gap or duplicate, broken streams, lost leases."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import pytest

from services.api.metrics import ApiMetrics
from services.api.settings import ApiSettings
from services.api.store.base import AppendBatch, SessionRecord, StoredEvent
from services.api.store.memory import MemoryStore
from services.api.streaming.live import Attachments, LiveLog
from services.api.streaming.runner import RunnerDeps, SessionRunner
from services.api.streaming.translate import ChunkEncoder
from tests.api.fakes import FakeModel, FakeStream, script

pytestmark = pytest.mark.anyio

REASONING = [f"r{i} " for i in range(20)]
CONTENT = [f"c{i} " for i in range(20)]


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.appends: list[int] = []

    async def append(self, session_id: str, batch: AppendBatch) -> None:
        await super().append(session_id, batch)
        self.appends.append(len(batch.events))


def make_deps(store: MemoryStore, model: FakeModel, runner_id: str = "me", **overrides: Any) -> RunnerDeps:
    settings = ApiSettings(
        event_flush_ms=overrides.pop("event_flush_ms", 5),
        runner_lease_seconds=overrides.pop("runner_lease_seconds", 5),
        cancel_after_disconnect_seconds=overrides.pop("cancel_after_disconnect_seconds", 0),
        **overrides,
    )
    return RunnerDeps(store, model, ApiMetrics(), settings, Attachments(), runner_id)  # type: ignore[arg-type]


def new_record(sid: str = "s1", include_usage: bool = True) -> SessionRecord:
    now = time.time()
    meta = {"chunk_id": "chatcmpl-t", "created": 1, "model": "m", "include_usage": include_usage}
    return SessionRecord(
        id=sid,
        owner="",
        created=now,
        updated=now,
        model_url="http://m",
        model_request_id="rid",
        runner_id="me",
        lease_until=now + 5,
        reader_seen_at=now,
        meta=meta,
    )


def texts(events: Sequence[StoredEvent]) -> tuple[str, str]:
    reasoning, content = [], []
    for e in events:
        if e.data == "[DONE]":
            continue
        for choice in json.loads(e.data).get("choices", []):
            reasoning.append(choice["delta"].get("reasoning_content", ""))
            content.append(choice["delta"].get("content", ""))
    return "".join(reasoning), "".join(content)


async def run_fresh(store: MemoryStore, stream: FakeStream, model: FakeModel | None = None) -> SessionRecord:
    record = new_record()
    await store.create(record)
    runner = SessionRunner(make_deps(store, model or FakeModel([])), record, LiveLog(record.id, 0), stream)
    await asyncio.wait_for(runner.run(), 10)
    stored = await store.get(record.id)
    assert stored is not None
    return stored


async def test_a_burst_is_coalesced_into_few_chunks_and_few_writes() -> None:
    store = CountingStore()
    record = await run_fresh(store, FakeStream(script(REASONING, CONTENT)))
    events = await store.read("s1", -1)
    assert [e.index for e in events] == list(range(len(events)))
    # role, one reasoning chunk, one content chunk, finish, usage, [DONE]
    assert len(events) == 6, [e.data[-80:] for e in events]
    assert texts(events) == ("".join(REASONING), "".join(CONTENT))
    assert len(store.appends) <= 3
    assert record.status == "completed" and record.finish_reason == "stop"
    assert record.usage == {
        "prompt_tokens": 7,
        "completion_tokens": 40,
        "total_tokens": 47,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert record.model_seq == 40
    assert json.loads(events[-2].data)["usage"]["total_tokens"] == 47
    assert events[-1].data == "[DONE]"


async def test_a_paced_stream_is_written_in_batches_and_published_only_when_stored() -> None:
    store = CountingStore()
    gate: asyncio.Queue[None] = asyncio.Queue()
    record = new_record()
    await store.create(record)
    live = LiveLog(record.id, 0)
    # a batching interval well above the pacing (1 ms + a store read per token), so that a slow machine
    # still gathers several tokens per write
    deps = make_deps(store, FakeModel([]), event_flush_ms=50)
    runner = SessionRunner(deps, record, live, FakeStream(script(REASONING, []), gate=gate))
    task = asyncio.create_task(runner.run())
    for _ in range(len(REASONING) + 1):
        gate.put_nowait(None)
        await asyncio.sleep(0.001)
        # everything a same-process reader can see is already in the store
        assert record.id and live.next_index <= (await store.get(record.id)).last_index + 1  # type: ignore[union-attr]
    await asyncio.wait_for(task, 10)
    events = await store.read(record.id, -1)
    assert texts(events)[0] == "".join(REASONING)
    assert len(store.appends) < len(REASONING)  # never one write per token
    assert [e.data for e in live.since(0)] == [e.data for e in events]


async def test_the_first_text_is_not_held_back_by_the_batching_interval() -> None:
    store = CountingStore()
    gate: asyncio.Queue[None] = asyncio.Queue()
    record = new_record()
    await store.create(record)
    live = LiveLog(record.id, 0)
    deps = make_deps(store, FakeModel([]), event_flush_ms=1000)  # the longest interval the settings allow
    runner = SessionRunner(deps, record, live, FakeStream(script(REASONING[:2], []), gate=gate))
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(live.wait(0, 5), 5)  # the role chunk goes out at once
    assert live.next_index == 1
    started = time.monotonic()
    gate.put_nowait(None)  # the first token
    while live.next_index < 2:
        await live.wait(live.next_index, 5)
    assert time.monotonic() - started < 0.5, "the first text waited for the flush interval"
    assert texts(live.since(0))[0] == REASONING[0]
    gate.put_nowait(None)
    gate.put_nowait(None)  # the second token and Finished: the final events go out at once too
    await asyncio.wait_for(task, 0.9)
    assert texts(await store.read(record.id, -1))[0] == "".join(REASONING[:2])


async def test_takeover_continues_after_the_stored_model_seq_without_gap_or_duplicate() -> None:
    events = script(REASONING, CONTENT)
    store = MemoryStore()
    await store.create(new_record())
    # what a runner that died had stored: the role chunk and the text of model seq 0..14
    enc = ChunkEncoder("chatcmpl-t", 1, "m")
    kept = [StoredEvent(0, enc.role()), StoredEvent(1, enc.reasoning("".join(REASONING[:15])))]
    await store.append("s1", AppendBatch(kept, model_seq=14, status="running", now=time.time()))
    stale = await store.get("s1")
    assert stale is not None
    model = FakeModel(events)
    await store.claim("s1", "other", 5, time.time(), takeover_from="me")  # as the hub does first
    runner = SessionRunner(make_deps(store, model, runner_id="other"), stale, LiveLog("s1", 2), None)
    await asyncio.wait_for(runner.run(), 10)
    assert model.reattached == [14]
    all_events = await store.read("s1", -1)
    assert [e.index for e in all_events] == list(range(len(all_events)))
    assert texts(all_events) == ("".join(REASONING), "".join(CONTENT))
    assert all_events[-1].data == "[DONE]"


async def test_a_broken_stream_is_reattached_once_then_fails_with_an_error_event() -> None:
    events = script(REASONING, CONTENT)
    store = MemoryStore()
    record = await run_fresh(store, FakeStream(events, break_after=10), FakeModel(events))
    stored = await store.read("s1", -1)
    assert record.status == "completed"
    assert texts(stored) == ("".join(REASONING), "".join(CONTENT))

    store = MemoryStore()
    record = await run_fresh(store, FakeStream(events, break_after=10), FakeModel(events, breaks=1))
    stored = await store.read("s1", -1)
    assert record.status == "failed"
    assert json.loads(stored[-2].data)["error"]["code"] == "model_stream_broken"
    assert stored[-1].data == "[DONE]"


async def test_reattach_to_a_request_the_model_forgot_fails_the_session() -> None:
    store = MemoryStore()
    record = new_record()
    await store.create(record)
    runner = SessionRunner(make_deps(store, FakeModel([], known=False)), record, LiveLog("s1", 0), None)
    await asyncio.wait_for(runner.run(), 10)
    stored = await store.read("s1", -1)
    assert (await store.get("s1")).status == "failed"  # type: ignore[union-attr]
    assert json.loads(stored[-2].data)["error"]["code"] == "generation_lost"


async def test_a_runner_that_lost_its_lease_stops_without_writing() -> None:
    store = MemoryStore()
    gate: asyncio.Queue[None] = asyncio.Queue()
    record = new_record()
    await store.create(record)
    deps = make_deps(store, FakeModel([]), runner_lease_seconds=0.5)
    runner = SessionRunner(deps, record, LiveLog("s1", 0), FakeStream(script(REASONING, []), gate=gate))
    task = asyncio.create_task(runner.run())
    gate.put_nowait(None)
    # another process took over (as after a lapse) and wrote an event of its own
    await store.update("s1", now=time.time(), runner_id="thief", lease_until=time.time() + 60)
    await asyncio.wait_for(task, 5)
    assert (await store.get("s1")).runner_id == "thief"  # type: ignore[union-attr]


async def test_auto_cancel_fires_when_nobody_is_attached() -> None:
    store = MemoryStore()
    gate: asyncio.Queue[None] = asyncio.Queue()
    record = new_record()
    record.reader_seen_at = time.time() - 100
    await store.create(record)
    model = FakeModel([])
    deps = make_deps(store, model, cancel_after_disconnect_seconds=0.2, runner_lease_seconds=0.6)
    runner = SessionRunner(deps, record, LiveLog("s1", 0), FakeStream(script(REASONING, []), gate=gate))
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(model.cancel_called.wait(), 5)
    assert model.cancelled == ["rid"] and runner.auto_cancelled
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(("after", "cancels"), [(0.0, False), (5.0, True)])
async def test_cancel_after_disconnect_zero_disables_auto_cancel(after: float, cancels: bool) -> None:
    store = MemoryStore()
    record = new_record()
    record.reader_seen_at = time.time() - 100
    await store.create(record)
    model = FakeModel([])
    deps = make_deps(store, model, cancel_after_disconnect_seconds=after)
    runner = SessionRunner(deps, record, LiveLog("s1", 0), None)
    runner._since = time.monotonic() - 100  # nobody attached anywhere for 100 s
    await runner._maybe_auto_cancel()
    assert runner.auto_cancelled is cancels and (model.cancelled == ["rid"]) is cancels
