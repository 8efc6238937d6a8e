"""The whole stack on the tiny real-architecture checkpoint: the model service (ENGINE=hf, CPU) and the api
under gunicorn with 2 workers (SQLite), driven by the official ``openai`` SDK and by raw HTTP: completions,
streams, media, resume at several points and through another worker, cancel and auto-cancel."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.sse import SseEvent, check_stream, finish_reason, iter_sse, read_sse, text_of
from tests.e2e.helpers import served_by
from tests.helpers.stack import Service, start_api, start_model
from tests.model.media import mp4_b64, png_b64

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

KEY = "e2e-key-0123456789"
OTHER_KEY = "e2e-other-0123456789"
AUTO_CANCEL_SECONDS = 2.0


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-sdk")


@pytest.fixture(scope="module")
def model(logs: Path, tiny_model_dir: Path) -> Iterator[Service]:
    env = {"MAX_BATCH_SIZE": "8", "MAX_TOKENS": "64", "INTERNAL_TOKEN": "internal-e2e-token"}
    svc = start_model(logs, model_dir=tiny_model_dir, env=env)
    yield svc
    svc.proc.stop()


@pytest.fixture(scope="module")
def api(logs: Path, model: Service) -> Iterator[Service]:
    env = {
        "API_KEYS": f"{KEY},{OTHER_KEY}",
        "INTERNAL_TOKEN": "internal-e2e-token",
        "CANCEL_AFTER_DISCONNECT_SECONDS": str(AUTO_CANCEL_SECONDS),
        "SSE_PING_SECONDS": "1",
    }
    svc = start_api(logs, model_urls=[model.url], env=env)
    yield svc
    svc.proc.stop()


@pytest.fixture
def sdk(api: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(api: Service) -> Iterator[httpx.Client]:
    # no keep-alive: every request is a new connection, so the kernel may hand it to either worker
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(
        base_url=api.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, limits=limits
    ) as c:
        yield c


def ask(text: str) -> list[dict[str, object]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


# ---- the SDK ------------------------------------------------------------------------------------------


def test_sdk_non_stream(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(model="any", messages=ask("hi"), max_tokens=12)  # type: ignore[arg-type]
    assert out.object == "chat.completion" and out.model
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length")
    reasoning = getattr(choice.message, "reasoning_content", None)
    assert (choice.message.content or "") + (reasoning or "")
    assert out.usage is not None and out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_sdk_stream_with_usage(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="any",
            messages=ask("count"),  # type: ignore[arg-type]
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens <= 20


@pytest.mark.parametrize("kind", ["image", "video"])
def test_sdk_media_data_urls(sdk: openai.OpenAI, kind: str) -> None:
    if kind == "image":
        part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_b64()}"}}
    else:
        part = {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{mp4_b64(frames=4)}"}}
    messages = [{"role": "user", "content": [part, {"type": "text", "text": f"describe the {kind}"}]}]
    out = sdk.chat.completions.create(model="any", messages=messages, max_tokens=8)  # type: ignore[arg-type]
    assert out.usage is not None and out.usage.prompt_tokens > 20  # the media became tokens


def test_sdk_errors_are_typed(sdk: openai.OpenAI, api: Service) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model="any", messages=ask("x"), n=9)  # type: ignore[arg-type]  # > MAX_N
    assert bad.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api.url}/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(
            model="any",
            messages=ask("x"),
            extra_body={"session_id": "zz"},
            extra_headers={"Last-Event-ID": "zz:1"},
        )  # type: ignore[arg-type]
    assert [m.id for m in sdk.models.list()]


# ---- resume ----------------------------------------------------------------------------------------------


def start_stream(http: httpx.Client, session_id: str, max_tokens: int, take: int) -> list[SseEvent]:
    payload = {
        "messages": ask("tell a story"),
        "max_tokens": max_tokens,
        "session_id": session_id,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=payload) as r:
        assert r.status_code == 200
        return read_sse(r, take)


def resume(
    http: httpx.Client, session_id: str, form: str, last: SseEvent, take: int | None
) -> tuple[list, str]:
    """Resume after ``last`` in one of the contract's forms; returns the events and the request id."""
    rid = uuid.uuid4().hex
    headers = {"X-Request-Id": rid}
    params: dict[str, str] = {}
    if form in ("post-header", "get-header"):
        headers["Last-Event-ID"] = str(last.id)
    elif form == "post-bare":
        headers["Last-Event-ID"] = str(last.index)
    else:
        params["last_event_id"] = str(last.id)
    if form.startswith("post"):
        payload = {"messages": ask("ignored on attach"), "session_id": session_id, "stream": True}
        ctx = http.stream("POST", "/v1/chat/completions", json=payload, headers=headers, params=params)
    else:
        ctx = http.stream("GET", f"/v1/sessions/{session_id}/events", headers=headers, params=params)
    with ctx as r:
        assert r.status_code == 200, r.read()
        return read_sse(r, take), rid


