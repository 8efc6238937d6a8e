"""One contract for every SessionStore backend: memory, SQLite (a temp file) and Postgres (the real server).

Cross-instance tests open a second store on the same data (a second connection, as another worker process
would); one test uses a real second process. Timing bounds are generous: they catch a missed wake-up (which
would cost the whole wait timeout), not scheduling noise.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from pathlib import Path

import pytest

from services.api.store.base import (
    AppendBatch,
    AppendConflict,
    SessionExists,
    SessionRecord,
    SessionStore,
    StoredEvent,
    StoreUnavailable,
)
from services.api.store.factory import create_store
from services.api.store.memory import MemoryStore
from services.api.store.postgres import PostgresStore
from services.api.store.sqlite import SqliteStore
from tests.api.conftest import StoreMaker
from tests.helpers.env import REPO, free_port

pytestmark = pytest.mark.anyio

# Backends whose data a second instance (another worker process) can reach.
cross_instance = pytest.mark.parametrize(
    "store_backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)


def new_record(**fields: object) -> SessionRecord:
    values: dict[str, object] = {
        "id": f"s-{uuid.uuid4().hex[:12]}",
        "owner": "k1",
        "created": 1.0,
        "updated": 1.0,
    }
    values.update(fields)
    return SessionRecord(**values)  # type: ignore[arg-type]


def events(start: int, stop: int) -> list[StoredEvent]:
    return [StoredEvent(i, f'{{"n":{i}}}') for i in range(start, stop)]


async def follow(
    store: SessionStore, session_id: str, last: int, limit: int = 1000
) -> tuple[list[int], float]:
    """Read everything up to index ``last`` with read()/wait(), as a resuming client does.
    Returns the indexes seen and the longest single wait."""
    seen: list[int] = []
    after, longest = -1, 0.0
    deadline = time.monotonic() + 30
    while after < last:
        assert time.monotonic() < deadline, f"stuck after index {after}"
        batch = await store.read(session_id, after, limit)
        if batch:
            seen.extend(e.index for e in batch)
            after = batch[-1].index
            continue
        started = time.monotonic()
        await store.wait(session_id, after, timeout=5.0)
        longest = max(longest, time.monotonic() - started)
    return seen, longest


# ---- sessions ---------------------------------------------------------------------------------------------


async def test_create_get_roundtrip(store: SessionStore) -> None:
    record = new_record(
        status="running",
        usage={"prompt_tokens": 3},
        model_url="http://127.0.0.1:9/",
        model_request_id="r1",
        meta={"chunk_id": "chatcmpl-1", "include_usage": True, "nested": {"a": [1, 2]}},
    )
    await store.create(record)
    assert await store.get(record.id) == record
    assert await store.get("nope") is None


async def test_create_duplicate_raises(store: SessionStore) -> None:
    record = new_record()
    await store.create(record)
    with pytest.raises(SessionExists):
        await store.create(new_record(id=record.id, owner="other"))
    got = await store.get(record.id)
    assert got is not None and got.owner == "k1"


async def test_returned_record_is_a_copy(store: SessionStore) -> None:
    record = new_record(meta={"a": 1})
    await store.create(record)
    record.meta["a"] = 2
    got = await store.get(record.id)
    assert got is not None and got.meta == {"a": 1}
    got.meta["a"] = 3
    again = await store.get(record.id)
    assert again is not None and again.meta == {"a": 1}


async def test_update_fields(store: SessionStore) -> None:
    record = new_record()
    await store.create(record)
    await store.update(
        record.id, now=5.0, status="running", model_url="http://m:1", reader_seen_at=4.5, meta={"x": 1}
    )
    got = await store.get(record.id)
    assert got is not None
    assert (got.status, got.model_url, got.reader_seen_at, got.meta, got.updated) == (
        "running",
        "http://m:1",
        4.5,
        {"x": 1},
        5.0,
    )
    await store.update(record.id, now=6.0, model_url=None)
    got = await store.get(record.id)
    assert got is not None and got.model_url is None and got.status == "running"
    await store.update(record.id, now=9.0, reader_seen_at=8.5, runner_id="r", lease_until=20.0)
    got = await store.get(record.id)
    assert got is not None and (got.reader_seen_at, got.runner_id, got.lease_until) == (8.5, "r", 20.0)
    assert got.updated == 6.0  # bookkeeping only: the TTL clock of a finished session must not restart
    await store.update(record.id, now=10.0)  # nothing to write
    await store.update("missing", now=7.0, status="failed")  # an unknown session is a no-op


async def test_update_rejects_bad_fields(store: SessionStore) -> None:
    record = new_record()
    await store.create(record)
    for bad in ({"last_index": 3}, {"owner": "x"}, {"no_such": 1}, {"status": "bogus"}):
        with pytest.raises(ValueError):
            await store.update(record.id, now=2.0, **bad)


# ---- events -----------------------------------------------------------------------------------------------


async def test_append_and_read(store: SessionStore) -> None:
    record = new_record()
    await store.create(record)
    await store.append(record.id, AppendBatch(events(0, 3), model_seq=2, now=2.0))
    await store.append(record.id, AppendBatch(events(3, 5), model_seq=4, now=3.0))
    assert await store.read(record.id, -1) == events(0, 5)
    assert await store.read(record.id, 2) == events(3, 5)
    assert await store.read(record.id, 4) == []
    assert await store.read(record.id, 10) == []
    assert await store.read(record.id, -1, limit=2) == events(0, 2)
    assert await store.read(record.id, 1, limit=2) == events(2, 4)
    assert await store.read("missing", -1) == []


async def test_append_advances_session(store: SessionStore) -> None:
    record = new_record(status="running")
    await store.create(record)
    await store.append(record.id, AppendBatch(events(0, 2), model_seq=7, now=2.0))
    got = await store.get(record.id)
    assert got is not None
    assert (got.last_index, got.model_seq, got.updated, got.status, got.finish_reason, got.usage) == (
        1,
        7,
        2.0,
        "running",
        None,
        None,
    )
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    await store.append(
        record.id,
        AppendBatch(
            events(2, 4), model_seq=9, status="completed", finish_reason="stop", usage=usage, now=3.0
        ),
    )
    got = await store.get(record.id)
    assert got is not None
    assert (got.last_index, got.model_seq, got.updated, got.status, got.finish_reason, got.usage) == (
        3,
        9,
        3.0,
        "completed",
        "stop",
        usage,
    )


async def test_append_empty_batch_updates_session(store: SessionStore) -> None:
    record = new_record(status="running")
    await store.create(record)
    await store.append(record.id, AppendBatch(events(0, 1), model_seq=0, now=2.0))
    await store.append(record.id, AppendBatch([], model_seq=1, status="failed", now=3.0))
    got = await store.get(record.id)
    assert got is not None and (got.last_index, got.model_seq, got.status) == (0, 1, "failed")


async def test_append_conflicts_store_nothing(store: SessionStore) -> None:
    record = new_record()
    await store.create(record)
    await store.append(record.id, AppendBatch(events(0, 2), model_seq=1, now=2.0))
    bad_batches = [
        events(1, 3),  # overlap: another runner already wrote index 1
        events(3, 4),  # gap
        [StoredEvent(2, "a"), StoredEvent(4, "b")],  # not consecutive
    ]
    for batch in bad_batches:
        with pytest.raises(AppendConflict):
            await store.append(record.id, AppendBatch(batch, model_seq=99, status="completed", now=9.0))
    with pytest.raises(AppendConflict):
        await store.append("missing", AppendBatch(events(0, 1), model_seq=0, now=9.0))
    got = await store.get(record.id)
    assert got is not None and (got.last_index, got.model_seq, got.status) == (1, 1, "queued")
    assert await store.read(record.id, -1) == events(0, 2)


async def test_concurrent_appenders_one_wins(make_store: StoreMaker) -> None:
    """Two runners (say, after a lease takeover) extend the same session: exactly one batch lands."""
    first, second = await make_store(), await make_store()
    record = new_record()
    await first.create(record)
    for start in range(0, 20, 2):
        outcomes = await asyncio.gather(
            first.append(record.id, AppendBatch(events(start, start + 2), model_seq=start, now=2.0)),
            second.append(record.id, AppendBatch(events(start, start + 2), model_seq=start, now=2.0)),
            return_exceptions=True,
        )
        assert sum(isinstance(o, AppendConflict) for o in outcomes) == 1, outcomes
    assert [e.index for e in await second.read(record.id, -1)] == list(range(20))


# ---- wait -------------------------------------------------------------------------------------------------


async def test_wait_returns_at_once_when_behind_or_unknown(store: SessionStore) -> None:
    record = new_record()
    await store.create(record)
    await store.append(record.id, AppendBatch(events(0, 1), model_seq=0, now=2.0))
    started = time.monotonic()
    await store.wait(record.id, -1, timeout=5.0)
    await store.wait("missing", -1, timeout=5.0)
    assert time.monotonic() - started < 1.0


async def test_wait_times_out(store: SessionStore) -> None:
    record = new_record()
    await store.create(record)
    started = time.monotonic()
    await store.wait(record.id, -1, timeout=0.3)
    assert 0.28 <= time.monotonic() - started < 2.0


async def test_wait_wakes_on_append_from_another_task(store: SessionStore) -> None:
    record = new_record()
    await store.create(record)
    waiter = asyncio.create_task(store.wait(record.id, -1, timeout=10.0))
    await asyncio.sleep(0.1)  # let the waiter park (a wake before that would be too easy)
    assert not waiter.done()
    appended = time.monotonic()
    await store.append(record.id, AppendBatch(events(0, 1), model_seq=0, now=2.0))
    await asyncio.wait_for(waiter, 2.0)
    assert time.monotonic() - appended < 0.5


async def test_wait_wakes_on_status_change(store: SessionStore) -> None:
    record = new_record(status="running")
    await store.create(record)
    waiter = asyncio.create_task(store.wait(record.id, -1, timeout=10.0))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    await store.update(record.id, now=2.0, status="cancelled")
    await asyncio.wait_for(waiter, 2.0)


@cross_instance
async def test_second_instance_sees_appends_and_wakes(make_store: StoreMaker) -> None:
    writer, reader = await make_store(), await make_store()
    record = new_record(status="running")
    await writer.create(record)
    waiter = asyncio.create_task(reader.wait(record.id, -1, timeout=10.0))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    appended = time.monotonic()
    await writer.append(record.id, AppendBatch(events(0, 3), model_seq=2, now=2.0))
    await asyncio.wait_for(waiter, 2.0)
    assert time.monotonic() - appended < 0.5
    assert await reader.read(record.id, -1) == events(0, 3)
    got = await reader.get(record.id)
    assert got is not None and got.last_index == 2

    status_waiter = asyncio.create_task(reader.wait(record.id, 2, timeout=10.0))
    await asyncio.sleep(0.1)
    assert not status_waiter.done()
    await writer.update(record.id, now=3.0, status="cancelled")
    await asyncio.wait_for(status_waiter, 2.0)


_CHILD_WRITER = """
import asyncio, sys, time
from services.api.store.base import AppendBatch, SessionRecord, StoredEvent
from tests.api.conftest import new_store

