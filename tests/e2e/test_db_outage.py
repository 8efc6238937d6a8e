"""A database outage under load, with real processes: 10 streaming clients against the api under gunicorn
(2 workers, Postgres) and the model service (ENGINE=fake), about 5 new sessions a second, through

- a 3 s stop: a TCP proxy in front of the server is cut (nobody else is disturbed), and
- one real restart of the server (``pg_ctlcluster <version> main restart``, the cluster serving port 5432,
  ~3 s). It needs root; in CI it must run (a missing root or cluster fails), elsewhere it runs only with
  ``ALLOW_PG_RESTART=1``, because it restarts the machine-wide server that other people's tests may be
  using. It is the last test of this module and waits, bounded, until the server accepts connections again,
  so later tests of the session start on a running server; nothing of this session holds a Postgres
  connection across tests (fixtures are per test or per module, serial).

Each test uses its own database. Clients resume with Last-Event-ID whenever their stream is interrupted
(an error event without an id, a 503, a dropped connection), as a real client would. Afterwards, read from
the database itself: 0 sessions left unfinished, every session's indexes are 0..n with exactly one [DONE]
(nothing lost or duplicated), and what each client received equals what is stored.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from tests.api.sse import SseEvent, iter_sse
from tests.conftest import PG_ADMIN_DSN
from tests.e2e.tcp_proxy import TcpProxy
from tests.helpers.env import free_port, in_ci, missing, require_binary
from tests.helpers.stack import Service, start_api, start_model

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.postgres, pytest.mark.slow]

CLIENTS = 10
LOAD_SECONDS = 9.0
FINISH_WITHIN = 45.0


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-db-outage")


@pytest.fixture
def stack(logs: Path, own_dsn: str) -> Iterator[tuple[Service, TcpProxy]]:
    proxy = TcpProxy("127.0.0.1", 5432, free_port()).start()
    dsn = own_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert dsn != own_dsn
    model = start_model(logs, name="model-dbout", env={"FAKE_STEP_SECONDS": "0.01", "MAX_BATCH_SIZE": "16"})
    api = start_api(logs, model_urls=[model.url], env={"DATABASE_URL": dsn}, name="api-dbout")
    yield api, proxy
    api.proc.stop()
    model.proc.stop()
    proxy.close()


@pytest.fixture
def cluster() -> tuple[str, str, str]:
    return postgres_cluster()


def postgres_cluster() -> tuple[str, str, str]:
    """(pg_ctlcluster path, version, cluster name) of the local cluster serving the tests' port. Fails in CI
    (skips elsewhere) without root, without ALLOW_PG_RESTART=1 outside CI, or without such a cluster."""
    if not in_ci() and os.environ.get("ALLOW_PG_RESTART") != "1":
        pytest.skip("restarts the machine-wide Postgres server: set ALLOW_PG_RESTART=1 (CI runs it)")
    if os.geteuid() != 0:
        missing("root (pg_ctlcluster restarts the shared Postgres server)")
    ctl = require_binary("pg_ctlcluster")
    port = str(urlsplit(PG_ADMIN_DSN).port or 5432)
    listing = subprocess.run(
        [require_binary("pg_lsclusters"), "-h"], capture_output=True, text=True, timeout=30, check=True
    )
    for line in listing.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == port:  # version, cluster, port, status, ...
            return ctl, fields[0], fields[1]
    missing(f"a local Postgres cluster on port {port} (pg_lsclusters found: {listing.stdout.strip()!r})")
    raise AssertionError("unreachable")


def restart_postgres(cluster: tuple[str, str, str]) -> None:
    """Restart the real server. Raises when it fails."""
    ctl, version, name = cluster
    subprocess.run([ctl, "--skip-systemctl-redirect", version, name, "restart"], check=True, timeout=60)


def ensure_postgres_up(cluster: tuple[str, str, str], within: float = 60.0) -> None:
    """Start the cluster if it is down, then wait (bounded) until it accepts connections."""
    ctl, version, name = cluster
    status = subprocess.run([ctl, version, name, "status"], capture_output=True, timeout=30)
    if status.returncode != 0:
        subprocess.run([ctl, "--skip-systemctl-redirect", version, name, "start"], check=True, timeout=60)
    deadline = time.monotonic() + within
    while True:
        try:
            with psycopg.connect(PG_ADMIN_DSN, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "Postgres did not come back after the restart"
            time.sleep(0.1)


def follow_session(c: httpx.Client, sid: str, deadline: float) -> list[SseEvent]:
    """Create (or attach to) the session and read it to [DONE], resuming after every interruption."""
    got: list[SseEvent] = []
    body = {"messages": [{"role": "user", "content": "go [[fake:tokens=120]]"}], "stream": True}
    while time.monotonic() < deadline:
        if got:
            ctx = c.stream("GET", f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": str(got[-1].id)})
        else:
            ctx = c.stream("POST", "/v1/chat/completions", json={**body, "session_id": sid})
        try:
            with ctx as r:
                if r.status_code != 200:
                    r.read()
                    assert r.status_code in (503, 404), r.text  # 404: not created yet (503 at create)
                    if r.status_code == 404:
                        got = []
                else:
                    for event in iter_sse(r):
                        if event is None:
                            continue
                        if event.id is None:
                            break  # the stream was interrupted (error + [DONE] without id): resume
                        got.append(event)
                        if event.data == "[DONE]":
                            return got
        except httpx.HTTPError:
            pass  # the connection dropped: resume
        time.sleep(0.2)  # a client's pause before it reconnects
    raise AssertionError(f"session {sid} did not finish; got {len(got)} events")


def client_loop(api: Service, load_until: float, results: dict[str, list[SseEvent]]) -> None:
    with httpx.Client(base_url=api.url, timeout=httpx.Timeout(30, connect=5)) as c:
        while time.monotonic() < load_until:
            sid = f"dbo-{uuid.uuid4().hex[:10]}"
            results[sid] = follow_session(c, sid, load_until + FINISH_WITHIN)


def stored(dsn: str) -> dict[str, tuple[str, list[tuple[int, str]]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        sessions = dict(conn.execute("SELECT id, status FROM sessions").fetchall())
        rows = conn.execute("SELECT session_id, idx, data FROM events ORDER BY session_id, idx").fetchall()
    events: dict[str, list[tuple[int, str]]] = {sid: [] for sid in sessions}
    for sid, idx, data in rows:
        events[sid].append((idx, data))
    return {sid: (status, events[sid]) for sid, status in sessions.items()}


def under_load(api: Service, fault: Callable[[], None]) -> dict[str, list[SseEvent]]:
    """Run the clients for LOAD_SECONDS with ``fault`` 2 s in; return what each session's client got."""
    results: dict[str, list[SseEvent]] = {}
    load_until = time.monotonic() + LOAD_SECONDS
    with ThreadPoolExecutor(CLIENTS) as pool:
        clients = [pool.submit(client_loop, api, load_until, results) for _ in range(CLIENTS)]
        time.sleep(2.0)  # load runs before the fault
        fault()
        for future in clients:
            future.result(timeout=LOAD_SECONDS + FINISH_WITHIN + 10)
    assert threading.active_count() < 50
    return results


