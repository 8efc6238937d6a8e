"""The edge config on a real nginx: rendering, validation, and its behaviour in front of a stub upstream."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from deploy.nginx.render import (
    ENV_OPTIONS,
    TEMPLATE,
    EdgeSettings,
    options_from_env,
    render,
    render_settings,
    substitute,
)
from tests.deploy.conftest import EdgeFactory, check_config
from tests.deploy.upstream_stub import upstream_stub
from tests.helpers.env import REPO, free_port, require_binary

ENTRYPOINT = REPO / "deploy" / "nginx" / "entrypoint.sh"


def assert_openai_error(resp: httpx.Response, status: int, err_type: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == err_type
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert resp.headers.get("x-request-id")
    return body


def test_rendered_config_passes_nginx_t(nginx_bin: str, tmp_path: Path) -> None:
    conf = render(tmp_path / "edge", free_port(), ["127.0.0.1:8000", "127.0.0.1:8002"])
    checked = check_config(nginx_bin, conf)
    assert checked.returncode == 0, checked.stderr
    text = conf.read_text()
    assert "${" not in text.replace("${EDGE_*}", "").replace("${name}", "")
    assert text.count("server 127.0.0.1:80") == 2


def test_a_broken_config_fails_nginx_t(nginx_bin: str, tmp_path: Path) -> None:
    conf = render(tmp_path / "edge", free_port(), ["127.0.0.1:8000"])
    conf.write_text(conf.read_text().replace("proxy_buffering off;", "proxy_bufering off;"))
    assert check_config(nginx_bin, conf).returncode != 0


@pytest.mark.parametrize(
    "field,value",
    [
        ("api_upstreams", ["api:8000; evil"]),
        ("api_upstreams", []),
        ("client_max_body_size", "64 m"),
        ("rate_limit", "10/s"),
        ("read_timeout", "1x"),
        ("listen", "0.0.0.0:80;"),
    ],
)
def test_settings_reject_bad_values(field: str, value: object, tmp_path: Path) -> None:
    base = {"listen": "8080", "api_upstreams": ["api:8000"], "runtime_dir": tmp_path}
    with pytest.raises(ValueError, match=field):
        EdgeSettings(**{**base, field: value}).values()  # type: ignore[arg-type]


def test_every_placeholder_needs_a_value() -> None:
    with pytest.raises(KeyError, match="EDGE_LISTEN"):
        substitute(TEMPLATE.read_text(), {})


def test_options_from_env_takes_every_edge_variable() -> None:
    env = {
        "EDGE_CLIENT_MAX_BODY_SIZE": "2m",
        "EDGE_RATE_LIMIT": "5r/s",
        "EDGE_RATE_BURST": "7",
        "EDGE_CONN_LIMIT": "3",
        "EDGE_RETRY_AFTER_SECONDS": "4",
        "EDGE_READ_TIMEOUT": "90s",
        "EDGE_CLIENT_TIMEOUT": "15s",
        "EDGE_WORKER_PROCESSES": "2",
        "EDGE_WORKER_CONNECTIONS": "512",
        "UNRELATED": "x",
    }
    assert set(env) - {"UNRELATED"} == set(ENV_OPTIONS)
    options = options_from_env(env)
    assert options == {
        "client_max_body_size": "2m",
        "rate_limit": "5r/s",
        "rate_burst": 7,
        "conn_limit": 3,
        "retry_after_seconds": 4,
        "read_timeout": "90s",
        "client_timeout": "15s",
        "worker_processes": "2",
        "worker_connections": 512,
    }
    assert options_from_env({"EDGE_RATE_LIMIT": ""}) == {}  # empty: the default


@pytest.mark.parametrize(
    "name,value",
    [
        ("EDGE_RATE_LIMIT", "10/s"),
        ("EDGE_RATE_BURST", "-1"),
        ("EDGE_CONN_LIMIT", "0"),
        ("EDGE_CONN_LIMIT", "many"),
        ("EDGE_CLIENT_TIMEOUT", "1 minute"),
        ("EDGE_WORKER_PROCESSES", "all"),
        ("EDGE_CLIENT_MAX_BODY_SIZE", "64m;"),
    ],
)
def test_options_from_env_names_a_bad_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{name}="):
        options_from_env({name: value})


def _defaults_in(path: Path, pattern: str) -> dict[str, str]:
    return dict(re.findall(pattern, path.read_text(), flags=re.MULTILINE))


def test_edge_defaults_are_the_same_everywhere() -> None:
    """render.py (make run), entrypoint.sh, compose, Kubernetes and .env.example: one set of EDGE_* names and
    defaults, and .env.example lists exactly the variables make run honours."""
    fields = {f.name: f.default for f in dataclasses.fields(EdgeSettings)}
    expected = {name: str(fields[field]) for name, (field, _) in ENV_OPTIONS.items()}
    sources = {
        ".env.example": _defaults_in(REPO / ".env.example", r"^(EDGE_[A-Z_]+)=(\S*)$"),
        "entrypoint.sh": _defaults_in(ENTRYPOINT, r'^: "\$\{(EDGE_[A-Z_]+):=([^}]*)\}"$'),
        "compose.yaml": _defaults_in(
            REPO / "deploy/docker/compose.yaml", r"^\s+(EDGE_[A-Z_]+): \$\{EDGE_[A-Z_]+:-([^}]*)\}$"
        ),
        "k8s edge.env": _defaults_in(REPO / "deploy/k8s/edge.env", r"^(EDGE_[A-Z_]+)=(\S*)$"),
    }
    assert sources[".env.example"] == expected
    for name, found in sources.items():
        assert {k: found.get(k) for k in expected} == expected, name


def _run_entrypoint(tmp_path: Path, **env: str) -> Path:
    require_binary("envsubst")
    full = {
        "PATH": os.environ["PATH"],
        "EDGE_RENDER_ONLY": "1",
        "EDGE_TEMPLATE": str(TEMPLATE),
        "EDGE_RUNTIME_DIR": str(tmp_path / "sh"),
        **env,
    }
    out = subprocess.run(["sh", str(ENTRYPOINT)], env=full, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


def test_container_entrypoint_renders_the_same_config(tmp_path: Path, nginx_bin: str) -> None:
    """entrypoint.sh (envsubst, in the containers) and render.py give the same file for the same settings."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search svc.cluster.local\nnameserver 127.0.0.11\noptions ndots:0\n")
    sh_conf = _run_entrypoint(
        tmp_path,
        EDGE_API_UPSTREAMS="api:8000,api-2:8000",
        EDGE_RESOLVER="auto",
        EDGE_RESOLV_CONF=str(resolv),
        EDGE_RATE_BURST="7",
    )
    py_settings = EdgeSettings(
        listen="8080",
        api_upstreams=["api:8000", "api-2:8000"],
        runtime_dir=tmp_path / "py",
        resolver="127.0.0.11",
        rate_burst=7,
        error_log="/dev/stderr",
        access_log="/dev/stdout",
    )
    py_conf = render_settings(py_settings)
    normalise = lambda p: p.read_text().replace(str(p.parent), "RUNTIME")  # noqa: E731
    assert normalise(sh_conf) == normalise(py_conf)
    assert "server api:8000 resolve;" in sh_conf.read_text()
    assert "resolver 127.0.0.11 valid=10s" in sh_conf.read_text()