async def main(backend, target, sid, total, batch, pause, create):
    store = new_store(backend, target)
    await store.open()
    try:
        if create:
            await store.create(SessionRecord(id=sid, owner="", status="running", created=1.0, updated=1.0))
        for start in range(0, total, batch):
            stop = min(start + batch, total)
            chunk = [StoredEvent(i, "e%d" % i) for i in range(start, stop)]
            status = "completed" if stop == total else None
            await store.append(sid, AppendBatch(chunk, model_seq=stop, status=status, now=time.time()))
            await asyncio.sleep(pause)
    finally:
        await store.close()

backend, target, sid, total, batch, pause, create = sys.argv[1:8]
asyncio.run(main(backend, target, sid, int(total), int(batch), float(pause), create == "create"))
"""


async def run_writer(
    backend: str, target: str, session_id: str, total: int, *, pause: float, create: bool
) -> int:
    """A real second process appending ``total`` events to ``session_id`` in batches of 4."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD_WRITER,
        backend,
        target,
        session_id,
        str(total),
        "4",
        str(pause),
        "create" if create else "-",
        cwd=REPO,
    )
    return await asyncio.wait_for(child.wait(), 60)


@cross_instance
async def test_second_process_appends_wake_reader(
    store_backend: str, store_target: str, store: SessionStore
) -> None:
    record = new_record(status="running")
    await store.create(record)
    total = 60
    writer = asyncio.create_task(
        run_writer(store_backend, store_target, record.id, total, pause=0.02, create=False)
    )
    try:
        seen, longest_wait = await follow(store, record.id, total - 1)
    finally:
        assert await writer == 0
    assert seen == list(range(total))
    assert longest_wait < 2.0  # a missed cross-process wake-up would cost the full 5 s timeout
    got = await store.get(record.id)
    assert got is not None and got.status == "completed"


