"""A part of the fuzzing through the edge (issue 9): the real nginx (rendered config) in front of the real api
(gunicorn) and model service (ENGINE=fake). Schemathesis drives the chat operation from the api's OpenAPI
document, and hypothesis sends raw requests with arbitrary header bytes (control characters included, which
only a raw socket can send). Every answer is below 500; every error is OpenAI JSON with ``X-Request-Id``,
whichever of nginx or the api made it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.openai_shapes import check_error
from tests.deploy.conftest import start_edge
from tests.deploy.test_edge_errors import raw_request
from tests.helpers.stack import Service, start_api, start_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = 60


@pytest.fixture(scope="module")
def stack(nginx_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str]]:
    work: Path = tmp_path_factory.mktemp("edge-fuzz")
    model = start_model(work, env={"FAKE_STEP_SECONDS": "0.0005", "MAX_TOKENS": "16", "MAX_QUEUE": "256"})
    api = edge = None
    try:
        api = start_api(work, model_urls=[model.url], env={"CANCEL_AFTER_DISCONNECT_SECONDS": "0"})
        edge, base = start_edge(nginx_bin, work, [f"127.0.0.1:{api.port}"], client_max_body_size="1m")
        yield api, base
    finally:
        for proc in (edge, api.proc if api else None, model.proc):
            if proc is not None:
                proc.stop()


@pytest.fixture(scope="module")
def session_id(stack: tuple[Service, str]) -> str:
    body = {"messages": [{"role": "user", "content": "hi [[fake:tokens=3]]"}], "session_id": "edge-fuzz-1"}
    r = httpx.post(f"{stack[1]}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return "edge-fuzz-1"


def test_the_chat_operation_through_the_edge(stack: tuple[Service, str]) -> None:
    api, base = stack
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=schema["/v1/chat/completions"]["POST"].as_strategy())
    def run(case: Any) -> None:
        response = case.call(base_url=base, timeout=60)
        headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in response.headers.items()}
        assert response.status_code < 500, response.content[:300]
        assert headers.get("x-request-id")
        if response.status_code >= 400:
            check_error(json.loads(response.content))

    run()


header_bytes = st.binary(max_size=200).filter(lambda b: b"\r\n" not in b and not b.endswith(b"\r"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    name=st.sampled_from(
        [b"Last-Event-ID", b"X-Request-Id", b"Authorization", b"X-Forwarded-For", b"Content-Type", b"Accept"]
    ),
    value=header_bytes,
)
def test_arbitrary_header_bytes_through_the_edge(
    stack: tuple[Service, str], session_id: str, name: bytes, value: bytes
) -> None:
    request = (
        b"GET /v1/sessions/"
        + session_id.encode()
        + b"/events HTTP/1.1\r\nHost: x\r\n"
        + name
        + b": "
        + value
        + b"\r\nConnection: close\r\n\r\n"
    )
    response = raw_request(stack[1], request)
    assert response.status < 500, response
    assert response.headers.get("x-request-id"), response
    if response.status >= 400:
        assert response.headers.get("content-type", "").startswith("application/json"), response
        check_error(json.loads(response.body))


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (b"X-Custom: a\x01b", 200),  # not forwarded: the api never sees it
        (b"User-Agent: \x7f", 200),
        (b"Last-Event-ID: 1\x01", 400),  # forwarded headers are checked at the edge, answered as JSON
        (b"Authorization: Bearer \x1b[31m", 400),
        (b"X-Forwarded-For: a\x01b", 400),  # forwarded (appended to) by the edge: checked too
        (b"X-Forwarded-For: a\x7fb", 400),
    ],
)
def test_control_characters_in_headers_never_reach_the_api(
    stack: tuple[Service, str], session_id: str, header: bytes, status: int
) -> None:
    """Found by the fuzzer: nginx passed such bytes on and the api's HTTP parser answered a plain-text 400."""
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n"
    response = raw_request(stack[1], request)
    assert response.status == status, response
    assert response.headers.get("x-request-id")
    assert response.headers.get("content-type", "").startswith("application/json"), response
    if status == 400:
        check_error(json.loads(response.body))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(target=st.binary(min_size=1, max_size=60).filter(lambda b: not (set(b) & set(b" \r\n\t"))))
def test_arbitrary_request_targets_through_the_edge(stack: tuple[Service, str], target: bytes) -> None:
    """Bytes outside printable ASCII in the request target never reach the api (whose parser would answer a
    plain-text 400): every answer is JSON with X-Request-Id."""
    request = b"GET /v1/" + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    response = raw_request(stack[1], request)
    assert response.status < 500, response
    assert response.headers.get("x-request-id"), response
    if response.status >= 400:
        assert response.headers.get("content-type", "").startswith("application/json"), response
        check_error(json.loads(response.body))
