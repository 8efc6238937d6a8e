"""Two api processes on one session store (two gunicorn workers or replicas, made explicit): a client of one
process leaving a non-streaming request must not cancel a generation that a client of the other still reads.

A fault-and-race hunt found it: client A streamed a session through one worker, client B sent the same
``session_id`` without ``stream`` through the other and gave up; B's worker saw no reader of its own and
cancelled A's stream (5 runs in 6).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.api.sse import check_stream, finish_reason, iter_sse, read_sse
from tests.helpers.stack import Service, start_api, start_model

pytestmark = pytest.mark.integration

KEY = "key-shared-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def apis(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Service]]:
    logs = tmp_path_factory.mktemp("shared-sessions")
    model = start_model(logs, env={"FAKE_STEP_SECONDS": "0.01"})
    env = {
        "API_KEYS": KEY,
        "SESSIONS_DB_PATH": str(logs / "sessions.db"),
        "CANCEL_AFTER_DISCONNECT_SECONDS": "0",  # auto-cancel off: only the non-streaming rule may cancel
    }
    if request.param == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_dsn")
    one = start_api(logs, model_urls=[model.url], env=env, gunicorn=False, name="api-one")
    two = start_api(logs, model_urls=[model.url], env=env, gunicorn=False, name="api-two")
    try:
        yield one, two
    finally:
        two.proc.stop()
        one.proc.stop()
        model.proc.stop()


def body(session_id: str, stream: bool, tokens: int = 300) -> dict[str, object]:
    text = f"tell a story [[fake:tokens={tokens}]]"
    return {"messages": [{"role": "user", "content": text}], "session_id": session_id, "stream": stream}


def leave_early(api: Service, payload: dict[str, object], after: float) -> None:
    """A non-streaming client that gives up after ``after`` seconds of waiting for the answer."""
    timeout = httpx.Timeout(10, read=after)
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=api.url, timeout=timeout) as c:
        c.post("/v1/chat/completions", json=payload, headers=AUTH)


def test_a_client_that_attached_elsewhere_and_left_does_not_cancel_the_stream(apis: tuple) -> None:
    one, two = apis
    sid = f"shared-{uuid.uuid4().hex[:8]}"
    with (
        httpx.Client(base_url=one.url, headers=AUTH, timeout=30) as a,
        a.stream("POST", "/v1/chat/completions", json=body(sid, stream=True)) as r,
    ):
        assert r.status_code == 200
        events = iter_sse(r)
        head = [e for e in (next(events) for _ in range(3)) if e is not None]
        leave_early(two, body(sid, stream=False), after=0.3)  # attached to A's session, then gone
        rest = [e for e in events if e is not None]
    stream = head + rest
    check_stream(stream, sid)
    assert finish_reason(stream) in {"stop", "length"}


def test_the_starter_leaving_does_not_cancel_what_a_client_elsewhere_follows(apis: tuple) -> None:
    one, two = apis
    sid = f"shared-{uuid.uuid4().hex[:8]}"
    outcome: list[BaseException | None] = []

    def starter_leaves() -> None:
        try:
            leave_early(one, body(sid, stream=False), 1.5)
            outcome.append(None)
        except BaseException as exc:  # reported below, in the test's thread
            outcome.append(exc)

    starter = threading.Thread(target=starter_leaves)
    starter.start()
    with httpx.Client(base_url=two.url, headers=AUTH, timeout=30) as b:
        deadline = time.monotonic() + 10
        while b.get(f"/v1/sessions/{sid}").status_code == 404:  # the starter's request has not landed yet
            assert time.monotonic() < deadline
            time.sleep(0.02)  # polling a condition, bounded by the deadline
        with b.stream("GET", f"/v1/sessions/{sid}/events") as r:
            assert r.status_code == 200
            events = read_sse(r)  # the starter leaves while this reads
        starter.join(10)
        assert outcome == [None], outcome  # the starter did wait 1.5 s and leave without an answer
        assert finish_reason(events) in {"stop", "length"}, events[-3:]
        assert b.get(f"/v1/sessions/{sid}").json()["status"] == "completed"


def test_the_starter_leaving_alone_still_cancels_at_once(apis: tuple) -> None:
    one, _two = apis
    sid = f"shared-{uuid.uuid4().hex[:8]}"
    leave_early(one, body(sid, stream=False, tokens=3000), after=0.3)
    with httpx.Client(base_url=one.url, headers=AUTH, timeout=30) as c:
        deadline = time.monotonic() + 5
        while (status := c.get(f"/v1/sessions/{sid}").json()["status"]) != "cancelled":
            assert status in {"queued", "running"} and time.monotonic() < deadline, status
            time.sleep(0.05)  # polling a condition, bounded by the deadline