@cross_instance
async def test_processes_open_and_append_at_once(
    store_backend: str, store_target: str, make_store: StoreMaker
) -> None:
    """Gunicorn workers start together: each opens (for SQLite: a fresh file, so they race on the schema)
    and writes its own session; every write lands."""
    ids = [f"w{n}-{uuid.uuid4().hex[:8]}" for n in range(3)]
    codes = await asyncio.gather(
        *(run_writer(store_backend, store_target, sid, 80, pause=0, create=True) for sid in ids)
    )
    assert codes == [0] * len(ids)
    store = await make_store()
    for sid in ids:
        assert [e.index for e in await store.read(sid, -1)] == list(range(80))


@pytest.mark.postgres
async def test_postgres_replicas_migrate_a_fresh_schema_at_once(postgres_dsn: str) -> None:
    """Replicas starting together on an empty database must not race on CREATE TABLE."""
    import psycopg

    schema = f"fresh_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    dsn = f"{postgres_dsn}?options=-csearch_path%3D{schema}"
    stores = [PostgresStore(dsn, max_size=1) for _ in range(4)]
    try:
        outcomes = await asyncio.gather(*(store.open() for store in stores), return_exceptions=True)
        assert outcomes == [None] * len(stores)
        await stores[0].create(new_record(id="x"))
        assert await stores[3].get("x") is not None
    finally:
        for store in stores:
            await store.close()
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_reader_never_sees_a_gap(make_store: StoreMaker) -> None:
    writer, reader = await make_store(), await make_store()
    record = new_record(status="running")
    await writer.create(record)
    total, rng = 400, random.Random(7)

    async def write() -> None:
        index = 0
        while index < total:
            stop = min(total, index + rng.randint(1, 7))
            await writer.append(record.id, AppendBatch(events(index, stop), model_seq=stop, now=2.0))
            index = stop
            if rng.random() < 0.3:
                await asyncio.sleep(0.002)

    writing = asyncio.create_task(write())
    seen, _ = await follow(reader, record.id, total - 1, limit=5)
    await writing
    assert seen == list(range(total))


