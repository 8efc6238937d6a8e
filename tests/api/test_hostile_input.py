"""Hostile and odd input (issue 9): every bad value is a clear 400 in the OpenAI shape naming the parameter,
with ``X-Request-Id``; nothing reaches a place where it overflows, recurses or fails to encode; and the
service, and every other request, carries on.

Unit tests of the bounded decoding first, then the api as a real process (uvicorn) against the real model
service (ENGINE=fake), on SQLite and on Postgres.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.api.errors import BadRequest, public_text
from services.api.json_body import MAX_DEPTH, parse_json_body
from tests.api.openai_shapes import check_error
from tests.api.sse import check_stream, finish_reason, iter_sse, read_sse
from tests.helpers.stack import Service, start_api, start_model

MESSAGE = '{"role":"user","content":"hi"}'


def raw(body: str) -> bytes:
    """A request body given as JSON text (escapes such as a lone ``\\ud83d`` stay as the client sent them)."""
    return body.encode()


# ---- unit: bounded decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"messages":[{"role":"user","content":"a\\ud83d b"}]}', "messages[0].content"),
        (
            '{"messages":[{"role":"user","content":[{"type":"text","text":"\\udc00"}]}]}',
            "messages[0].content[0].text",
        ),
        ('{"messages":[' + MESSAGE + '],"stop":["ok","x\\ud800"]}', "stop[1]"),
        ('{"messages":[' + MESSAGE + '],"user":"\\ud83d"}', "user"),  # ignored fields too: one rule
        ('{"messages":[' + MESSAGE + '],"metadata":{"\\ud83d":1}}', "metadata"),
    ],
)
def test_an_unpaired_surrogate_anywhere_is_a_400_naming_its_place(body: str, param: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_json_body(raw(body))
    assert info.value.param == param and info.value.code == "invalid_unicode"


def test_paired_surrogates_and_non_ascii_text_pass() -> None:
    data = parse_json_body(raw('{"t":"\\ud83d\\ude00 ünï 中文"}'))
    assert data == {"t": "😀 ünï 中文"}


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
def test_deep_nesting_is_a_400_not_a_recursion_error(depth: int) -> None:
    body = '{"messages":[' + MESSAGE + '],"metadata":' + "[" * depth + "]" * depth + "}"
    with pytest.raises(BadRequest) as info:
        parse_json_body(raw(body))
    assert "nested" in info.value.message and info.value.code == "invalid_json"


def test_nesting_up_to_the_limit_passes() -> None:
    inner = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    assert parse_json_body(raw('{"a":' + inner + "}"))["a"] is not None


@pytest.mark.parametrize(
    "body", ["{", '{"a":NaN}', '{"a":Infinity}', '{"a":-Infinity}', '{"a":1e999}', "\xff"]
)
def test_malformed_json_and_non_finite_numbers_are_invalid_json(body: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_json_body(body.encode("latin-1"))
    assert info.value.code == "invalid_json"


def test_public_text_drops_object_reprs_and_paths() -> None:
    text = public_text("cannot identify image file <_io.BytesIO object at 0x7f3a2b1c0d90> in /usr/lib/x.py")
    assert "0x" not in text and "_io" not in text and "/usr/lib" not in text
    assert public_text("x" * 1000).__len__() == 300


# ---- the api as a real process ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def model(logs: Path) -> Iterator[Service]:
    svc = start_model(logs, env={"FAKE_STEP_SECONDS": "0.01", "FAKE_CONTEXT_TOKENS": "4096"})
    yield svc
    svc.proc.stop()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request: pytest.FixtureRequest, logs: Path, model: Service) -> Iterator[Service]:
    env = {
        "CANCEL_AFTER_DISCONNECT_SECONDS": "0",
        "SESSIONS_DB_PATH": str(logs / f"sessions-{uuid.uuid4().hex[:6]}.db"),
        "MAX_MESSAGES": "50",
        "MAX_CONTENT_PARTS": "8",
    }
    if request.param == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_dsn")
    svc = start_api(
        logs, model_urls=[model.url], env=env, gunicorn=False, name=f"api-hostile-{request.param}"
    )
    yield svc
    svc.proc.stop()


@pytest.fixture
def client(api: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=30) as c:
        yield c


def chat(tokens: int = 5, **extra: object) -> dict[str, object]:
    content = f"describe the cat [[fake:tokens={tokens}]]"
    return {"model": "x", "messages": [{"role": "user", "content": content}], **extra}


def assert_400(response: httpx.Response, param: str | None) -> dict[str, object]:
    assert response.status_code == 400, response.text
    assert response.headers.get("x-request-id")
    assert response.headers["content-type"].startswith("application/json")
    error = check_error(response.json())
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert not re.search(r"0x[0-9a-fA-F]{6,}", str(error["message"])) and "Traceback" not in str(
        error["message"]
    )
    return error


def post_raw(client: httpx.Client, body: str, **headers: str) -> httpx.Response:
    return client.post(
        "/v1/chat/completions", content=raw(body), headers={"content-type": "application/json", **headers}
    )


def completed_session(client: httpx.Client) -> tuple[str, int]:
    """A finished streamed session: (id, index of its [DONE])."""
    s = f"h-{uuid.uuid4().hex[:12]}"
    with client.stream("POST", "/v1/chat/completions", json={**chat(), "stream": True, "session_id": s}) as r:
        events = read_sse(r)
    check_stream(events, s)
    return s, events[-1].index


BAD_NUMBERS = [
    ("seed", 2**64, "seed"),
    ("seed", -(2**63) - 1, "seed"),
    ("seed", 1e30, "seed"),
    ("top_k", 2**64, "top_k"),
    ("top_k", -2, "top_k"),
    ("max_tokens", 2**31, "max_tokens"),
    ("max_completion_tokens", 0, "max_completion_tokens"),
    ("temperature", 2.5, "temperature"),
    ("top_p", 0, "top_p"),
    ("presence_penalty", 1e308, "presence_penalty"),
    ("frequency_penalty", -3, "frequency_penalty"),
    ("repetition_penalty", 0, "repetition_penalty"),
    ("n", 0, "n"),
    ("top_logprobs", 21, "top_logprobs"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("field", "value", "param"), BAD_NUMBERS)
def test_every_number_out_of_range_is_a_400_naming_it(
    client: httpx.Client, field: str, value: object, param: str
) -> None:
    assert_400(client.post("/v1/chat/completions", json=chat(**{field: value})), param)


@pytest.mark.integration
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_malformed_json(client: httpx.Client, literal: str) -> None:
    body = json.dumps(chat())[:-1] + f',"temperature":{literal}}}'
    assert assert_400(post_raw(client, body), None)["code"] == "invalid_json"


@pytest.mark.integration
def test_hostile_requests_beside_decoding_streams_are_refused_and_hurt_none(
    client: httpx.Client, model: Service
) -> None:
    """The api refuses the values at its schema, and the model service refuses them again at its own (it never
    trusts a caller), while four streams are decoding; every stream ends normally. (That the engine isolates a
    row whose values got through: tests/model/test_isolation.py.)"""
    results: list[tuple[str, list]] = []
    decoding = threading.Barrier(5, timeout=30)

    def run(i: int) -> None:
        s = f"n-{i}-{uuid.uuid4().hex[:8]}"
        payload = {**chat(200), "stream": True, "session_id": s}
        with client.stream("POST", "/v1/chat/completions", json=payload) as r:
            events = []
            for event in iter_sse(r):
                if event is not None:
                    events.append(event)
                    if len(events) == 3:  # role chunk + two text chunks: this stream is decoding
                        decoding.wait()
            results.append((s, events))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    decoding.wait()
    internal = {"request_id": "hostile-1", "messages": [{"role": "user", "content": "x"}]}
    for field, value, param in BAD_NUMBERS[:4]:
        assert_400(client.post("/v1/chat/completions", json=chat(**{field: value})), param)
        r = httpx.post(f"{model.url}/internal/v1/generate", json={**internal, "sampling": {field: value}})
        assert r.status_code == 400, r.text
    for t in threads:
        t.join(60)
    assert len(results) == 4
    for s, events in results:
        check_stream(events, s)
        assert finish_reason(events) == "stop"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model":"x","messages":[{"role":"user","content":"a\\ud83d b"}]}', "messages[0].content"),
        (
            '{"model":"x","messages":[{"role":"user","content":[{"type":"text","text":"a\\ud83d"}]}]}',
            "messages[0].content[0].text",
        ),
        ('{"model":"x","messages":[' + MESSAGE + '],"stop":"\\udfff"}', "stop"),
    ],
)
def test_text_that_cannot_be_encoded_is_a_400(client: httpx.Client, body: str, param: str) -> None:
    assert assert_400(post_raw(client, body), param)["code"] == "invalid_unicode"


@pytest.mark.integration
@pytest.mark.parametrize("depth", [1000, 50_000])
def test_deep_nesting_in_any_field_is_a_400(client: httpx.Client, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    for field in ("metadata", "tool_choice", "messages"):
        body = json.dumps(chat())[:-1] + f',"{field}":{nested}}}'
        assert_400(post_raw(client, body), None)


@pytest.mark.integration
@pytest.mark.parametrize(
    "value",
    ["1" * 4301, "²", "x:²", "9223372036854775808", "x" * 8192, "a:b:1", "0x10", "3.0", "1e3"],
)
def test_malformed_or_out_of_range_last_event_ids_are_a_400(client: httpx.Client, value: str) -> None:
    s, _ = completed_session(client)
    value = value.replace("x:", f"{s}:")
    headers = {"Last-Event-ID": value.encode("utf-8")}  # raw UTF-8 bytes on the wire
    assert_400(client.get(f"/v1/sessions/{s}/events", headers=headers), "Last-Event-ID")
    assert_400(client.get(f"/v1/sessions/{s}/events", params={"last_event_id": value}), "Last-Event-ID")
    resume = {**chat(), "stream": True, "session_id": s}
    assert_400(client.post("/v1/chat/completions", json=resume, headers=headers), "Last-Event-ID")


@pytest.mark.integration
@pytest.mark.parametrize("past", [0, 1, 10**18])
def test_resuming_at_or_past_the_end_of_a_finished_session_ends_the_stream(
    client: httpx.Client, past: int
) -> None:
    s, done_index = completed_session(client)
    for headers, params in (
        ({"Last-Event-ID": f"{s}:{done_index + past}"}, {}),
        ({}, {"last_event_id": f"{done_index + past}"}),
    ):
        with client.stream("GET", f"/v1/sessions/{s}/events", headers=headers, params=params) as r:
            assert r.status_code == 200
            events = read_sse(r)
        # no event of the session (nothing is after the end), and the stream is ended by a bare [DONE]:
        # EventSource clients stop instead of reconnecting forever
        assert [(e.id, e.data) for e in events] == [(None, "[DONE]")]


@pytest.mark.integration
def test_error_messages_name_the_part_and_no_internals(client: httpx.Client) -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    content = [{"type": "text", "text": "hi"}, audio]
    error = assert_400(
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]}),
        "messages[0].content[1].type",
    )
    assert "input_audio" in error["message"]
    # (undecodable media: tests/model/test_media_messages.py; the model service decodes them)
    part = {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}
    assert_400(
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}]}),
        "messages[0].content[0].image_url.url",
    )
    bad_role = {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "x"}]}
    assert_400(client.post("/v1/chat/completions", json=bad_role), "messages[1].role")


@pytest.mark.integration
def test_cheap_bounds_refuse_oversized_requests_before_any_work(client: httpx.Client) -> None:
    many = {"messages": [{"role": "user", "content": "x"}] * 51}
    assert_400(client.post("/v1/chat/completions", json=many), "messages")
    parts = [{"type": "text", "text": "x"}] * 9
    wide = {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": parts}]}
    assert_400(client.post("/v1/chat/completions", json=wide), "messages[1].content")


@pytest.mark.integration
def test_the_service_still_answers_after_all_of_it(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json=chat(seed=2**63 - 1, top_k=-1, stop="never"))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert client.get("/v1/models").status_code == 200
