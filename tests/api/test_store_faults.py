"""Store failures under the real runner and the real SQLite store: a failed write is retried (with what
arrived meanwhile) until it succeeds, an answer lost after a commit never duplicates an event, an outage
during which the generation ends still stores its tail and [DONE], SQLite locked past its busy timeout takes
the same path, and a store down past STORE_RETRY_SECONDS hands the session over to a takeover that
completes it once the store answers again."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.api.metrics import ApiMetrics
from services.api.settings import ApiSettings
from services.api.store.base import SessionStore, StoredEvent
from services.api.store.sqlite import SqliteStore
from services.api.streaming.hub import SessionHub
from services.api.streaming.live import LiveLog
from services.api.streaming.runner import SessionRunner
from tests.api.fakes import FakeModel, FakeStream, FlakyStore, script
from tests.api.test_runner import CONTENT, REASONING, make_deps, new_record, texts

pytestmark = pytest.mark.anyio

EVENTS = script(REASONING, CONTENT)


def check_complete(events: list[StoredEvent], include_usage: bool = True) -> None:
    """Indexes 0..n without gap or duplicate, the whole text once, finish, usage and exactly one [DONE]."""
    assert [e.index for e in events] == list(range(len(events)))
    assert [e.data for e in events].count("[DONE]") == 1 and events[-1].data == "[DONE]"
    assert texts(events) == ("".join(REASONING), "".join(CONTENT))
    chunks = [json.loads(e.data) for e in events[:-1]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert [f for f in finishes if f] == ["stop"]
    assert [c["usage"]["total_tokens"] for c in chunks if c.get("usage")] == ([47] if include_usage else [])


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def sqlite_store(tmp_path: Path, **kw: Any) -> SqliteStore:
    store = SqliteStore(str(tmp_path / "sessions.db"), poll_interval=0.02, **kw)
    await store.open()
    return store


async def run_runner(
    store: SessionStore, stream: FakeStream, **settings: Any
) -> tuple[SessionRunner, LiveLog]:
    record = new_record()
    await store.create(record)
    live = LiveLog(record.id, 0)
    runner = SessionRunner(make_deps(store, FakeModel([]), **settings), record, live, stream)  # type: ignore[arg-type]
    await asyncio.wait_for(runner.run(), 20)
    return runner, live


@pytest.mark.parametrize(
    ("fail", "lose", "late"),
    [
        ((1,), (), ()),  # the role chunk
        ((2,), (), ()),
        ((3, 4, 5, 6), (), ()),  # the Nth..N+k-th
        ((), (2,), ()),  # stored, answer lost
        ((), (3,), ()),
        ((4, 5), (3,), ()),  # a lost answer, then the retries fail too
        ((), (), (2,)),  # abandoned at its deadline, committed after the runner looked: one conflict
        ((), (), (3, 4)),  # ... twice in a row
    ],
)
async def test_failed_writes_are_retried_until_every_event_is_stored_once(
    tmp_path: Path, fail: tuple[int, ...], lose: tuple[int, ...], late: tuple[int, ...]
) -> None:
    inner = await sqlite_store(tmp_path)
    store = FlakyStore(inner, fail_appends=fail, lose_answers=lose, late_commits=late)
    try:
        runner, live = await run_runner(store, FakeStream(EVENTS, step_seconds=0.004))  # type: ignore[arg-type]
        events = await inner.read("s1", -1)
        check_complete(events)
        assert store.failures == len(fail) + len(lose) + len(late)
        assert [e.data for e in live.since(0)] == [e.data for e in events]  # readers saw each once
        record = await inner.get("s1")
        assert record is not None and record.status == "completed" and record.model_seq == 40
        assert not runner.handed_over
    finally:
        await inner.close()


async def test_an_outage_during_which_the_generation_ends_stores_the_tail_when_the_store_returns(
    tmp_path: Path,
) -> None:
    """The issue's case: the last events, finish_reason, usage and [DONE] arrive while the store is down."""
    inner = await sqlite_store(tmp_path)
    store = FlakyStore(inner)
    gate: asyncio.Queue[None] = asyncio.Queue()
    record = new_record()
    await store.create(record)
    live = LiveLog(record.id, 0)
    deps = make_deps(store, FakeModel([]))  # type: ignore[arg-type]
    runner = SessionRunner(deps, record, live, FakeStream(EVENTS, gate=gate))
    task = asyncio.create_task(runner.run())
    try:
        for _ in range(10):
            gate.put_nowait(None)
        await until(lambda: live.next_index >= 2)
        store.down = True
        for _ in range(5):
            gate.put_nowait(None)
        await until(lambda: store.failures >= 1)  # a batch failed ...
        for _ in range(len(EVENTS) - 15):
            gate.put_nowait(None)  # ... and then the rest, with the end of the generation, arrives
        await until(lambda: store.failures >= 4)  # the flusher keeps retrying through the outage
        assert not task.done()
        store.down = False
        await asyncio.wait_for(task, 10)
        events = await inner.read("s1", -1)
        check_complete(events)
        assert (await inner.get("s1")).status == "completed"  # type: ignore[union-attr]
    finally:
        task.cancel()
        await inner.close()


