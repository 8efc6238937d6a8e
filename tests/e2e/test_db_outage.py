"""A database outage under load, with real processes: 10 streaming clients against the api under gunicorn
(2 workers, Postgres) and the model service (ENGINE=fake), about 5 new sessions a second, through a real
Postgres restart (``pg_ctlcluster ... restart``: the shared server, ~3 s) and then a 3 s stop (a TCP proxy
in front of the server is cut, so nobody else is disturbed a second time).

Clients resume with Last-Event-ID whenever their stream is interrupted (an error event without an id, a
503, a dropped connection), as a real client would. Afterwards, read from the database itself: 0 sessions
left unfinished, every session's indexes are 0..n with exactly one [DONE] (nothing lost or duplicated),
and what each client received equals what is stored.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.api.sse import SseEvent, iter_sse
from tests.e2e.tcp_proxy import TcpProxy
from tests.helpers.env import free_port, require_binary
from tests.helpers.stack import Service, start_api, start_model

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.postgres, pytest.mark.slow]

CLIENTS = 10
LOAD_SECONDS = 13.0
FINISH_WITHIN = 45.0


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-db-outage")


@pytest.fixture
def stack(logs: Path, postgres_dsn: str) -> Iterator[tuple[Service, TcpProxy]]:
    proxy = TcpProxy("127.0.0.1", 5432, free_port()).start()
    dsn = postgres_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    model = start_model(logs, name="model-dbout", env={"FAKE_STEP_SECONDS": "0.01", "MAX_BATCH_SIZE": "16"})
    api = start_api(logs, model_urls=[model.url], env={"DATABASE_URL": dsn}, name="api-dbout")
    yield api, proxy
    api.proc.stop()
    model.proc.stop()
    proxy.close()


def restart_postgres() -> None:
    """Restart the real server (root; the cluster of the project's machines). Raises when it fails."""
    ctl = require_binary("pg_ctlcluster")
    subprocess.run([ctl, "--skip-systemctl-redirect", "15", "main", "restart"], check=True, timeout=60)


def ensure_postgres_up() -> None:
    ctl = require_binary("pg_ctlcluster")
    status = subprocess.run([ctl, "15", "main", "status"], capture_output=True, timeout=30)
    if status.returncode != 0:
        subprocess.run([ctl, "--skip-systemctl-redirect", "15", "main", "start"], check=True, timeout=60)


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


def test_postgres_restart_and_stop_under_load_leave_no_session_unfinished(
    stack: tuple[Service, TcpProxy], postgres_dsn: str
) -> None:
    api, proxy = stack
    results: dict[str, list[SseEvent]] = {}
    started = time.monotonic()
    load_until = started + LOAD_SECONDS
    with ThreadPoolExecutor(CLIENTS) as pool:
        clients = [pool.submit(client_loop, api, load_until, results) for _ in range(CLIENTS)]
        try:
            time.sleep(2.0)  # load runs before the fault
            restart_postgres()
            restarted_at = time.monotonic() - started
            time.sleep(2.0)
            proxy.down()
            time.sleep(3.0)  # the stop's length
            proxy.up()
        finally:
            ensure_postgres_up()
            proxy.up()
        for future in clients:
            future.result(timeout=LOAD_SECONDS + FINISH_WITHIN + 10)
    assert threading.active_count() < 50
    db = stored(postgres_dsn)
    unfinished = [
        sid for sid, (status, _) in db.items() if status not in ("completed", "failed", "cancelled")
    ]
    print(
        f"db outage under load: {len(db)} sessions, restart done at {restarted_at:.1f} s, "
        f"{len(unfinished)} unfinished, statuses {sorted({s for s, _ in db.values()})}"
    )
    assert not unfinished, unfinished
    assert len(db) >= 20 and set(results) <= set(db)
    for sid, (status, events) in db.items():
        indexes = [i for i, _ in events]
        datas = [d for _, d in events]
        assert indexes == list(range(len(events))), (sid, indexes)
        assert datas.count("[DONE]") == 1 and datas[-1] == "[DONE]", sid
        assert status == "completed", (sid, status, datas[-3:])
        if sid in results:
            assert [e.data for e in results[sid]] == datas, sid  # the client saw each event once
