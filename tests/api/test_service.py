"""The api service as a real process (one uvicorn worker) against the real model service (ENGINE=fake),
on SQLite and on Postgres: streaming, non-streaming, resume, attach, cancel, auth, errors, metrics."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.openai_shapes import check_chunk, check_completion
from tests.api.sse import check_stream, finish_reason, iter_sse, read_sse, text_of
from tests.helpers.stack import Service, start_api, start_model
from tests.model.media import png_b64

pytestmark = pytest.mark.integration

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api-service")


@pytest.fixture(scope="module")
def model(logs: Path) -> Iterator[Service]:
    svc = start_model(logs, env={"FAKE_STEP_SECONDS": "0.005", "FAKE_CONTEXT_TOKENS": "4096"})
    yield svc
    svc.proc.stop()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request: pytest.FixtureRequest, logs: Path, model: Service) -> Iterator[Service]:
    env = {
        "API_KEYS": f"{KEY_A},{KEY_B}",
        "MAX_REQUEST_BYTES": str(MAX_BODY),
        "CANCEL_AFTER_DISCONNECT_SECONDS": "0",
        "SESSIONS_DB_PATH": str(logs / f"sessions-{uuid.uuid4().hex[:6]}.db"),
    }
    if request.param == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_dsn")
    svc = start_api(logs, model_urls=[model.url], env=env, gunicorn=False, name=f"api-{request.param}")
    yield svc
    svc.proc.stop()


@pytest.fixture
def client(api: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30) as c:
        yield c


def body(text: str = "describe the cat", tokens: int = 20, **extra: object) -> dict[str, object]:
    return {
        "model": "x",
        "messages": [{"role": "user", "content": f"{text} [[fake:tokens={tokens}]]"}],
        **extra,
    }


def sid() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def stream(client: httpx.Client, payload: dict[str, object], limit: int | None = None, **kw: object) -> list:
    with client.stream("POST", "/v1/chat/completions", json={**payload, "stream": True}, **kw) as r:  # type: ignore[arg-type]
        assert r.status_code == 200, r.read()
        return read_sse(r, limit)


def replay(client: httpx.Client, session_id: str, last: str | None = None) -> list:
    headers = {"Last-Event-ID": last} if last is not None else {}
    with client.stream("GET", f"/v1/sessions/{session_id}/events", headers=headers) as r:
        assert r.status_code == 200, r.read()
        return read_sse(r)


def assert_error(response: httpx.Response, status: int, type_: str) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["type"] == type_ and set(err) == {"message", "type", "param", "code"}
    assert response.headers.get("x-request-id")
    return err


# ---- streaming and non-streaming ------------------------------------------------------------------------


def test_stream_follows_the_contract(client: httpx.Client) -> None:
    s = sid()
    payload = {**body(tokens=30), "session_id": s, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        assert r.headers["x-session-id"] == s
        events = read_sse(r)
    check_stream(events, s)
    for event in events[:-1]:
        check_chunk(event.json(), include_usage=True)  # "usage": null on every chunk but the last
    assert events[0].json()["choices"][0]["delta"] == {"role": "assistant"}
    assert finish_reason(events) == "stop"
    usage = events[-2].json()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 31
    assert usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    status = client.get(f"/v1/sessions/{s}").json()
    assert status["status"] == "completed" and status["last_index"] == len(events) - 1
    assert (
        status["finish_reason"] == "stop"
        and status["usage"]["total_tokens"] == usage["usage"]["total_tokens"]
    )
    assert set(status) == {"id", "status", "created", "updated", "last_index", "finish_reason", "usage"}


def test_non_stream_completion_matches_its_session_replay(client: httpx.Client) -> None:
    s = sid()
    r = client.post("/v1/chat/completions", json={**body(tokens=25), "session_id": s})
    assert r.status_code == 200 and r.headers["x-session-id"] == s
    out = r.json()
    check_completion(out)  # the SDK's types and the reference's required keys (message.refusal included)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    reasoning, content = text_of(replay(client, s))
    assert (choice["message"]["reasoning_content"], choice["message"]["content"]) == (reasoning, content)
    assert content and reasoning
    u = out["usage"]
    assert u["completion_tokens"] == 26 and u["total_tokens"] == u["prompt_tokens"] + 26
    assert u["prompt_tokens_details"] == {"cached_tokens": 0}  # the OpenAI shape (the fake caches nothing)


def test_max_completion_tokens_wins_and_length_is_reported(client: httpx.Client) -> None:
    out = client.post(
        "/v1/chat/completions", json={**body(tokens=50), "max_tokens": 40, "max_completion_tokens": 5}
    ).json()
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 5


def test_image_data_url_reaches_the_model(client: httpx.Client) -> None:
    content = [
        {"type": "text", "text": "what is this [[fake:tokens=5]]"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_b64()}"}},
    ]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] >= 64  # the fake engine counts 64 per image


# ---- resume and attach -----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["header", "query", "bare", "get"])
def test_resume_after_a_dropped_connection(client: httpx.Client, form: str) -> None:
    s = sid()
    payload = {**body(tokens=150), "session_id": s}
    head = stream(client, payload, limit=5)  # then the connection drops
    last = head[-1].id
    assert last == f"{s}:4"
    if form == "get":
        tail = replay(client, s, last)
    else:
        headers = {"Last-Event-ID": last if form == "header" else "4"} if form != "query" else {}
        params = {"last_event_id": last} if form == "query" else {}
        tail = stream(client, payload, headers=headers, params=params)
    check_stream(tail, s, first=5)
    full = replay(client, s)
    check_stream(full, s)
    assert [e.data for e in head + tail] == [e.data for e in full]


def test_post_without_last_event_id_replays_and_never_starts_a_second_generation(
    client: httpx.Client,
) -> None:
    s = sid()
    payload = {**body(tokens=60), "session_id": s}
    results: dict[str, object] = {}
    t = threading.Thread(target=lambda: results.update(first=stream(client, payload)))
    t.start()
    second = client.post(
        "/v1/chat/completions", json={**payload, "messages": [{"role": "user", "content": "x"}]}
    )
    t.join(30)
    first = results["first"]
    assert second.status_code == 200
    assert second.json()["id"] == first[0].json()["id"]  # type: ignore[index]
    assert second.json()["choices"][0]["message"]["content"] == text_of(first)[1]  # type: ignore[arg-type]


def test_resume_of_an_unknown_session_is_404(client: httpx.Client) -> None:
    assert_error(client.get("/v1/sessions/nope-nope"), 404, "not_found_error")
    assert_error(client.get("/v1/sessions/nope-nope/events"), 404, "not_found_error")
    r = client.post(
        "/v1/chat/completions",
        json={**body(), "session_id": "nope", "stream": True},
        headers={"Last-Event-ID": "nope:3"},
    )
    assert_error(r, 404, "not_found_error")
    r = client.post(
        "/v1/chat/completions", json={**body(), "session_id": "a1"}, headers={"Last-Event-ID": "b1:3"}
    )
    assert_error(r, 400, "invalid_request_error")


# ---- cancel ------------------------------------------------------------------------------------------------


def test_cancel_ends_the_stream_with_cancelled_and_usage(client: httpx.Client) -> None:
    s = sid()
    payload = {
        **body(tokens=5000),
        "session_id": s,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        events_in = (e for e in iter_sse(r) if e is not None)
        head = [next(events_in) for _ in range(3)]
        started = time.monotonic()
        c = client.post(f"/v1/cancel/{s}")
        assert c.status_code == 200 and c.json() == {"ok": True, "session_id": s, "status": "cancelled"}
        assert time.monotonic() - started < 5
        rest = list(events_in)
    events = head + rest
    check_stream(events, s)
    assert finish_reason(events) == "cancelled" and "usage" in events[-2].json()
    again = client.post(f"/v1/cancel/{s}")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    done = sid()
    client.post("/v1/chat/completions", json={**body(tokens=3), "session_id": done})
    assert client.post(f"/v1/cancel/{done}").json()["status"] == "completed"
    assert_error(client.post("/v1/cancel/unknown-x"), 404, "not_found_error")


def wait_status(client: httpx.Client, session_id: str, wanted: set[str], timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = client.get(f"/v1/sessions/{session_id}").json()["status"]
        if status in wanted:
            return status
        time.sleep(0.05)  # polling a condition, bounded by the deadline
    return status


def test_non_stream_client_that_leaves_cancels_at_once(client: httpx.Client, api: Service) -> None:
    s = sid()
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.Client(base_url=api.url, timeout=httpx.Timeout(5, read=0.5)) as c,
    ):
        c.post(
            "/v1/chat/completions",
            json={**body(tokens=5000), "session_id": s},
            headers={"Authorization": f"Bearer {KEY_A}"},
        )
    assert wait_status(client, s, {"cancelled"}, timeout=5) == "cancelled"


def test_a_stream_client_that_leaves_does_not_stop_the_generation(client: httpx.Client) -> None:
    s = sid()
    stream(client, {**body(tokens=80), "session_id": s}, limit=2)
    assert wait_status(client, s, {"completed", "cancelled", "failed"}) == "completed"


# ---- auth, ownership, errors ------------------------------------------------------------------------------


def test_auth_and_ownership(api: Service, client: httpx.Client) -> None:
    s = sid()
    client.post("/v1/chat/completions", json={**body(tokens=3), "session_id": s})
    with httpx.Client(base_url=api.url, timeout=10) as anon:
        r = anon.post("/v1/chat/completions", json=body())
        assert_error(r, 401, "authentication_error")
        assert r.headers["www-authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer wrong-key-value-123"}
        assert_error(anon.get("/v1/models", headers=wrong), 401, "authentication_error")
        assert anon.get("/health").status_code == 200
        other = {"Authorization": f"Bearer {KEY_B}"}
        assert_error(anon.get(f"/v1/sessions/{s}", headers=other), 404, "not_found_error")
        assert_error(anon.get(f"/v1/sessions/{s}/events", headers=other), 404, "not_found_error")
        assert_error(anon.post(f"/v1/cancel/{s}", headers=other), 404, "not_found_error")
        r = anon.post("/v1/chat/completions", json={**body(), "session_id": s}, headers=other)
        assert_error(r, 404, "not_found_error")
    log = api.proc.log_path.read_text()
    assert KEY_A not in log and KEY_B not in log and "wrong-key-value-123" not in log


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"n": 9}, "n"),  # above MAX_N (8)
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"temperature": 5}, "temperature"),
        ({"session_id": "has space"}, "session_id"),
    ],
)
def test_bad_parameters_are_400_naming_them(client: httpx.Client, payload: dict, param: str) -> None:
    err = assert_error(
        client.post("/v1/chat/completions", json={**body(), **payload}), 400, "invalid_request_error"
    )
    assert err["param"] == param


def test_error_statuses(client: httpx.Client) -> None:
    r = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(r, 400, "invalid_request_error")
    assert_error(client.post("/v1/chat/completions", json={"messages": "x"}), 400, "invalid_request_error")
    assert_error(client.get("/v1/nothing-here"), 404, "not_found_error")
    assert_error(
        client.post("/v1/chat/completions", content=b"x" * (MAX_BODY + 1)), 413, "invalid_request_error"
    )
    long_prompt = " ".join(["word"] * 5000)
    err = assert_error(
        client.post("/v1/chat/completions", json=body(long_prompt)), 400, "invalid_request_error"
    )
    assert err["code"] == "context_length_exceeded"
    assert "prompt_too_long" not in client.get("/metrics").text  # the client's input: no model failure
    for url in ("file:///etc/passwd", "http://127.0.0.1:1/x.png", "data:image/png;base64,!!!!"):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
        assert (
            assert_error(r, 400, "invalid_request_error")["param"] == "messages[0].content[0].image_url.url"
        )
    r = client.get("/v1/models", headers={"X-Request-Id": "my-req-1"})
    assert r.headers["x-request-id"] == "my-req-1"


def test_model_error_mid_stream_is_one_error_event_then_done(client: httpx.Client) -> None:
    s = sid()
    events = stream(client, {**body("fail [[fake:error]]"), "session_id": s})
    assert events[-1].data == "[DONE]" and "error" in events[-2].json()
    assert [e.index for e in events] == list(range(len(events)))
    assert client.get(f"/v1/sessions/{s}").json()["status"] == "failed"
    assert_error(client.post("/v1/chat/completions", json=body("fail [[fake:error]]")), 500, "server_error")


# ---- other endpoints --------------------------------------------------------------------------------------


def test_models_health_ready_metrics(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert client.get(f"/v1/models/{models['data'][0]['id']}").status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    page = client.get("/metrics").text
    for name in (
        "api_requests_total",
        "api_request_duration_seconds",
        "api_active_streams",
        "api_resumes_total",
        "api_cancels_total",
        "api_store_latency_seconds",
        "api_events_written_total",
        "api_model_errors_total",
        "api_time_to_first_token_seconds",
    ):
        assert name in page, name
    assert KEY_A not in page