async def test_sqlite_locked_past_its_busy_timeout_is_retried(tmp_path: Path) -> None:
    inner = await sqlite_store(tmp_path, busy_timeout=0.05)
    store = FlakyStore(inner)
    gate: asyncio.Queue[None] = asyncio.Queue()
    record = new_record()
    await store.create(record)
    live = LiveLog(record.id, 0)
    runner = SessionRunner(make_deps(store, FakeModel([])), record, live, FakeStream(EVENTS, gate=gate))  # type: ignore[arg-type]
    task = asyncio.create_task(runner.run())
    locker = sqlite3.connect(tmp_path / "sessions.db", isolation_level=None)
    try:
        gate.put_nowait(None)
        await until(lambda: live.next_index >= 2)
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        gate.put_nowait(None)
        await until(lambda: store.failures >= 1)  # a real "database is locked" error
        for _ in range(len(EVENTS) - 2):
            gate.put_nowait(None)
        await until(lambda: store.failures >= 3)
        locker.execute("ROLLBACK")
        await asyncio.wait_for(task, 10)
        check_complete(await inner.read("s1", -1))
    finally:
        task.cancel()
        locker.close()
        await inner.close()


async def test_a_store_down_past_the_bound_hands_over_and_is_taken_over_when_it_returns(
    tmp_path: Path,
) -> None:
    inner = await sqlite_store(tmp_path)
    store = FlakyStore(inner)
    model = FakeModel(EVENTS)
    settings = ApiSettings(
        event_flush_ms=5, runner_lease_seconds=5, cancel_after_disconnect_seconds=0, store_retry_seconds=0.3
    )
    hub = SessionHub(settings, store, model, ApiMetrics())  # type: ignore[arg-type]
    record = new_record()
    record.runner_id = hub.runner_id
    await store.create(record)
    gate: asyncio.Queue[None] = asyncio.Queue()
    try:
        hub._start(record, FakeStream(EVENTS, gate=gate), None)
        first = hub._running["s1"]
        for _ in range(10):
            gate.put_nowait(None)
        await until(lambda: first.live.next_index >= 2)
        store.down = True
        for _ in range(len(EVENTS) - 10):
            gate.put_nowait(None)
        await asyncio.wait_for(first.task, 10)
        assert first.runner.handed_over and first.live.final_status is None
        claims = store.claims_while_down
        await asyncio.sleep(0.5)  # nothing renews the lease of a runner that handed over
        assert store.claims_while_down == claims
        stored = await inner.get("s1")
        assert stored is not None and stored.status != "completed"
        store.down = False
        deadline = time.monotonic() + 10  # the hub's own retry takes it over, with no reader attached
        while (await inner.get("s1")).status != "completed":  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the session was not taken over"
            await inner.wait("s1", (await inner.get("s1")).last_index, 0.5)  # type: ignore[union-attr]
        assert model.reattached == [stored.model_seq]
        check_complete(await inner.read("s1", -1))
    finally:
        await hub.close()
        await inner.close()


async def test_sqlite_readiness_fails_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    """``ping`` (what /ready asks) takes the write lock: a lock held past its short wait fails it while
    reads still answer (``SELECT 1`` would have said ready); released, it passes again. It never runs on
    the store thread, which every request's calls share: it answers while that thread is busy."""
    from services.api.store.base import StoreUnavailable

    store = await sqlite_store(tmp_path, busy_timeout=5.0)
    record = new_record()
    await store.create(record)
    await store.ping()
    locker = sqlite3.connect(tmp_path / "sessions.db", isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.ping()
        # it waited its own 0.25 s, not the store's 5 s busy timeout (the store thread is everyone's)
        assert time.monotonic() - started < 2.0
        assert await store.get(record.id) is not None
        locker.execute("ROLLBACK")
        await store.ping()
        await store.ping()  # the probe's own transaction was rolled back: nothing left open
        busy, release = threading.Event(), threading.Event()
        blocker = asyncio.ensure_future(store._submit(lambda: busy.set() or release.wait(30)))
        await asyncio.to_thread(busy.wait, 10)
        try:
            await asyncio.wait_for(store.ping(), 10)  # the store thread is held: a ping there would hang
        finally:
            release.set()
            await blocker
    finally:
        locker.close()
        await store.close()


async def test_concurrent_ready_probes_share_one_ping_and_a_later_one_pings_again() -> None:
    """``/ready`` needs no key and its ping takes the write lock: callers arriving while a ping runs share
    it (one in flight), a caller that leaves does not cancel it for the others, and nothing is cached past
    it (a later probe asks again and sees the store's state now)."""
    from services.api.routes.health import StoreProbe
    from services.api.store.base import StoreUnavailable

    class GatedStore:
        def __init__(self) -> None:
            self.pings, self.gate, self.down = 0, asyncio.Event(), False

        async def ping(self) -> None:
            self.pings += 1
            await self.gate.wait()
            if self.down:
                raise StoreUnavailable("down")

    store = GatedStore()
    probe = StoreProbe(store)  # type: ignore[arg-type]
    assert await probe.ok(within=0.05) is False  # no answer in time: not ready, and the ping goes on
    assert store.pings == 1
    callers = [asyncio.create_task(probe.ok()) for _ in range(20)]  # they join the ping in flight
    callers[0].cancel()
    store.gate.set()
    assert await asyncio.gather(*callers[1:]) == [True] * 19 and store.pings == 1
    store.down = True
    assert await probe.ok() is False and store.pings == 2


async def test_a_ping_that_runs_after_close_opens_nothing(tmp_path: Path) -> None:
    """``ping`` checks the store on the loop, then runs in a thread: a ``close`` in between must not leave
    it to open a new connection and answer ready."""
    from services.api.store.base import StoreUnavailable

    store = await sqlite_store(tmp_path)
    await store.ping()
    await store.close()
    with pytest.raises(sqlite3.OperationalError, match="closed"):
        store._ping_sync()  # the thread's half of a ping that passed the check before close
    assert store._probe is None
    with pytest.raises(StoreUnavailable):
        await store.ping()
    await store.open()  # a store opened again pings again
    await store.ping()
    await store.close()
