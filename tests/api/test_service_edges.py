"""Edge statuses with real processes: 429 when the model queue is full, 503 when the model service or the
database is unreachable, TTL expiry (404), and an open service (no API_KEYS) on the in-memory store."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.sse import iter_sse
from tests.helpers.env import REPO, VENV_BIN, free_port
from tests.helpers.stack import Service, start_api, start_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api-edges")


@pytest.fixture(scope="module")
def small_model(logs: Path) -> Iterator[Service]:
    svc = start_model(logs, name="model-small", env={"MAX_BATCH_SIZE": "1", "MAX_QUEUE": "0"})
    yield svc
    svc.proc.stop()


@pytest.fixture(scope="module")
def open_api(logs: Path, small_model: Service) -> Iterator[Service]:
    env = {"PERSIST_SESSIONS": "0", "SESSIONS_TTL_SECONDS": "1", "API_KEYS": ""}
    svc = start_api(logs, model_urls=[small_model.url], env=env, gunicorn=False, name="api-open")
    yield svc
    svc.proc.stop()


def msg(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assert_retry_error(r: httpx.Response, status: int, type_: str) -> dict:
    assert r.status_code == status, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers.get("x-request-id")
    err = r.json()["error"]
    assert err["type"] == type_
    return err


def test_full_model_queue_is_429_with_retry_after(open_api: Service) -> None:
    with httpx.Client(base_url=open_api.url, timeout=30) as c:
        payload = {"messages": msg("long [[fake:tokens=5000]]"), "stream": True, "session_id": "busy-1"}
        with c.stream("POST", "/v1/chat/completions", json=payload) as r:
            assert r.status_code == 200
            next(e for e in iter_sse(r) if e is not None)
            second = c.post("/v1/chat/completions", json={"messages": msg("hi")})
            assert_retry_error(second, 429, "rate_limit_error")
            assert c.post("/v1/cancel/busy-1").json()["status"] == "cancelled"


def test_finished_sessions_expire_after_the_ttl(open_api: Service) -> None:
    with httpx.Client(base_url=open_api.url, timeout=30) as c:
        r = c.post(
            "/v1/chat/completions", json={"messages": msg("hi [[fake:tokens=2]]"), "session_id": "ttl-1"}
        )
        assert r.status_code == 200
        deadline = time.monotonic() + 10
        while c.get("/v1/sessions/ttl-1").status_code != 404:
            assert time.monotonic() < deadline, "session did not expire"
            time.sleep(0.1)  # polling a condition, bounded by the deadline
        assert c.get("/v1/sessions/ttl-1/events").status_code == 404


def test_model_service_down_is_503(logs: Path) -> None:
    api = start_api(logs, model_urls=[f"http://127.0.0.1:{free_port()}"], gunicorn=False, name="api-nomodel")
    try:
        with httpx.Client(base_url=api.url, timeout=30) as c:
            r = c.post("/v1/chat/completions", json={"messages": msg("hi")})
            assert_retry_error(r, 503, "service_unavailable_error")
            err = assert_retry_error(c.get("/ready"), 503, "service_unavailable_error")
            assert "model" in err["message"]
            assert c.get("/health").status_code == 200
    finally:
        api.proc.stop()
    assert "request failed: not ready" not in api.proc.log_path.read_text()  # a probe's answer, not a failure


def test_database_down_is_503_and_its_password_is_never_logged(logs: Path, small_model: Service) -> None:
    env = {"DATABASE_URL": f"postgresql://postgres:pw-s3cret@127.0.0.1:{free_port()}/none"}
    api = start_api(logs, model_urls=[small_model.url], env=env, gunicorn=False, name="api-nodb")
    try:
        with httpx.Client(base_url=api.url, timeout=30) as c:
            err = assert_retry_error(c.get("/ready"), 503, "service_unavailable_error")
            assert "database" in err["message"]
            r = c.post("/v1/chat/completions", json={"messages": msg("hi"), "session_id": "db-1"})
            assert assert_retry_error(r, 503, "service_unavailable_error")["code"] == "database_unavailable"
            r = c.post("/v1/chat/completions", json={"messages": msg("hi")})
            assert_retry_error(r, 503, "service_unavailable_error")
    finally:
        api.proc.stop()
    assert "pw-s3cret" not in api.proc.log_path.read_text()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CANCEL_AFTER_DISCONNECT_SECONDS", "soon"),
        ("SESSIONS_TTL_SECONDS", "-5"),
        ("MODEL_SERVICE_URL", "model"),
    ],
)
def test_a_bad_variable_stops_the_service_naming_it(name: str, value: str) -> None:
    env = {**os.environ, "API_PORT": str(free_port()), name: value}
    cmd = [
        str(VENV_BIN / "gunicorn"),
        "-c",
        "services/api/gunicorn.conf.py",
        "services.api.main:create_app()",
    ]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert name in done.stderr
