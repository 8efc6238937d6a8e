"""Quiet faults with real processes (api under gunicorn, model service with ENGINE=fake):

- a SIGKILLed gunicorn worker: a client that resumes sees new events within 3 s (the default 10 s lease is
  not waited out: the dead owner process is recognised);
- the database unreachable (a TCP proxy in front of the real Postgres is cut): /ready, status and new
  sessions answer 503 within ~1 s, and serve again within seconds of its return;
- the model service restarted: /ready and requests agree, in every worker, with a long status cache.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.api.streaming.owner import parse_runner_id
from tests.api.sse import check_stream, iter_sse, read_sse
from tests.e2e.tcp_proxy import TcpProxy
from tests.helpers.env import free_port
from tests.helpers.stack import Service, start_api, start_model

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def body(tokens: int, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": f"write [[fake:tokens={tokens}]]"}], **extra}


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-faults")


@pytest.fixture(scope="module")
def model(logs: Path) -> Iterator[Service]:
    service = start_model(logs, name="model-faults", env={"FAKE_STEP_SECONDS": "0.01"})
    yield service
    service.proc.stop()


def runner_pid(db: Path, sid: str) -> int:
    with sqlite3.connect(db) as conn:
        (runner_id,) = conn.execute("SELECT runner_id FROM sessions WHERE id = ?", (sid,)).fetchone()
    parsed = parse_runner_id(runner_id)
    assert parsed is not None, runner_id
    return parsed.pid


def test_resume_after_a_worker_is_killed_sees_new_events_within_3_seconds(logs: Path, model: Service) -> None:
    db = logs / f"kill-{uuid.uuid4().hex[:6]}.db"
    env = {"RUNNER_LEASE_SECONDS": "10", "SESSIONS_DB_PATH": str(db)}  # the default lease
    api = start_api(logs, model_urls=[model.url], env=env, name="api-kill")
    sid = f"kill-{uuid.uuid4().hex[:8]}"
    try:
        with httpx.Client(base_url=api.url, timeout=30) as c:
            with c.stream("POST", "/v1/chat/completions", json=body(1500, session_id=sid, stream=True)) as r:
                head = read_sse(r, 6)
            os.kill(runner_pid(db, sid), signal.SIGKILL)  # the worker running the generation
            started = time.monotonic()
            headers = {"Last-Event-ID": str(head[-1].id)}
            with c.stream("GET", f"/v1/sessions/{sid}/events", headers=headers) as r:
                assert r.status_code == 200
                events = iter_sse(r)
                first = next(e for e in events if e is not None)
                delay = time.monotonic() - started
                tail = [first, *(e for e in events if e is not None)]
            full = read_sse(c.get(f"/v1/sessions/{sid}/events"))
        print(f"resume after a worker kill: first new event after {delay:.2f} s")
        assert first.index == head[-1].index + 1
        assert delay <= 3.0, f"resumed client waited {delay:.2f} s"
        check_stream(head + tail, sid)
        assert [e.data for e in head + tail] == [e.data for e in full]
    finally:
        api.proc.stop()


def expect_503(response: httpx.Response, started: float, within: float = 1.5) -> None:
    took = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["error"]["type"] == "service_unavailable_error"
    assert took < within, f"503 took {took:.2f} s"


@pytest.mark.postgres
def test_database_unreachable_answers_503_within_a_second_and_heals(
    logs: Path, model: Service, postgres_dsn: str
) -> None:
    proxy = TcpProxy("127.0.0.1", 5432, free_port()).start()
    dsn = postgres_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert dsn != postgres_dsn
    api = start_api(logs, model_urls=[model.url], env={"DATABASE_URL": dsn}, name="api-db503")
    try:
        with httpx.Client(base_url=api.url, timeout=30) as c:
            sid = f"db-{uuid.uuid4().hex[:8]}"
            assert c.post("/v1/chat/completions", json=body(3, session_id=sid)).status_code == 200
            proxy.down()
            for _ in range(3):  # both workers, after their first failure too
                for method, path, payload in (
                    ("GET", "/ready", None),
                    ("GET", f"/v1/sessions/{sid}", None),
                    ("POST", "/v1/chat/completions", body(3)),
                ):
                    started = time.monotonic()
                    expect_503(c.request(method, path, json=payload), started)
            proxy.up()
            started = time.monotonic()
            while c.get("/ready").status_code != 200:
                assert time.monotonic() - started < 5, "the api did not recover"
            for _ in range(4):
                assert c.post("/v1/chat/completions", json=body(3)).status_code == 200
                assert c.get(f"/v1/sessions/{sid}").json()["status"] == "completed"
    finally:
        api.proc.stop()
        proxy.close()


def test_after_a_model_restart_ready_and_requests_agree_in_every_worker(logs: Path) -> None:
    port = free_port()
    env = {"FAKE_STEP_SECONDS": "0.001"}
    model = start_model(logs, name="model-restart", env=env, port=port)
    # a long status cache makes a stale per-worker answer certain, were one served
    api_env = {"MODEL_STATUS_CACHE_SECONDS": "60", "SESSIONS_DB_PATH": str(logs / "restart.db")}
    api = start_api(logs, model_urls=[model.url], env=api_env, name="api-model-restart")
    try:
        with httpx.Client(
            base_url=api.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
        ) as c:
            for _ in range(6):  # every worker has seen the replica ready
                assert c.post("/v1/chat/completions", json=body(3)).status_code == 200
            model.proc.stop()
            for _ in range(6):
                assert c.get("/ready").status_code == 503
                assert c.post("/v1/chat/completions", json=body(3)).status_code == 503
            model = start_model(logs, name="model-restart-2", env=env, port=port)
            assert c.get("/ready").status_code == 200
            statuses = [c.post("/v1/chat/completions", json=body(3)).status_code for _ in range(10)]
            assert statuses == [200] * 10
    finally:
        api.proc.stop()
        model.proc.stop()