def test_container_config_without_resolver_passes_nginx_t(tmp_path: Path, nginx_bin: str) -> None:
    """The Kubernetes form (no resolver); the compose form adds `resolve`, which needs nginx >= 1.27.3."""
    conf = _run_entrypoint(
        tmp_path,
        EDGE_API_UPSTREAMS="127.0.0.1:8000",
        EDGE_LISTEN=f"127.0.0.1:{free_port()}",
        EDGE_ERROR_LOG=str(tmp_path / "error.log"),
        EDGE_ACCESS_LOG=str(tmp_path / "access.log"),
        EDGE_WORKER_PROCESSES="1",
    )
    checked = check_config(nginx_bin, conf)
    assert checked.returncode == 0, checked.stderr


# --- behaviour on a real nginx in front of a stub upstream ------------------------------------------------


@pytest.mark.integration
def test_sse_passes_through_unbuffered_with_headers(edge: EdgeFactory) -> None:
    with upstream_stub() as upstream:
        base = edge([upstream])
        arrivals: list[float] = []
        t0 = time.monotonic()
        with httpx.stream("GET", f"{base}/v1/stream?n=6&gap=0.25", timeout=10) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert "content-encoding" not in resp.headers
            # The contract's header for streams (nginx consumes an upstream's own), and buffering stays off.
            assert resp.headers["x-accel-buffering"] == "no"
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.monotonic() - t0)
        assert len(arrivals) == 7  # 6 events + [DONE]
        # Spread over the generation (~1.5 s), not delivered together at the end.
        assert arrivals[0] < 0.8, arrivals
        assert arrivals[-1] - arrivals[0] > 1.0, arrivals

        # Resume header passes through: the stub replays after the given id.
        resume = {"Last-Event-ID": "1"}
        with httpx.stream("GET", f"{base}/v1/stream?n=4&gap=0", headers=resume, timeout=10) as r:
            ids = [line for line in r.iter_lines() if line.startswith("id:")]
        assert ids == ["id: 2", "id: 3"]