# ---- claim ------------------------------------------------------------------------------------------------


async def test_claim_lease(store: SessionStore) -> None:
    record = new_record(status="running")
    await store.create(record)
    assert await store.claim(record.id, "a", lease_seconds=10, now=100.0)
    assert await store.claim(record.id, "a", lease_seconds=10, now=105.0)  # renew: now until 115
    assert not await store.claim(record.id, "b", lease_seconds=10, now=114.0)
    got = await store.get(record.id)
    assert got is not None and (got.runner_id, got.lease_until) == ("a", 115.0)
    assert await store.claim(record.id, "b", lease_seconds=10, now=115.5)  # lapsed
    assert not await store.claim(record.id, "a", lease_seconds=10, now=116.0)
    await store.update(record.id, now=117.0, status="completed")
    assert not await store.claim(record.id, "b", lease_seconds=10, now=118.0)
    assert not await store.claim(record.id, "c", lease_seconds=10, now=999.0)
    assert not await store.claim("missing", "a", lease_seconds=10, now=1.0)


async def test_claim_takes_over_from_a_named_dead_runner_only(store: SessionStore) -> None:
    record = new_record(status="running")
    await store.create(record)
    assert await store.claim(record.id, "a", lease_seconds=10, now=100.0)
    # the lease is still valid: naming some other runner as dead does not take it
    assert not await store.claim(record.id, "b", lease_seconds=10, now=101.0, takeover_from="z")
    # naming the holder as dead swaps it atomically, once
    assert await store.claim(record.id, "b", lease_seconds=10, now=101.0, takeover_from="a")
    assert not await store.claim(record.id, "c", lease_seconds=10, now=102.0, takeover_from="a")
    got = await store.get(record.id)
    assert got is not None and (got.runner_id, got.lease_until) == ("b", 111.0)


