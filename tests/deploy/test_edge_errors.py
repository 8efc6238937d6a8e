"""Every error the edge makes itself is OpenAI JSON with X-Request-Id, even for requests nginx cannot parse.

A real nginx (the rendered config) in front of the stub upstream, driven over raw sockets so that the requests
can be as malformed as a hostile client makes them.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.deploy.conftest import start_edge
from tests.deploy.upstream_stub import upstream_stub
from tests.helpers.env import free_port

pytestmark = [pytest.mark.integration]

NGINX_ID = re.compile(r"^[0-9a-f]{32}$")  # nginx's $request_id


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def error(self) -> dict:
        """The OpenAI error object, after checking the shape, the content type and the request id."""
        assert self.headers.get("content-type", "").startswith("application/json"), self
        assert self.headers.get("x-request-id"), self
        parsed = json.loads(self.body)
        assert set(parsed) == {"error"}, parsed
        error = parsed["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["param"] is None and error["message"] and error["type"] and error["code"], error
        return error


def raw_request(base: str, data: bytes, timeout: float = 10.0) -> RawResponse:
    """Send ``data`` as-is on a new connection; read one response (headers + Content-Length body)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without a response: {buf!r}"
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside the body"
            body += chunk
    return RawResponse(status, headers, body[:length])


@pytest.fixture(scope="module")
def edge_base(nginx_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work: Path = tmp_path_factory.mktemp("edge-errors")
    with upstream_stub() as upstream:
        proc, base = start_edge(nginx_bin, work, [upstream], client_max_body_size="1m")
        try:
            yield base
        finally:
            proc.stop()


GET = b"GET /v1/echo HTTP/1.1\r\nHost: x\r\n"
CASES = {
    # name: (raw request, status, code)
    "bare CR in a header value": (GET + b"X-A: a\rb\r\n\r\n", 400, "bad_request"),
    "NUL in a header value": (GET + b"X-A: a\x00b\r\n\r\n", 400, "bad_request"),
    "obs-fold header continuation": (GET + b"X-A: a\r\n b\r\n\r\n", 400, "bad_request"),
    "space in a header name": (GET + b"X A: a\r\n\r\n", 400, "bad_request"),
    "malformed request line": (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    "extra token in the request line": (b"GET /v1/echo HTTP/1.1 x\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "control character in the URI": (b"GET /v1/\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "HTTP/1.1 without Host": (b"GET /v1/echo HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "Content-Length and Transfer-Encoding": (
        b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    "non-numeric Content-Length": (
        b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        400,
        "bad_request",
    ),
    "malformed chunk": (
        b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
        "bad_request",
    ),
    "URI over 8 KB": (b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    "header line over 8 KB": (GET + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "request_header_too_large"),
    "declared body over the limit": (
        b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n",
        413,
        "request_too_large",
    ),
    "TRACE": (b"TRACE /v1/echo HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    "unknown Transfer-Encoding": (
        b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
        "not_implemented",
    ),
    "HTTP/2.0 request line": (b"GET /v1/echo HTTP/2.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
    "unknown route": (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_edge_errors_are_openai_json_with_a_request_id(edge_base: str, case: str) -> None:
    data, status, code = CASES[case]
    resp = raw_request(edge_base, data)
    assert resp.status == status, resp
    error = resp.error()
    assert error["code"] == code
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert NGINX_ID.match(resp.headers["x-request-id"]), resp.headers
    assert b"<html" not in resp.body.lower() and b"nginx" not in resp.body.lower()
    # The edge still serves afterwards.
    assert httpx.get(f"{edge_base}/health", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "sent,echoed",
    [
        ("client-id_1.2:3", True),  # sane: the api's rule, 1-128 of [A-Za-z0-9._:-]
        ("has space", False),
        ("x" * 129, False),
        ("<script>", False),
    ],
)
def test_edge_error_keeps_only_a_sane_client_request_id(edge_base: str, sent: str, echoed: bool) -> None:
    data = GET + f"X-Request-Id: {sent}\r\n".encode() + b"X-A: a\x00\r\n\r\n"
    resp = raw_request(edge_base, data)
    assert resp.status == 400
    resp.error()
    rid = resp.headers["x-request-id"]
    assert rid == sent if echoed else NGINX_ID.match(rid), rid


def test_api_down_answers_503_json_with_retry_after(nginx_bin: str, tmp_path: Path) -> None:
    proc, base = start_edge(nginx_bin, tmp_path, [f"127.0.0.1:{free_port()}"], retry_after_seconds=3)
    try:
        for method in (b"GET", b"POST"):
            data = method + b" /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            resp = raw_request(base, data)
            assert resp.status == 503, resp
            error = resp.error()
            assert (error["type"], error["code"]) == ("service_unavailable_error", "upstream_unavailable")
            assert resp.headers["retry-after"] == "3"
    finally:
        proc.stop()


def test_per_key_concurrency_limit_answers_429_json(nginx_bin: str, tmp_path: Path) -> None:
    """EDGE_CONN_LIMIT: a key holding that many open requests (a stream) gets 429 for one more; other keys and
    the same key once the stream ended are served."""
    with upstream_stub() as upstream:
        proc, base = start_edge(nginx_bin, tmp_path, [upstream], conn_limit=1)
        try:
            key_a, key_b = {"Authorization": "Bearer a"}, {"Authorization": "Bearer b"}
            with httpx.Client(base_url=base, timeout=10) as client:
                with client.stream("GET", "/v1/stream?n=3&gap=0.3", headers=key_a) as stream:
                    assert stream.status_code == 200
                    limited = client.get("/v1/echo", headers=key_a)
                    other = client.get("/v1/echo", headers=key_b)
                    stream.read()
                assert limited.status_code == 429, limited.text
                assert limited.headers["content-type"].startswith("application/json")
                assert limited.headers["retry-after"] == "1" and limited.headers["x-request-id"]
                error = limited.json()["error"]
                assert (error["type"], error["code"]) == ("rate_limit_error", "concurrency_limit_exceeded")
                assert "limit 1" in error["message"]
                assert other.status_code == 200
                assert client.get("/v1/echo", headers=key_a).status_code == 200
                # one key in another spelling of the header is the same key (the api reads it so too)
                with client.stream("GET", "/v1/stream?n=3&gap=0.3", headers=key_a) as stream:
                    assert stream.status_code == 200
                    respelled = [
                        client.get("/v1/echo", headers={"Authorization": spelling})
                        for spelling in ("bearer a", "BEARER   a", "Bearer\ta")
                    ]
                    stream.read()
                assert [r.status_code for r in respelled] == [429, 429, 429]
        finally:
            proc.stop()
