"""Contract clauses not covered elsewhere, against real processes: the api under gunicorn (2 workers) in front
of the model service (ENGINE=fake, one row per step so a second request waits in the queue).

- X-Request-Id echoed exactly once on every kind of response (JSON, SSE, 400/401/404/413/500);
- every /v1 route needs the key, unknown ones included;
- concurrent POSTs with one session_id start ONE generation on the model service;
- a queued session: status ``queued``, ``: ping`` comments while it waits, cancel ends it;
- the model service's MAX_TOKENS applies when a request gives none; output parameters refused by name;
- an open service warns at start; a bad seed variable stops the api naming it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.openai_shapes import check_completion
from tests.api.sse import SseEvent, check_stream, finish_reason, iter_sse
from tests.helpers.env import REPO, free_port
from tests.helpers.stack import Service, start_api, start_model

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

KEY = "contract-key-0123456789"
MAX_BODY = 64 * 1024
MODEL_MAX_TOKENS = 40


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-contract")


@pytest.fixture(scope="module")
def model(logs: Path) -> Iterator[Service]:
    env = {
        "FAKE_STEP_SECONDS": "0.01",
        "MAX_BATCH_SIZE": "1",
        "MAX_QUEUE": "4",
        "MAX_TOKENS": str(MODEL_MAX_TOKENS),
    }
    svc = start_model(logs, env=env)
    yield svc
    svc.proc.stop()


@pytest.fixture(scope="module")
def api(logs: Path, model: Service) -> Iterator[Service]:
    env = {"API_KEYS": KEY, "MAX_REQUEST_BYTES": str(MAX_BODY), "SSE_PING_SECONDS": "0.2"}
    svc = start_api(logs, model_urls=[model.url], env=env)
    yield svc
    svc.proc.stop()


@pytest.fixture
def http(api: Service) -> Iterator[httpx.Client]:
    # no keep-alive: each request is a new connection, so both gunicorn workers take part
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(
        base_url=api.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30, limits=limits
    ) as c:
        yield c


def body(tokens: int, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": f"write [[fake:tokens={tokens}]]"}], **extra}


def sid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def finished_generations(model: Service) -> dict[str, float]:
    page = httpx.get(f"{model.url}/metrics", timeout=10).text
    found = re.findall(r'^model_requests_total\{outcome="(\w+)"\} ([0-9.e+]+)$', page, re.M)
    return {outcome: float(value) for outcome, value in found}


def test_x_request_id_is_echoed_exactly_once_on_every_kind_of_response(http: httpx.Client) -> None:
    def rid_of(method: str, path: str, status: int, **kw: object) -> None:
        rid = f"rid-{uuid.uuid4().hex[:8]}"
        headers = {**dict(kw.pop("headers", {})), "X-Request-Id": rid}  # type: ignore[call-overload]
        with http.stream(method, path, headers=headers, **kw) as r:  # type: ignore[arg-type]
            r.read()
            assert r.status_code == status, r.text
            assert r.headers.get_list("x-request-id") == [rid], (path, status)

    rid_of("GET", "/v1/models", 200)
    rid_of("POST", "/v1/chat/completions", 200, json=body(3, stream=True))
    rid_of("POST", "/v1/chat/completions", 400, json={"messages": []})
    rid_of("GET", "/v1/models", 401, headers={"Authorization": "Bearer wrong-key-0123"})
    rid_of("GET", "/v1/no-such-route", 404)
    rid_of("GET", "/no-such-page", 404)
    rid_of("POST", "/v1/chat/completions", 413, content=b"x" * (MAX_BODY + 1))

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies while the body arrives
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"x" * 4096

    rid_of("POST", "/v1/chat/completions", 413, content=chunked())
    rid_of(
        "POST",
        "/v1/chat/completions",
        500,
        json=body(3, messages=[{"role": "user", "content": "[[fake:error]]"}]),
    )


def test_every_v1_route_needs_the_key_unknown_ones_included(api: Service) -> None:
    with httpx.Client(base_url=api.url, timeout=10) as anon:
        for method, path in (("GET", "/v1/no-such-route"), ("POST", "/v1/models"), ("GET", "/v1/cancel/x")):
            r = anon.request(method, path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
        r = anon.get("/v1/no-such-route", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = anon.get("/no-such-page")
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_concurrent_posts_with_one_session_id_start_one_generation(
    http: httpx.Client, model: Service
) -> None:
    before = finished_generations(model)
    s = sid("dup")
    answers: list[httpx.Response] = []

    def post() -> None:
        answers.append(http.post("/v1/chat/completions", json=body(30, session_id=s)))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in answers] == [200] * 4
    for r in answers:
        check_completion(r.json())
    assert len({r.json()["id"] for r in answers}) == 1
    assert len({r.json()["choices"][0]["message"]["content"] for r in answers}) == 1
    after = finished_generations(model)
    started = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    assert started == {"stop": 1.0}  # one generation; none started and cancelled behind the scenes


def test_a_queued_session_gets_pings_its_status_and_can_be_cancelled(http: httpx.Client) -> None:
    busy, waiting = sid("busy"), sid("queued")
    with http.stream(
        "POST", "/v1/chat/completions", json=body(3000, max_tokens=3000, session_id=busy, stream=True)
    ) as r:
        assert r.status_code == 200
        next(e for e in iter_sse(r) if e is not None)
        payload = body(20, session_id=waiting, stream=True, stream_options={"include_usage": True})
        with http.stream("POST", "/v1/chat/completions", json=payload) as q:
            items = iter_sse(q)
            first = next(items)
            assert isinstance(first, SseEvent) and first.json()["choices"][0]["delta"] == {
                "role": "assistant"
            }
            assert next(items) is None and next(items) is None  # ": ping" while the model queue holds it
            assert http.get(f"/v1/sessions/{waiting}").json()["status"] == "queued"
            answer = http.post(f"/v1/cancel/{waiting}").json()
            assert answer == {"ok": True, "session_id": waiting, "status": "cancelled"}
            events = [first, *(e for e in items if e is not None)]
        http.post(f"/v1/cancel/{busy}")
    check_stream(events, waiting)
    assert finish_reason(events) == "cancelled" and events[-2].json()["choices"] == []
    assert http.get(f"/v1/sessions/{waiting}").json()["finish_reason"] == "cancelled"


def test_the_model_services_max_tokens_applies_when_the_request_gives_none(http: httpx.Client) -> None:
    out = http.post("/v1/chat/completions", json=body(200)).json()
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == MODEL_MAX_TOKENS


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"logit_bias": {"15": 3}}, "logit_bias"), ({"modalities": ["text", "audio"]}, "modalities")],
)
def test_output_parameters_the_server_cannot_honour_are_refused(
    http: httpx.Client, extra: dict[str, object], param: str
) -> None:
    r = http.post("/v1/chat/completions", json=body(3, **extra))
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_an_open_service_warns_at_start(logs: Path, model: Service) -> None:
    api = start_api(logs, model_urls=[model.url], env={"API_KEYS": ""}, gunicorn=False, name="api-open")
    try:
        assert httpx.get(f"{api.url}/v1/models", timeout=10).status_code == 200
    finally:
        api.proc.stop()
    assert "API_KEYS is not set" in api.proc.log_path.read_text()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PERSIST_SESSIONS", "maybe"),
        ("SESSIONS_TTL_SECONDS", "a day"),
        ("CANCEL_AFTER_DISCONNECT_SECONDS", "-1"),
    ],
)
def test_a_bad_seed_variable_stops_the_api_naming_it(name: str, value: str) -> None:
    env = {**os.environ, "API_PORT": str(free_port()), "API_KEYS": "hidden-key-value", name: value}
    done = subprocess.run(
        [sys.executable, "-m", "services.api"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and name in done.stderr and "hidden-key-value" not in done.stderr