async def test_append_naming_its_runner_is_fenced(store: SessionStore) -> None:
    record = new_record(status="running", runner_id="a", lease_until=50.0)
    await store.create(record)
    await store.append(record.id, AppendBatch(events(0, 2), model_seq=1, now=2.0, runner_id="a"))
    assert await store.claim(record.id, "b", lease_seconds=10, now=60.0)  # a's lease lapsed
    with pytest.raises(AppendConflict):
        await store.append(record.id, AppendBatch(events(2, 3), model_seq=2, now=61.0, runner_id="a"))
    got = await store.get(record.id)
    assert got is not None and got.last_index == 1 and len(await store.read(record.id, -1)) == 2
    await store.append(record.id, AppendBatch(events(2, 3), model_seq=2, now=62.0, runner_id="b"))
    # unfenced (a reservation's end)
    await store.append(record.id, AppendBatch(events(3, 4), model_seq=3, now=63.0))
    assert [e.index for e in await store.read(record.id, -1)] == [0, 1, 2, 3]


async def test_release_clears_only_its_own_lease(store: SessionStore) -> None:
    record = new_record(status="running")
    await store.create(record)
    assert await store.claim(record.id, "a", lease_seconds=10, now=100.0)
    assert await store.claim(record.id, "b", lease_seconds=10, now=111.0)  # a's lease lapsed; b holds it
    assert not await store.release(record.id, "a")  # a never noticed: b's lease stays
    got = await store.get(record.id)
    assert got is not None and (got.runner_id, got.lease_until) == ("b", 121.0)
    assert await store.release(record.id, "b")
    got = await store.get(record.id)
    assert got is not None and (got.runner_id, got.lease_until) == (None, 0.0)
    assert got.updated == record.updated  # bookkeeping: the TTL does not restart
    assert not await store.release(record.id, "b")  # already released
    assert await store.claim(record.id, "c", lease_seconds=10, now=112.0)  # free at once
    assert not await store.release("missing", "c")


