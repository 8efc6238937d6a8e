"""The Postgres store through a TCP proxy that cuts it off (the real server, untouched for everyone else):
while the database is unreachable every call fails within the fail-fast timeout (not the 5 s pool
timeout); once it is back the store serves again within about a second, cross-process wake-ups included;
a store that could not connect at start connects by itself on first use."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from services.api.store.base import StoredEvent, StoreUnavailable
from services.api.store.postgres import LISTEN_APP_NAME, PostgresStore
from tests.api.test_store_contract import new_record
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
        assert await eventually(store, within=5) < 2.5
        # LISTEN is back too: another process's append wakes this store's waiter promptly
        await until_listening(postgres_dsn, listeners=2, within=3)  # this store's and the direct one's
        waiting = asyncio.create_task(store.wait(record.id, -1, 10))
        started = time.monotonic()
        await direct.append(record.id, [StoredEvent(0, "{}")], model_seq=0, now=2.0)
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