def check_nothing_unfinished_lost_or_duplicated(
    dsn: str, results: dict[str, list[SseEvent]], what: str
) -> None:
    db = stored(dsn)
    unfinished = [
        sid for sid, (status, _) in db.items() if status not in ("completed", "failed", "cancelled")
    ]
    print(f"{what} under load: {len(db)} sessions, {len(unfinished)} unfinished")
    assert not unfinished, unfinished
    assert len(db) >= 15 and set(results) <= set(db)
    for sid, (status, events) in db.items():
        indexes = [i for i, _ in events]
        datas = [d for _, d in events]
        assert indexes == list(range(len(events))), (sid, indexes)
        assert datas.count("[DONE]") == 1 and datas[-1] == "[DONE]", sid
        assert status == "completed", (sid, status, datas[-3:])
        if sid in results:
            assert [e.data for e in results[sid]] == datas, sid  # the client saw each event once


def test_a_3_second_stop_under_load_leaves_no_session_unfinished(
    stack: tuple[Service, TcpProxy], own_dsn: str
) -> None:
    api, proxy = stack

    def stop() -> None:
        proxy.down()
        try:
            time.sleep(3.0)  # the stop's length
        finally:
            proxy.up()

    check_nothing_unfinished_lost_or_duplicated(own_dsn, under_load(api, stop), "a 3 s stop")


def test_a_real_postgres_restart_under_load_leaves_no_session_unfinished(
    cluster: tuple[str, str, str], stack: tuple[Service, TcpProxy], own_dsn: str
) -> None:
    """Last in this module: the one real restart of the shared server (checked for before the stack
    starts)."""
    api, _proxy = stack

    def restart() -> None:
        try:
            restart_postgres(cluster)
        finally:
            ensure_postgres_up(cluster)

    check_nothing_unfinished_lost_or_duplicated(own_dsn, under_load(api, restart), "a restart")
