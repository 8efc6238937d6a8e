"""The Postgres store through a TCP proxy that cuts it off (the real server, untouched for everyone else):
while the database is unreachable every call fails within the fail-fast timeout (not the 5 s pool
timeout); once it is back the store serves again within about a second, cross-process wake-ups included;
a store that could not connect at start connects by itself on first use."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from services.api.metrics import ApiMetrics
from services.api.settings import ApiSettings
from services.api.store.base import AppendBatch, StoredEvent, StoreUnavailable
from services.api.store.postgres import LISTEN_APP_NAME, POOL_APP_NAME, PostgresStore
from services.api.streaming.hub import SessionHub
from tests.api.fakes import FakeModel, FakeStream
from tests.api.test_runner import new_record as runner_record
from tests.api.test_store_contract import new_record
from tests.api.test_store_faults import EVENTS, check_complete, until
from tests.e2e.tcp_proxy import TcpProxy
from tests.helpers.env import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.integration]


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    p = TcpProxy("127.0.0.1", 5432, free_port()).start()
    yield p
    p.close()


def via(dsn: str, proxy: TcpProxy) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


async def eventually(store: PostgresStore, within: float) -> float:
    """Seconds until a call succeeds again."""
    started = time.monotonic()
    while True:
        try:
            await store.get("nothing")
            return time.monotonic() - started
        except StoreUnavailable:
            assert time.monotonic() - started < within, "the store did not recover"
            await asyncio.sleep(0.05)


async def until_listening(dsn: str, listeners: int, within: float) -> None:
    """Poll pg_stat_activity until the database has ``listeners`` LISTEN connections of the store."""
    import psycopg

    deadline = time.monotonic() + within
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s"
    )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            row = await (await conn.execute(query, (LISTEN_APP_NAME,))).fetchone()
            if row and row[0] >= listeners:
                return
            assert time.monotonic() < deadline, "the LISTEN connection did not come back"
            await asyncio.sleep(0.05)


async def test_calls_fail_fast_while_down_and_recover_within_a_second(
    postgres_dsn: str, proxy: TcpProxy
) -> None:
    store = PostgresStore(via(postgres_dsn, proxy), max_size=4, fail_fast_timeout=0.5)
    direct = PostgresStore(postgres_dsn, max_size=2)
    await store.open()
    await direct.open()
    try:
        record = new_record(status="running")
        await store.create(record)
        proxy.down()
        for call in (store.ping(), store.get(record.id), store.claim(record.id, "r", 5, time.time())):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call
            assert time.monotonic() - started < 1.5
        await asyncio.sleep(2.5)  # a real outage's length: the pool's own reconnection backs off meanwhile
        proxy.up()
        returned = time.monotonic()
        await until(lambda: not store.failing, within=5)  # healed by its own prober, no call needed
        healed = time.monotonic() - returned
        assert healed < 2.5, healed
        assert await eventually(store, within=5) < 0.5  # the first call after that succeeds
        # LISTEN is back too: another process's append wakes this store's waiter promptly
        await until_listening(postgres_dsn, listeners=2, within=3)  # this store's and the direct one's
        waiting = asyncio.create_task(store.wait(record.id, -1, 10))
        started = time.monotonic()
        await direct.append(record.id, AppendBatch([StoredEvent(0, "{}")], model_seq=0, now=2.0))
        await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - started < 2.0
    finally:
        await store.close()
        await direct.close()


async def test_a_store_down_at_start_connects_on_first_use(postgres_dsn: str, proxy: TcpProxy) -> None:
    proxy.down()
    store = PostgresStore(via(postgres_dsn, proxy), max_size=2, fail_fast_timeout=0.5)
    with pytest.raises(StoreUnavailable):
        await store.open()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get("x")
        assert time.monotonic() - started < 1.5
        proxy.up()
        assert await eventually(store, within=5) < 2.0  # no ping needed: any call reconnects
    finally:
        await store.close()


async def test_a_stalled_database_answers_unavailable_within_the_call_timeout_and_heals(
    postgres_dsn: str, proxy: TcpProxy
) -> None:
    """Packets held, sockets open (the proxy stops forwarding): nothing errors, so only the call deadline
    ends the wait. The first call fails after call_timeout, the next ones within the fail-fast bounds;
    a wait() never hangs on its look either; once forwarding resumes the store serves again."""
    store = PostgresStore(via(postgres_dsn, proxy), max_size=4, fail_fast_timeout=0.3, call_timeout=1.0)
    await store.open()
    try:
        record = new_record(status="running")
        await store.create(record)
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no answer within 1 s"):
            await store.get(record.id)
        took = time.monotonic() - started
        assert 1.0 <= took < 2.0, took  # the deadline, not the 5 s pool timeout nor forever
        assert store.failing
        for call in (store.ping(), store.claim(record.id, "r", 5, time.time()), store.wait(record.id, 5, 30)):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call
            assert time.monotonic() - started < 1.0  # fail-fast: 0.3 s for a connection + 0.3 s answer
        proxy.resume()
        assert await eventually(store, within=10) < 5.0
        assert not store.failing and (await store.get(record.id)) is not None
    finally:
        proxy.resume()
        await store.close()


async def test_a_saturated_pool_is_not_an_outage(postgres_dsn: str) -> None:
    """Every pooled connection busy (slow calls behind a row lock): a call that cannot get a connection
    fails after the pool timeout (503, back-pressure), but the store does not switch to fail-fast nor
    replace its pool; the slow calls complete once the lock is gone."""
    import psycopg

    store = PostgresStore(postgres_dsn, max_size=2, pool_timeout=0.4, fail_fast_timeout=0.05, call_timeout=30)
    await store.open()
    locker = await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True)
    try:
        record = new_record(status="running")
        await store.create(record)
        await locker.execute("BEGIN")
        await locker.execute("SELECT 1 FROM sessions WHERE id = %s FOR UPDATE", (record.id,))
        slow = [
            asyncio.create_task(store.update(record.id, now=5.0, reader_seen_at=float(i))) for i in range(2)
        ]
        await until_locks_waited(postgres_dsn, 2)
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.get(record.id)
            took = time.monotonic() - started
            assert took >= 0.35, took  # the pool timeout every time, never the 0.05 s fail-fast
            reviving = store._reviving  # the probe that tells saturation from an outage
            if reviving is not None:
                await reviving
            assert not store.failing and store.pool_replacements == 0
        await locker.execute("ROLLBACK")
        await asyncio.wait_for(asyncio.gather(*slow), 10)
        got = await store.get(record.id)
        assert got is not None and got.reader_seen_at in (0.0, 1.0)
        assert not store.failing and store.pool_replacements == 0
    finally:
        await locker.close()
        await store.close()


async def until_locks_waited(dsn: str, waiting: int) -> None:
    """Poll pg_stat_activity until ``waiting`` pool connections wait for a lock."""
    import psycopg

    deadline = time.monotonic() + 10
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = %s AND wait_event_type = 'Lock'"
    )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            row = await (await conn.execute(query, (POOL_APP_NAME,))).fetchone()
            if row and row[0] >= waiting:
                return
            assert time.monotonic() < deadline, "the slow calls did not start"
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("retry_seconds", [30.0, 0.6], ids=["retried", "handed-over"])
async def test_a_runner_writing_through_a_stall_completes_once_forwarding_resumes(
    postgres_dsn: str, proxy: TcpProxy, retry_seconds: float
) -> None:
    """The real runner and hub on the real store through a stalled proxy: its writes miss their deadline
    and go through the retry path (or, past STORE_RETRY_SECONDS, the hand-over and the hub's own
    takeover); when forwarding resumes (writes abandoned at their deadline may then commit late) the
    session completes with every event stored exactly once."""
    store = PostgresStore(via(postgres_dsn, proxy), max_size=4, fail_fast_timeout=0.3, call_timeout=0.5)
    direct = PostgresStore(postgres_dsn, max_size=2)
    await store.open()
    await direct.open()
    model = FakeModel(EVENTS)
    settings = ApiSettings(
        event_flush_ms=5,
        runner_lease_seconds=5,
        cancel_after_disconnect_seconds=0,
        store_retry_seconds=retry_seconds,
    )
    hub = SessionHub(settings, store, model, ApiMetrics())  # type: ignore[arg-type]
    record = runner_record(f"stall-{uuid.uuid4().hex[:8]}")
    record.runner_id = hub.runner_id
    await store.create(record)
    gate: asyncio.Queue[None] = asyncio.Queue()
    try:
        hub._start(record, FakeStream(EVENTS, gate=gate), None)
        first = hub._running[record.id]
        for _ in range(10):
            gate.put_nowait(None)
        await until(lambda: first.live.next_index >= 2)
        proxy.stall()
        for _ in range(len(EVENTS) - 10):
            gate.put_nowait(None)  # the rest of the generation, its end included, arrives during the stall
        await until(lambda: store.failing, within=5)  # a write missed its deadline
        if retry_seconds < 5:
            await asyncio.wait_for(first.task, 10)
            assert first.runner.handed_over and first.live.final_status is None
        else:
            await asyncio.sleep(2.0)  # a stall longer than the call timeout, shorter than the retry bound
            assert not first.task.done()
        proxy.resume()
        deadline = time.monotonic() + 20
        while (got := await direct.get(record.id)) is None or got.status != "completed":
            assert time.monotonic() < deadline, f"not completed: {got}"
            await direct.wait(record.id, got.last_index if got else -1, 0.5)
        check_complete(await direct.read(record.id, -1))
        # handed over: the hub's takeover re-attached once, or found the session already completed by the
        # abandoned final write, which reached the server when forwarding resumed
        assert len(model.reattached) <= (1 if retry_seconds < 5 else 0)
    finally:
        proxy.resume()
        await hub.close()
        await store.close()
        await direct.close()


async def test_readiness_fails_while_a_table_is_locked_against_writers(own_dsn: str) -> None:
    """``ping`` (what /ready asks) must fail when writes cannot go through though the server answers
    ``SELECT 1``: a lock on either table that lets readers pass and stops writers (without degrading the
    store for the readers: a probe's lock wait is an answer, not an outage), a read-only server."""
    import psycopg

    store = PostgresStore(own_dsn, fail_fast_timeout=0.3, call_timeout=1.0)
    await store.open()
    try:
        await store.ping()
        for table in ("sessions", "events"):
            with psycopg.connect(own_dsn) as locker:  # a transaction: the lock lasts until it ends
                locker.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
                locker.execute("SELECT 1")  # the server answers others meanwhile
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="lock timeout"):
                    await store.ping()
                assert time.monotonic() - started < 1.0  # its lock_timeout, within the call's deadline
                # a lock is an answer: the store serves on, neither failing nor replacing its pool
                assert not store.failing and store.pool_replacements == 0
                assert await store.get("nothing") is None
            await store.ping()
        # a failover to a read-only server: its connections are dropped, new ones are read-only
        name = own_dsn.rsplit("/", 1)[1]
        with psycopg.connect(own_dsn, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
        await eventually(store, within=10)  # reads answer
        with pytest.raises(StoreUnavailable, match="read-only"):
            await store.ping()
        # an api starting against it opens (the schema is current: only read) and is not ready
        later = PostgresStore(own_dsn, fail_fast_timeout=0.3, call_timeout=1.0)
        await later.open()
        try:
            assert await later.get("nothing") is None
            with pytest.raises(StoreUnavailable, match="read-only"):
                await later.ping()
        finally:
            await later.close()
    finally:
        await store.close()


async def test_a_read_only_server_without_the_schema_is_unavailable_at_open(own_dsn: str) -> None:
    """The migration cannot run there: StoreUnavailable (the api starts not ready), not a driver error."""
    import psycopg

    name = own_dsn.rsplit("/", 1)[1]
    with psycopg.connect(own_dsn, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    store = PostgresStore(own_dsn, fail_fast_timeout=0.3, call_timeout=1.0)
    try:
        with pytest.raises(StoreUnavailable, match="read-only"):
            await store.open()
    finally:
        await store.close()
