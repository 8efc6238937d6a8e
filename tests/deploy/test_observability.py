"""Observability end to end: a real Prometheus (1 s scrapes, the project's alert rules) scraping the running
model service (ENGINE=fake) and api (gunicorn); after a little real traffic every Grafana panel expression
must return data, and the services' /metrics pages must pass `promtool check metrics`."""

from __future__ import annotations

import math
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.api.sse import read_sse
from tests.deploy.test_grafana import panel_exprs
from tests.helpers.env import REPO, free_port, require_binary
from tests.helpers.procs import Proc
from tests.helpers.stack import Service, start_api, start_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULES = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))
# Panels whose value must be a real positive number after the traffic below (not only present).
MUST_BE_POSITIVE = {
    "API requests by route and status",
    "Tokens per second",
    "Time to first token (api: request arrival; model: submit)",
    "Resumes and cancels",
    "Events persisted",
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("observability")


@pytest.fixture(scope="module")
def services(work: Path) -> Iterator[tuple[Service, Service]]:
    model = start_model(work, env={"FAKE_STEP_SECONDS": "0.01"})
    try:
        api = start_api(work, model_urls=[model.url], env={"CANCEL_AFTER_DISCONNECT_SECONDS": "0"})
    except BaseException:
        model.proc.stop()
        raise
    yield model, api
    api.proc.stop()
    model.proc.stop()


@pytest.fixture(scope="module")
def prometheus(work: Path, services: tuple[Service, Service]) -> Iterator[str]:
    binary = require_binary("prometheus")
    model, api = services
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULES],
        "scrape_configs": [
            {"job_name": "model", "static_configs": [{"targets": [f"127.0.0.1:{model.port}"]}]},
            {"job_name": "api", "static_configs": [{"targets": [f"127.0.0.1:{api.port}"]}]},
        ],
    }
    path = work / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = Proc(
        "prometheus",
        [
            binary,
            f"--config.file={path}",
            f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        {},
        work,
        REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{url}/-/ready", timeout=60)
        yield url
    finally:
        proc.stop()


def query(prom: str, expr: str) -> list[dict]:
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    assert resp.status_code == 200, (expr, resp.text)
    payload = resp.json()
    assert payload["status"] == "success", (expr, payload)
    return payload["data"]["result"]


def await_result(prom: str, expr: str, timeout: float = 30.0, positive: bool = False) -> list[dict]:
    deadline = time.monotonic() + timeout
    result: list[dict] = []
    while time.monotonic() < deadline:
        result = query(prom, expr)
        values = [float(r["value"][1]) for r in result]
        if result and (not positive or any(math.isfinite(v) and v > 0 for v in values)):
            return result
        time.sleep(0.5)  # polling: the next scrape is at most 1 s away
    raise AssertionError(f"no {'positive ' if positive else ''}data for {expr!r}: {result}")


def traffic(api: Service) -> None:
    """Real requests that make every metric exist: streams, a non-stream call, a resume, a cancel, a 404."""

    def body(tokens: int, session_id: str, stream: bool = True) -> dict[str, object]:
        content = f"describe the cat [[fake:tokens={tokens}]]"
        messages = [{"role": "user", "content": content}]
        return {"messages": messages, "stream": stream, "session_id": session_id}

    with httpx.Client(base_url=api.url, timeout=30) as c:
        for _ in range(3):
            s = f"obs-{uuid.uuid4().hex[:10]}"
            with c.stream("POST", "/v1/chat/completions", json=body(20, s)) as r:
                assert r.status_code == 200
                head = read_sse(r, limit=3)  # drop the connection, then resume
            resume = {"Last-Event-ID": head[-1].id or ""}
            with c.stream("POST", "/v1/chat/completions", json=body(20, s), headers=resume) as r:
                assert r.status_code == 200
                read_sse(r)
        assert c.post("/v1/chat/completions", json=body(10, f"obs-{uuid.uuid4().hex[:10]}", False)).is_success

        s = f"obs-{uuid.uuid4().hex[:10]}"
        reader = threading.Thread(target=lambda: c.post("/v1/chat/completions", json=body(5000, s, False)))
        reader.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and c.get(f"/v1/sessions/{s}").status_code != 200:
            time.sleep(0.05)  # polling until the session exists
        while time.monotonic() < deadline and (c.get(f"/v1/sessions/{s}").json()["last_index"] or 0) < 2:
            time.sleep(0.05)  # ... and has generated a little
        assert c.post(f"/v1/cancel/{s}").status_code == 200
        reader.join(30)
        assert c.get("/v1/sessions/no-such-session").status_code == 404


def test_services_metrics_pass_promtool_lint(services: tuple[Service, Service]) -> None:
    promtool = require_binary("promtool")
    for svc in services:
        page = httpx.get(f"{svc.url}/metrics", timeout=10).text
        out = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, text=True)
        assert out.returncode == 0, f"{svc.url}: {out.stdout}{out.stderr}"


def test_every_dashboard_panel_has_data(services: tuple[Service, Service], prometheus: str) -> None:
    _, api = services
    await_result(prometheus, 'up{job="model"} == 1')
    await_result(prometheus, 'up{job="api"} == 1')
    traffic(api)
    for _title, expr in panel_exprs(rate_interval="1m"):
        await_result(prometheus, expr, positive=False)
    for title, expr in panel_exprs(rate_interval="1m"):
        if title in MUST_BE_POSITIVE and "or vector(0)" not in expr:
            await_result(prometheus, expr, positive=True)


def test_alert_rules_load_and_stay_quiet(services: tuple[Service, Service], prometheus: str) -> None:
    await_result(prometheus, "model_ready == 1")
    deadline = time.monotonic() + 20
    while True:  # every rule evaluated at least once (evaluation_interval 1 s)
        rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        if all(r["health"] != "unknown" for g in rules for r in g["rules"]) or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # polling interval
    loaded = {rule["name"] for group in rules for rule in group["rules"]}
    expected = {
        rule["alert"]
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    }
    assert loaded == expected
    assert all(rule["health"] == "ok" for group in rules for rule in group["rules"]), rules
    firing = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    assert [a for a in firing if a["state"] == "firing"] == []