async def test_orphans_are_unfinished_sessions_whose_lease_lapsed_before_the_cutoff(
    store: SessionStore,
) -> None:
    def make(status: str, runner: str | None, until: float) -> SessionRecord:
        return new_record(status=status, runner_id=runner, lease_until=until)

    held = make("running", "a", 200.0)  # lease still valid at the cutoff
    recent = make("running", "a", 95.0)  # lapsed, but after the cutoff
    lapsed = make("running", "a", 50.0)
    queued = make("queued", "b", 20.0)  # a reservation whose opener died
    released = make("running", None, 0.0)  # released at shutdown
    done = make("completed", "a", 10.0)
    failed = make("failed", None, 0.0)
    for record in (held, recent, lapsed, queued, released, done, failed):
        await store.create(record)
    found = await store.orphans(lapsed_before=90.0, limit=10)
    assert [r.id for r in found] == [released.id, queued.id, lapsed.id]  # longest lapsed first
    assert found[2] == lapsed  # whole records
    assert [r.id for r in await store.orphans(lapsed_before=90.0, limit=2)] == [released.id, queued.id]
    assert await store.orphans(lapsed_before=90.0, limit=0) == []
    assert await store.claim(lapsed.id, "c", lease_seconds=100, now=90.0)  # adopted: no longer an orphan
    assert [r.id for r in await store.orphans(lapsed_before=90.0, limit=10)] == [released.id, queued.id]


async def test_concurrent_claims_exactly_one_wins(make_store: StoreMaker) -> None:
    first, second = await make_store(), await make_store()
    for _ in range(15):
        record = new_record()
        await first.create(record)
        won = await asyncio.gather(
            first.claim(record.id, "runner-1", 30, now=50.0),
            second.claim(record.id, "runner-2", 30, now=50.0),
        )
        assert sorted(won) == [False, True]


# ---- expiry -----------------------------------------------------------------------------------------------


async def test_delete_expired(store: SessionStore) -> None:
    old_done = new_record(status="completed", updated=100.0)
    old_cancelled = new_record(status="cancelled", updated=100.0)
    recent_failed = new_record(status="failed", updated=900.0)
    old_running = new_record(status="running", updated=100.0)
    for record in (old_done, old_cancelled, recent_failed, old_running):
        await store.create(record)
        await store.append(record.id, AppendBatch(events(0, 3), model_seq=2, now=record.updated))
    assert await store.delete_expired(now=1000.0, ttl_seconds=500.0) == 2
    for gone in (old_done, old_cancelled):
        assert await store.get(gone.id) is None
        assert await store.read(gone.id, -1) == []
    for kept in (recent_failed, old_running):
        assert await store.get(kept.id) is not None
        assert await store.read(kept.id, -1) == events(0, 3)
    assert await store.delete_expired(now=1000.0, ttl_seconds=500.0) == 0


# ---- persistence and failures -------------------------------------------------------------------------


@cross_instance
async def test_data_survives_reopen(make_store: StoreMaker) -> None:
    first = await make_store()
    record = new_record(status="running")
    await first.create(record)
    await first.append(record.id, AppendBatch(events(0, 2), model_seq=1, now=2.0))
    await first.close()
    second = await make_store()  # opening again must not trip over the existing schema
    assert await second.read(record.id, -1) == events(0, 2)
    with pytest.raises(StoreUnavailable):
        await first.get(record.id)