@pytest.mark.integration
def test_request_id_and_auth_headers_reach_the_api(edge: EdgeFactory) -> None:
    with upstream_stub() as upstream:
        base = edge([upstream])
        generated = httpx.post(f"{base}/v1/echo", json={}, timeout=10).json()["headers"]
        assert len(generated["X-Request-Id"]) == 32  # nginx's $request_id
        sent = httpx.post(
            f"{base}/v1/echo",
            json={},
            headers={"X-Request-Id": "req-123", "Authorization": "Bearer k1", "Last-Event-ID": "s:4"},
            timeout=10,
        ).json()["headers"]
        assert sent["X-Request-Id"] == "req-123"
        echo = httpx.post(f"{base}/v1/echo", json={}, timeout=10)
        assert "x-accel-buffering" not in echo.headers  # only streams carry it
        # An id the api would not accept is replaced by nginx's own (the api sees and answers the same).
        for insane in ("has space", "x" * 129, "a/b"):
            got = httpx.post(f"{base}/v1/echo", json={}, headers={"X-Request-Id": insane}, timeout=10)
            assert len(got.json()["headers"]["X-Request-Id"]) == 32, insane
        assert sent["Authorization"] == "Bearer k1"
        assert sent["Last-Event-ID"] == "s:4"
        assert sent["X-Forwarded-For"] == "127.0.0.1"
        assert "Connection" not in sent  # HTTP/1.1 keepalive to the upstream, no "close"


@pytest.mark.integration
@pytest.mark.parametrize(
    "path",
    [
        "/metrics",
        "/index.html",
        "/playground",
        "/internal/v1/generate",
        "/v1/../metrics",
        "/v1/%2e%2e/metrics",
        "/v2/x",
        "/playground/../metrics",
        "/playground/",
        "/playground/a/b.js",
    ],
)
def test_only_v1_health_ready_and_the_playground_are_routed(edge: EdgeFactory, path: str) -> None:
    with upstream_stub() as upstream:
        base = edge([upstream])
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        assert httpx.get(f"{base}/ready", timeout=10).status_code == 200
        resp = httpx.get(base + path, timeout=10)
        assert_openai_error(resp, 404, "not_found_error")
        assert "secret" not in resp.text


@pytest.mark.integration
@pytest.mark.parametrize("path", ["/", "/?session=pg-1", "/playground/app.js"])
def test_the_playground_page_and_assets_reach_the_api(edge: EdgeFactory, path: str) -> None:
    with upstream_stub() as upstream:
        base = edge([upstream])
        resp = httpx.get(base + path, timeout=10)
        assert (
            resp.status_code == 404 and resp.json()["error"]["message"] == "stub: unknown"
        )  # the api's answer


@pytest.mark.integration
def test_body_limit_answers_413_as_openai_json(edge: EdgeFactory) -> None:
    with upstream_stub() as upstream:
        base = edge([upstream], client_max_body_size="2m")
        ok = httpx.post(f"{base}/v1/upload", content=b"x" * 1_500_000, timeout=10)  # spooled to a temp file
        assert ok.status_code == 200 and ok.json() == {"received": 1_500_000}
        big = httpx.post(f"{base}/v1/upload", content=b"x" * 3_000_000, timeout=10)
        body = assert_openai_error(big, 413, "invalid_request_error")
        assert "2m" in body["error"]["message"]


@pytest.mark.integration
def test_burst_answers_429_as_openai_json_per_client(edge: EdgeFactory) -> None:
    with upstream_stub() as upstream:
        base = edge([upstream], rate_limit="1r/m", rate_burst=3)
        with httpx.Client(timeout=10) as client:
            a = {"Authorization": "Bearer key-a"}
            codes = [client.post(f"{base}/v1/echo", json={}, headers=a).status_code for _ in range(4)]
            assert codes == [200, 200, 200, 200]  # 1 + burst 3
            limited = client.post(f"{base}/v1/echo", json={}, headers=a)
            assert_openai_error(limited, 429, "rate_limit_error")
            assert int(limited.headers["retry-after"]) >= 1
            # Another key is another client; probes are never limited.
            b = {"Authorization": "Bearer key-b"}
            assert client.post(f"{base}/v1/echo", json={}, headers=b).status_code == 200
            assert client.get(f"{base}/health").status_code == 200


@pytest.mark.integration
def test_unreachable_api_answers_503_as_openai_json(edge: EdgeFactory) -> None:
    base = edge([f"127.0.0.1:{free_port()}"])
    resp = httpx.get(f"{base}/v1/models", timeout=10)
    assert_openai_error(resp, 503, "service_unavailable_error")
    assert resp.headers["retry-after"] == "1"
    assert json.loads(resp.text)["error"]["code"] == "upstream_unavailable"