def test_resume_at_several_points_in_every_form_and_through_both_workers(
    http: httpx.Client, api: Service
) -> None:
    sid = f"e2e-{uuid.uuid4().hex[:10]}"
    rid0 = uuid.uuid4().hex
    http.headers["X-Request-Id"] = rid0
    seen = start_stream(http, sid, max_tokens=1200, take=3)
    del http.headers["X-Request-Id"]
    forms = ["post-header", "post-query", "post-bare", "get-header", "get-query"]
    pids = {served_by(api, rid0)}
    # drop after a few events each time, until both workers served and every form ran; the kernel hands a new
    # connection to either worker, unevenly, so a generation may end first: then resume at earlier points
    for i in range(200):
        form = forms[i % len(forms)]
        if seen[-1].data != "[DONE]":
            more, rid = resume(http, sid, form, seen[-1], take=3)
            assert [e.index for e in more] == list(range(seen[-1].index + 1, seen[-1].index + 1 + len(more)))
            seen += more
        else:
            k = i % (len(seen) - 1)
            more, rid = resume(http, sid, form, seen[k], take=3)
            assert [(e.id, e.data) for e in more] == [(e.id, e.data) for e in seen[k + 1 : k + 4]]
        pids.add(served_by(api, rid))
        if len(pids) > 1 and i >= len(forms):
            break
    rest, _ = resume(http, sid, "get-header", seen[-1], None) if seen[-1].data != "[DONE]" else ([], "")
    seen += rest
    assert len(pids) == 2, "every resume landed on the same worker"
    check_stream(seen, sid)
    full, _ = resume(http, sid, "get-query", SseEvent(f"{sid}:-1", ""), None)
    assert [e.data for e in seen] == [e.data for e in full]
    assert text_of(seen) == text_of(full)


# ---- cancel and auto-cancel ----------------------------------------------------------------------------


def status_of(http: httpx.Client, sid: str) -> dict:
    return http.get(f"/v1/sessions/{sid}").json()


def wait_status(http: httpx.Client, sid: str, wanted: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = status_of(http, sid)["status"]
        if status in wanted:
            return status
        time.sleep(0.1)  # polling a condition, bounded by the deadline
    return status


def test_cancel_from_another_connection(http: httpx.Client) -> None:
    sid = f"e2e-c-{uuid.uuid4().hex[:8]}"
    payload = {
        "messages": ask("go"),
        "max_tokens": 60000,
        "session_id": sid,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/chat/completions", json=payload) as r:
        events = (e for e in iter_sse(r) if e is not None)
        head = [next(events) for _ in range(2)]
        answer = http.post(f"/v1/cancel/{sid}").json()
        assert answer == {"ok": True, "session_id": sid, "status": "cancelled"}
        tail = list(events)
    stream = head + tail
    check_stream(stream, sid)
    assert finish_reason(stream) == "cancelled" and stream[-2].json()["usage"]["completion_tokens"] < 60000


def test_auto_cancel_after_everyone_left_but_not_while_someone_reads(
    http: httpx.Client, api: Service
) -> None:
    # a reader attached (through any worker) keeps the generation alive past the auto-cancel delay
    kept = f"e2e-k-{uuid.uuid4().hex[:8]}"
    # long enough to outlast the whole test on a fast CPU (6000 tokens finished within its ~8 s window on one)
    head = start_stream(http, kept, max_tokens=60000, take=2)
    stop_at = time.monotonic() + AUTO_CANCEL_SECONDS * 2

    def read_for_a_while() -> None:
        with http.stream(
            "GET", f"/v1/sessions/{kept}/events", headers={"Last-Event-ID": str(head[-1].id)}
        ) as r:
            for _ in iter_sse(r):
                if time.monotonic() > stop_at:
                    break

    reader = threading.Thread(target=read_for_a_while)
    reader.start()
    reader.join(30)
    assert status_of(http, kept)["status"] == "running"
    # ... and once nobody is attached, it is cancelled after CANCEL_AFTER_DISCONNECT_SECONDS
    assert (
        wait_status(http, kept, {"cancelled", "completed", "failed"}, timeout=AUTO_CANCEL_SECONDS + 8)
        == "cancelled"
    )
    full = read_sse(http.get(f"/v1/sessions/{kept}/events"))
    assert finish_reason(full) == "cancelled" and full[-1].data == "[DONE]"
    page = http.get("/metrics").text
    auto = re.search(r'^api_cancels_total\{kind="auto"\} (\S+)$', page, re.M)
    assert auto is not None and float(auto.group(1)) >= 1
