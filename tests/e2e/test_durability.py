"""Durability and topology with real processes: the api under gunicorn (2 workers) in front of TWO model
replicas (ENGINE=fake), on SQLite and on Postgres.

- SIGKILL the whole api mid-stream and start it again: the resume completes with no gap and no duplicate
  (the new process takes the lapsed lease and re-attaches to the replica that runs the generation);
- concurrent generations spread over both replicas; cancel reaches the owner replica;
- ownership, and every status of the contract's error table through gunicorn.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.sse import SseEvent, check_stream, finish_reason, iter_sse, read_sse, text_of
from tests.helpers.env import free_port
from tests.helpers.stack import Service, start_api, start_model

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

KEY, OTHER = "dur-key-0123456789", "dur-other-0123456789"
TOKEN = "internal-dur-token"
MAX_BODY = 128 * 1024


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-durability")


@pytest.fixture(scope="module")
def replicas(logs: Path) -> Iterator[list[Service]]:
    env = {"FAKE_STEP_SECONDS": "0.01", "INTERNAL_TOKEN": TOKEN, "MAX_BATCH_SIZE": "4", "MAX_QUEUE": "0"}
    models = [start_model(logs, name=f"model-{i}", env=env) for i in range(2)]
    yield models
    for m in models:
        m.proc.stop()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_env(request: pytest.FixtureRequest, logs: Path) -> dict[str, str]:
    env = {
        "API_KEYS": f"{KEY},{OTHER}",
        "INTERNAL_TOKEN": TOKEN,
        "MAX_REQUEST_BYTES": str(MAX_BODY),
        "RUNNER_LEASE_SECONDS": "1.5",
        "SESSIONS_DB_PATH": str(logs / f"sessions-{uuid.uuid4().hex[:6]}.db"),
    }
    if request.param == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_dsn")
    return env


@pytest.fixture(scope="module")
def stack(logs: Path, replicas: list[Service], backend_env: dict[str, str]) -> Iterator[dict[str, object]]:
    """A mutable holder: the kill test replaces the api with a new process on the same port."""
    api = start_api(logs, model_urls=[m.url for m in replicas], env=backend_env, port=free_port())
    holder: dict[str, object] = {"api": api}
    yield holder
    current = holder["api"]
    assert isinstance(current, Service)
    current.proc.stop()


def client(api: Service, key: str = KEY) -> httpx.Client:
    limits = httpx.Limits(max_keepalive_connections=0)
    return httpx.Client(
        base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=60, limits=limits
    )


def body(tokens: int, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": f"write [[fake:tokens={tokens}]]"}], **extra}


def test_sigkill_and_restart_resume_without_gap_or_duplicate(stack: dict[str, object], logs: Path) -> None:
    api = stack["api"]
    assert isinstance(api, Service)
    sid = f"kill-{uuid.uuid4().hex[:8]}"
    with (
        client(api) as c,
        c.stream("POST", "/v1/chat/completions", json=body(400, session_id=sid, stream=True)) as r,
    ):
        assert r.status_code == 200
        head = read_sse(r, 8)
    api.proc.kill()  # SIGKILL to the master and both workers: no lease release, no final flush
    restarted = start_api(
        logs,
        model_urls=api.env["MODEL_SERVICE_URL"].split(","),
        env=api.env,
        port=api.port,
        name="api-restarted",
    )
    stack["api"] = restarted
    with client(restarted) as c:
        with c.stream("GET", f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": str(head[-1].id)}) as r:
            assert r.status_code == 200
            tail = read_sse(r)
        full = read_sse(c.get(f"/v1/sessions/{sid}/events"))
        status = c.get(f"/v1/sessions/{sid}").json()
    resumed = head + tail
    check_stream(resumed, sid)
    assert [e.data for e in resumed] == [e.data for e in full]
    assert finish_reason(full) == "stop" and status["status"] == "completed"
    reasoning, content = text_of(full)
    assert len((reasoning + content).split()) >= 300  # the whole generation, not a truncated one


def running_on(replica: Service) -> int:
    info = httpx.get(f"{replica.url}/internal/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    return int(info["running"]) + int(info["queued"])


def test_generations_spread_over_replicas_and_cancel_reaches_the_owner(
    stack: dict[str, object], replicas: list[Service]
) -> None:
    api = stack["api"]
    assert isinstance(api, Service)
    sids = [f"spread-{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    streams: list[tuple[httpx.Client, object, Iterator[SseEvent | None]]] = []
    try:
        for sid in sids:
            c = client(api)
            ctx = c.stream("POST", "/v1/chat/completions", json=body(5000, session_id=sid, stream=True))
            r = ctx.__enter__()
            assert r.status_code == 200, r.read()
            events = iter_sse(r)
            next(e for e in events if e is not None)
            streams.append((c, ctx, events))
        assert all(running_on(m) >= 1 for m in replicas), [running_on(m) for m in replicas]
        with client(api) as c, ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda s: c.post(f"/v1/cancel/{s}").json(), sids))
        assert [a["status"] for a in answers] == ["cancelled"] * 4
        for _c, _ctx, events in streams:
            rest = [e for e in events if e is not None]
            assert rest[-1].data == "[DONE]" and finish_reason(rest) == "cancelled"
        assert sum(running_on(m) for m in replicas) == 0
    finally:
        for c, ctx, _events in streams:
            ctx.__exit__(None, None, None)  # type: ignore[attr-defined]
            c.close()


def test_ownership_through_gunicorn(stack: dict[str, object]) -> None:
    api = stack["api"]
    assert isinstance(api, Service)
    sid = f"own-{uuid.uuid4().hex[:8]}"
    with client(api) as mine, client(api, OTHER) as theirs:
        assert mine.post("/v1/chat/completions", json=body(3, session_id=sid)).status_code == 200
        for method, path in (
            ("GET", f"/v1/sessions/{sid}"),
            ("GET", f"/v1/sessions/{sid}/events"),
            ("POST", f"/v1/cancel/{sid}"),
        ):
            r = theirs.request(method, path)
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        assert theirs.post("/v1/chat/completions", json=body(3, session_id=sid)).status_code == 404


def expect(r: httpx.Response, status: int, type_: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers.get("x-request-id")
    error = r.json()["error"]
    assert error["type"] == type_ and set(error) == {"message", "type", "param", "code"}
    if status in (429, 503):
        assert int(r.headers["retry-after"]) >= 1
    return error


def test_every_error_status_of_the_contract(stack: dict[str, object], logs: Path) -> None:
    api = stack["api"]
    assert isinstance(api, Service)
    with client(api) as c:
        expect(
            c.post("/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"}),
            400,
            "invalid_request_error",
        )
        expect(c.post("/v1/chat/completions", json=body(3, n=1000)), 400, "invalid_request_error")
        expect(c.post("/v1/chat/completions", json=body(3, max_tokens=0)), 400, "invalid_request_error")
        expect(httpx.get(f"{api.url}/v1/models"), 401, "authentication_error")
        expect(c.get("/v1/no-such-route"), 404, "not_found_error")
        expect(c.get("/v1/sessions/none-such"), 404, "not_found_error")
        expect(c.post("/v1/chat/completions", content=b"x" * (MAX_BODY + 10)), 413, "invalid_request_error")
        failed = expect(
            c.post(
                "/v1/chat/completions",
                json=body(3, messages=[{"role": "user", "content": "x [[fake:error]]"}]),
            ),
            500,
            "server_error",
        )
        assert "request id" in failed["message"] and "Traceback" not in failed["message"]
        # 429: 2 replicas x (4 running + 0 queued) slots; the ninth concurrent generation is refused
        sids = [f"full-{i}-{uuid.uuid4().hex[:6]}" for i in range(12)]
        statuses = []
        for sid in sids:
            with c.stream("POST", "/v1/chat/completions", json=body(5000, session_id=sid, stream=True)) as s:
                statuses.append(s.status_code)
                if s.status_code == 429:
                    s.read()
                    expect(s, 429, "rate_limit_error")
                    break
        assert 429 in statuses
        for sid in sids[: len(statuses)]:
            c.post(f"/v1/cancel/{sid}")
    # 503: an api whose model service is down
    dead = start_api(
        logs, model_urls=[f"http://127.0.0.1:{free_port()}"], name="api-dead", env={"API_WORKERS": "1"}
    )
    try:
        expect(httpx.post(f"{dead.url}/v1/chat/completions", json=body(3)), 503, "service_unavailable_error")
        expect(httpx.get(f"{dead.url}/ready"), 503, "service_unavailable_error")
    finally:
        dead.proc.stop()