@pytest.mark.parametrize("store_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_postgres_recovers_from_dropped_connections(store_target: str, make_store: StoreMaker) -> None:
    """A database restart kills every connection: calls fail with StoreUnavailable (503), then recover by
    themselves, and the LISTEN connection comes back so cross-process wake-ups work again."""
    import psycopg

    from services.api.store.postgres import LISTEN_APP_NAME

    writer, reader = await make_store(), await make_store()
    record = new_record(status="running")
    await writer.create(record)

    def admin(query: str) -> int:
        with psycopg.connect(store_target, autocommit=True) as conn:
            row = conn.execute(query).fetchone()
            return int(row[0]) if row else 0

    others = "datname = current_database() AND pid <> pg_backend_pid()"
    await asyncio.gather(*(writer.get(record.id) for _ in range(4)))  # several pooled connections
    await asyncio.to_thread(
        admin, f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {others}"
    )
    with pytest.raises(StoreUnavailable):
        await writer.get(record.id)
    # One failure, then the pool has dropped its other dead connections: the next call works.
    assert await writer.get(record.id) is not None
    listening = (
        f"SELECT count(*) FROM pg_stat_activity WHERE {others} AND application_name = '{LISTEN_APP_NAME}'"
    )
    deadline = time.monotonic() + 15
    while not await _recovered(writer, reader) or await asyncio.to_thread(admin, listening) < 2:
        assert time.monotonic() < deadline, "the store did not recover from dropped connections"
        await asyncio.sleep(0.05)

    waiter = asyncio.create_task(reader.wait(record.id, -1, timeout=10.0))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    await writer.append(record.id, AppendBatch(events(0, 1), model_seq=0, now=2.0))
    await asyncio.wait_for(waiter, 2.0)


async def _recovered(*stores: SessionStore) -> bool:
    try:
        for store in stores:
            await store.ping()
    except StoreUnavailable:
        return False
    return True


async def test_postgres_unreachable_is_unavailable() -> None:
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/none", connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.open()
    with pytest.raises(StoreUnavailable):
        await store.get("x")
    await store.close()
    assert time.monotonic() - started < 5.0


async def test_sqlite_missing_directory_fails_at_open(tmp_path: Path) -> None:
    path = f"{tmp_path}/no/such/dir/sessions.db"
    store = SqliteStore(path)
    with pytest.raises(StoreUnavailable, match="does not exist"):
        await store.open()
    with pytest.raises(StoreUnavailable):
        await store.get("x")


async def test_sqlite_file_that_is_not_a_database_fails_at_open(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    path.write_bytes(b"this is not an SQLite file, " * 100)
    with pytest.raises(StoreUnavailable, match="SESSIONS_DB_PATH"):
        await SqliteStore(str(path)).open()


def test_factory_picks_backend() -> None:
    assert isinstance(create_store(persist=False, sqlite_path="x.db", database_url=None), MemoryStore)
    assert isinstance(create_store(persist=True, sqlite_path="x.db", database_url=None), SqliteStore)
    assert isinstance(
        create_store(persist=True, sqlite_path="x.db", database_url="postgresql://h/d"), PostgresStore
    )
    assert isinstance(
        create_store(persist=False, sqlite_path="x.db", database_url="postgresql://h/d"), PostgresStore
    )


def test_postgres_connection_settings_keep_what_the_url_says() -> None:
    from services.api.store.pg_conn import connection_kwargs

    url = "postgresql://u@h:5/d?options=-c%20search_path%3Dx&keepalives_idle=30"
    kw = connection_kwargs(url, application_name="a", connect_timeout=2.4, call_timeout=1.5, statements=True)
    assert kw["options"] == "-c search_path=x -c statement_timeout=1500"
    assert "keepalives_idle" not in kw and kw["keepalives"] == 1 and kw["tcp_user_timeout"] == 1500
    assert (kw["connect_timeout"], kw["autocommit"], kw["application_name"]) == (2, True, "a")
    listen = connection_kwargs(
        "postgresql://h/d", application_name="l", connect_timeout=5, call_timeout=5, statements=False
    )
    assert "options" not in listen and listen["tcp_user_timeout"] == 5000


@pytest.mark.postgres
def test_postgres_connections_carry_the_statement_timeout(postgres_dsn: str) -> None:
    import psycopg

    from services.api.store.pg_conn import connection_kwargs

    kw = connection_kwargs(
        postgres_dsn, application_name="t", connect_timeout=5, call_timeout=2.5, statements=True
    )
    with psycopg.connect(postgres_dsn, **kw) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("2500ms",)
        params = conn.info.get_parameters()  # what libpq was given (client side)
        assert params["tcp_user_timeout"] == "2500" and params["keepalives"] == "1"
