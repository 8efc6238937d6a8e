"""Quiet faults with real processes (api under gunicorn, model service with ENGINE=fake):

- a SIGKILLed gunicorn worker: a client that resumes sees new events within 3 s (the default 10 s lease is
  not waited out: the dead owner process is recognised);
- the database unreachable (a TCP proxy in front of the real Postgres is cut): /ready, status and new
  sessions answer 503 well within the pool timeout (the fail-fast path), from whichever worker answers, and
  serve again within seconds of its return;
- the model service restarted: /ready and requests agree, from whichever worker answers, with a long
  status cache.
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


FAIL_FAST = 1.0  # STORE_FAIL_FAST_SECONDS given to the api below
POOL_TIMEOUT = 5.0  # what a call would wait for a connection without fail-fast (the store's pool timeout)
# Halfway between the two: a loaded 2-core box may add a second to a 1 s answer, but a call that waited out
# the pool timeout can never pass.
BOUND = (FAIL_FAST + POOL_TIMEOUT) / 2
HEAL_WITHIN = 3.0  # seconds after the database's return: probes every 0.5 s, a fresh pool, a loaded box


def expect_503(response: httpx.Response, started: float) -> float:
    took = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["error"]["type"] == "service_unavailable_error"
    assert took < BOUND, f"503 took {took:.2f} s (fail-fast {FAIL_FAST} s, pool timeout {POOL_TIMEOUT} s)"
    return took


@pytest.mark.postgres
def test_database_unreachable_answers_503_within_a_second_and_heals(
    logs: Path, model: Service, postgres_dsn: str
) -> None:
    proxy = TcpProxy("127.0.0.1", 5432, free_port()).start()
    dsn = postgres_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert dsn != postgres_dsn
    env = {"DATABASE_URL": dsn, "STORE_FAIL_FAST_SECONDS": str(FAIL_FAST)}
    api = start_api(logs, model_urls=[model.url], env=env, name="api-db503")
    # A fresh connection per request: any worker may answer any of them (keep-alive would pin one), and
    # each answer must meet the bound whichever worker it is, on its first failure or a later one.
    fresh = httpx.Limits(max_keepalive_connections=0)
    try:
        with httpx.Client(base_url=api.url, timeout=30, limits=fresh) as c:
            sid = f"db-{uuid.uuid4().hex[:8]}"
            assert c.post("/v1/chat/completions", json=body(3, session_id=sid)).status_code == 200
            proxy.down()
            took: list[float] = []
            for _ in range(3):
                for method, path, payload in (
                    ("GET", "/ready", None),
                    ("GET", f"/v1/sessions/{sid}", None),
                    ("POST", "/v1/chat/completions", body(3)),
                ):
                    started = time.monotonic()
                    took.append(expect_503(c.request(method, path, json=payload), started))
            print(f"503s while the database is unreachable: max {max(took):.2f} s over {len(took)}")
            proxy.up()
            returned = time.monotonic()
            while c.get("/ready").status_code != 200:
                assert time.monotonic() - returned < HEAL_WITHIN, "the api did not recover"
                time.sleep(0.05)
            # Each worker's store probes by itself while failing: HEAL_WITHIN after the database's return
            # every worker serves, whether or not a request reached it meanwhile.
            time.sleep(max(0.0, returned + HEAL_WITHIN - time.monotonic()))
            for _ in range(4):
                assert c.post("/v1/chat/completions", json=body(3)).status_code == 200
                got = c.get(f"/v1/sessions/{sid}")
                assert got.status_code == 200 and got.json()["status"] == "completed", got.text
    finally:
        api.proc.stop()
        proxy.close()


def test_after_a_model_restart_ready_and_requests_agree_whichever_worker_answers(logs: Path) -> None:
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
            # fresh connections: whichever worker answers (the kernel picks), each answer must be right;
            # several requests make it likely, not certain, that both workers' caches are exercised
            for _ in range(6):
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
