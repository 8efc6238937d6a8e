"""The real nginx edge (rendered config) in front of the real api (gunicorn) and model service (ENGINE=fake):
SSE arrives incrementally, resume and cancel work through it, only the public routes pass, and its own
413 / 429 answers are OpenAI JSON errors."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.sse import check_stream, finish_reason, iter_sse, read_sse
from tests.deploy.conftest import start_edge
from tests.deploy.test_nginx_config import assert_openai_error
from tests.helpers.stack import Service, start_api, start_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY_A, KEY_B = "edge-key-a-0123456789", "edge-key-b-0123456789"
STEP_SECONDS = 0.03  # the fake engine's decode step: a 40-token answer takes about 1.2 s


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edge")


@pytest.fixture(scope="module")
def stack(work: Path, nginx_bin: str) -> Iterator[tuple[Service, str]]:
    model = start_model(work, env={"FAKE_STEP_SECONDS": str(STEP_SECONDS)})
    api = None
    edge = None
    try:
        api = start_api(
            work,
            model_urls=[model.url],
            env={"API_KEYS": f"{KEY_A},{KEY_B}", "CANCEL_AFTER_DISCONNECT_SECONDS": "0"},
        )
        edge, base = start_edge(
            nginx_bin,
            work,
            [f"127.0.0.1:{api.port}"],
            client_max_body_size="1m",
            rate_limit="20r/s",
            rate_burst=40,
        )
        yield api, base
    finally:
        for svc in (edge, api.proc if api else None, model.proc):
            if svc is not None:
                svc.stop()


@pytest.fixture
def client(stack: tuple[Service, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack[1], headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30) as c:
        yield c


def body(tokens: int, session_id: str | None = None) -> dict[str, object]:
    return {
        "model": "x",
        "messages": [{"role": "user", "content": f"describe the cat [[fake:tokens={tokens}]]"}],
        "stream": True,
        **({"session_id": session_id} if session_id else {}),
    }


def sid() -> str:
    return f"edge-{uuid.uuid4().hex[:12]}"


def test_sse_arrives_incrementally_through_the_edge(client: httpx.Client) -> None:
    s = sid()
    arrivals: list[float] = []
    events = []
    t0 = time.monotonic()
    request_id = {"X-Request-Id": "rq-1"}
    with client.stream("POST", "/v1/chat/completions", json=body(40, s), headers=request_id) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-session-id"] == s
        assert r.headers["x-request-id"] == "rq-1"
        assert "content-encoding" not in r.headers
        assert r.headers["x-accel-buffering"] == "no"  # the contract's header survives the edge
        for event in iter_sse(r):
            if event is not None:
                events.append(event)
                arrivals.append(time.monotonic() - t0)
    check_stream(events, s)
    generation = 40 * STEP_SECONDS
    # Events are spread over the generation: half of them have arrived well before the last one.
    assert arrivals[-1] - arrivals[0] > generation / 2, arrivals
    assert arrivals[len(arrivals) // 2] < arrivals[-1] - generation / 4, arrivals


@pytest.mark.parametrize("via", ["post", "get"])
def test_resume_with_last_event_id_through_the_edge(client: httpx.Client, via: str) -> None:
    s = sid()
    with client.stream("POST", "/v1/chat/completions", json=body(60, s)) as r:
        head = read_sse(r, limit=5)  # then the connection drops
    last = head[-1].id
    assert last == f"{s}:4"
    if via == "post":
        resume = {"Last-Event-ID": last}
        with client.stream("POST", "/v1/chat/completions", json=body(60, s), headers=resume) as r:
            assert r.status_code == 200, r.read()
            tail = read_sse(r)
    else:
        with client.stream("GET", f"/v1/sessions/{s}/events", headers={"Last-Event-ID": last}) as r:
            assert r.status_code == 200, r.read()
            tail = read_sse(r)
    check_stream(tail, s, first=5)
    assert finish_reason(tail) == "stop"


def test_cancel_through_the_edge(client: httpx.Client) -> None:
    s = sid()
    result: dict[str, list] = {}

    def consume() -> None:
        with client.stream("POST", "/v1/chat/completions", json=body(2000, s)) as r:
            result["events"] = read_sse(r)

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # await the session's first events
        status = client.get(f"/v1/sessions/{s}")
        if status.status_code == 200 and status.json()["last_index"] >= 2:
            break
        time.sleep(0.05)  # polling interval
    cancelled = client.post(f"/v1/cancel/{s}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json() == {"ok": True, "session_id": s, "status": "cancelled"}
    reader.join(30)
    assert not reader.is_alive()
    check_stream(result["events"], s)
    assert finish_reason(result["events"]) == "cancelled"


@pytest.mark.parametrize("path", ["/metrics", "/internal/v1/status", "/v1/../metrics", "/docs"])
def test_internal_routes_are_not_reachable_through_the_edge(
    client: httpx.Client, stack: tuple[Service, str], path: str
) -> None:
    assert_openai_error(client.get(path), 404, "not_found_error")
    # Prometheus scrapes the api directly.
    assert httpx.get(f"{stack[0].url}/metrics", timeout=10).status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200


def test_oversize_body_gets_413_from_the_edge(client: httpx.Client) -> None:
    big = {**body(5), "messages": [{"role": "user", "content": "x" * 1_500_000}]}
    rejected = client.post("/v1/chat/completions", json=big)
    assert "1m" in assert_openai_error(rejected, 413, "invalid_request_error")["error"]["message"]


def test_burst_gets_429_from_the_edge_per_key(stack: tuple[Service, str]) -> None:
    base = stack[1]
    key_b = {"Authorization": f"Bearer {KEY_B}"}
    # A real burst: many requests at once, from one client (one key).
    with httpx.Client(base_url=base, headers=key_b, timeout=10) as burst, ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: burst.get("/v1/models"), range(120)))
    limited = [r for r in codes if r.status_code == 429]
    assert limited, [r.status_code for r in codes]
    assert all(r.status_code in (200, 429) for r in codes)
    assert_openai_error(limited[0], 429, "rate_limit_error")
    assert int(limited[0].headers["retry-after"]) >= 1
    # Another key is another client.
    other = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=10)
    assert other.status_code == 200


def test_default_limits_never_meet_an_ordinary_client(
    stack: tuple[Service, str], work: Path, nginx_bin: str
) -> None:
    """With the default EDGE_* limits (make run, compose, Kubernetes), 30 parallel GET /v1/models and a quick
    sequential run of requests from one key get no 429: requests are cheap; streams and tokens cost."""
    api = stack[0]
    edge, base = start_edge(nginx_bin, work, [f"127.0.0.1:{api.port}"])
    try:
        key = {"Authorization": f"Bearer {KEY_A}"}
        with httpx.Client(base_url=base, headers=key, timeout=30) as client, ThreadPoolExecutor(30) as pool:
            barrier = threading.Barrier(30)

            def get(_: int) -> int:
                barrier.wait(10)  # all 30 at once
                return client.get("/v1/models").status_code

            parallel = list(pool.map(get, range(30)))
            sequential = [client.get("/v1/models").status_code for _ in range(150)]
        assert parallel == [200] * 30
        assert sequential == [200] * 150
    finally:
        edge.stop()
