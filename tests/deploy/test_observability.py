"""Observability end to end: a real Prometheus (1 s scrapes, the project's alert rules) scraping the running
model service (ENGINE=fake) and api (gunicorn), plus a second model replica on the tiny checkpoint (ENGINE=hf,
engine in a child process: the KV cache, prefix cache and engine-restart metrics come only from a real
engine). After a little real traffic, a prefix-cache hit and a SIGKILLed engine child, every Grafana panel
expression must return data, the restart alert must fire for that replica only, every metric family the
services export must be on the dashboard, and the /metrics pages must pass `promtool check metrics`."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.protocol import paths
from tests.api.sse import read_sse
from tests.deploy.promql import EXPORTED
from tests.deploy.test_grafana import panel_exprs
from tests.helpers.env import REPO, free_port, require_binary
from tests.helpers.procs import Proc
from tests.helpers.stack import Service, start_api, start_model
from tests.model.media import png_b64
from tests.model.service_helpers import body as model_body
from tests.model.service_helpers import generate, iter_events, wait_for
from tests.model.test_engine_restart import _engine_child

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULES = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))
# Panels whose value must be a real positive number after the traffic below (not only present).
MUST_BE_POSITIVE = {
    "API requests by route and status",
    "Tokens per second",
    "Time to first token (api: request arrival; model: submit)",
    "Resumes and cancels",
    "Events persisted",
    "KV cache in use vs budget",
    "KV cache share of budget",
    "Prefix cache hit ratio and reused share of prompt tokens",
    "Prefix cache lookups and reused tokens",
    "Prefills vs requests",
    "Engine restarts (15 min)",
    "Finished generation logs kept for re-attach",
}
# ... except these expressions: the running rows' KV is 0 once the requests finished (`tiny_events` proves,
# through Prometheus, that it is positive while one runs).
ZERO_AT_REST = ('model_kv_cache_bytes{kind="rows"}', "model_media_cache_evictions_total")
# Listed metric families that have no sample until a failure these tests do not cause (none since the api's
# labelled counters are made with their label values at start).
ON_FAILURE_ONLY: set[str] = set()
# Shared by the two prompts sent to the tiny replica: well over the prefix cache's 16-token minimum.
SHARED_PROMPT = "Describe the picture of a small grey cat sleeping on a red chair by the window. " * 4


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
def tiny(work: Path, tiny_model_dir: Path) -> Iterator[Service]:
    """A model replica on the tiny checkpoint with its engine in a child process (restarted 0.2 s after a
    death); scraped as one more `model` target, never behind the api (its traffic is sent to it directly)."""
    env = {
        "ENGINE_PROCESS": "1",
        "TORCH_THREADS": "1",
        "ENGINE_RESTART_BACKOFF_SECONDS": "0.2",
        "SHUTDOWN_GRACE_SECONDS": "2",
    }
    svc = start_model(work, name="model-tiny", model_dir=tiny_model_dir, env=env)
    yield svc
    svc.proc.stop()


@pytest.fixture(scope="module")
def prometheus(work: Path, services: tuple[Service, Service], tiny: Service) -> Iterator[str]:
    binary = require_binary("prometheus")
    model, api = services
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULES],
        "scrape_configs": [
            {
                "job_name": "model",
                "static_configs": [{"targets": [f"127.0.0.1:{model.port}", f"127.0.0.1:{tiny.port}"]}],
            },
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


def scraped(svc: Service) -> dict[str, float]:
    """The service's /metrics page now: every sample's name (with its labels) and value."""
    page = httpx.get(f"{svc.url}/metrics", timeout=10).text
    return {
        f"{sample.name}{sorted(sample.labels.items())}": sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


def counter(svc: Service, name: str) -> float:
    """The value of the unlabelled counter ``name`` (exported as ``name``) on the service's page."""
    return scraped(svc)[f"{name}[]"]


def kill_engine_and_await_restart(prom: str, tiny: Service) -> None:
    """SIGKILL the tiny replica's engine child once Prometheus holds a sample of its restart counter at 0 (so
    increase() sees the step), then wait for the new engine to be ready."""
    instance = f"127.0.0.1:{tiny.port}"
    await_result(prom, f'model_engine_restarts_total{{instance="{instance}"}} == 0')
    assert tiny.proc.popen is not None
    first = _engine_child(tiny.proc.popen.pid)
    os.kill(first, signal.SIGKILL)  # an OOM kill, say
    wait_for(
        lambda: (
            counter(tiny, "model_engine_restarts_total") == 1
            and httpx.get(f"{tiny.url}/ready", timeout=10).status_code == 200
        ),
        timeout=120,
        what="the engine restarted",
    )
    assert _engine_child(tiny.proc.popen.pid) != first


def prove_rows_reserved(prom: str, tiny: Service) -> None:
    """A long generation holds KV rows: Prometheus must see model_kv_cache_bytes{kind="rows"} > 0 and within
    the budget while it runs; then it is cancelled."""
    instance = f"127.0.0.1:{tiny.port}"
    with httpx.Client(base_url=tiny.url, timeout=60) as c:
        payload = model_body("obs-rows", "Tell a long story", max_tokens=60000, temperature=0)
        with c.stream("POST", paths.GENERATE, json=payload) as response:
            assert response.status_code == 200
            next(iter_events(response))  # generating: its rows are reserved
            share = (
                f'model_kv_cache_bytes{{kind="rows", instance="{instance}"}}'
                f' / on (instance) model_kv_cache_budget_bytes{{instance="{instance}"}}'
            )
            result = await_result(prom, f"{share} > 0")
            assert 0 < float(result[0]["value"][1]) <= 1, result
            assert c.post(paths.CANCEL.format(request_id="obs-rows")).status_code == 200


@pytest.fixture(scope="module")
def tiny_events(prometheus: str, tiny: Service) -> str:
    """On the tiny replica: an engine restart, a running request's KV rows seen by Prometheus, then two
    prompts sharing their text and an image (the second one a prefix-cache and a media-cache hit). Returns its
    instance label."""
    kill_engine_and_await_restart(prometheus, tiny)
    prove_rows_reserved(prometheus, tiny)
    image = [{"type": "image", "data": png_b64(seed=3)}]
    with httpx.Client(base_url=tiny.url, timeout=60) as c:
        first = SHARED_PROMPT + "Answer briefly."
        generate(c, model_body("obs-prefix-1", first, parts=image, max_tokens=4, temperature=0))
        second = SHARED_PROMPT + "Answer in French."
        events = generate(c, model_body("obs-prefix-2", second, parts=image, max_tokens=4))
    usage = events[-1].usage  # type: ignore[union-attr]
    assert usage is not None and usage.cached_tokens >= 16, events[-1]
    assert counter(tiny, "model_prefix_cache_hits_total") >= 1
    assert counter(tiny, "model_prefix_cache_reused_tokens_total") >= 16
    assert counter(tiny, "model_media_cache_hits_total") >= 1
    return f"127.0.0.1:{tiny.port}"


def test_services_metrics_pass_promtool_lint(services: tuple[Service, Service], tiny: Service) -> None:
    promtool = require_binary("promtool")
    for svc in (*services, tiny):
        page = httpx.get(f"{svc.url}/metrics", timeout=10).text
        out = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, text=True)
        assert out.returncode == 0, f"{svc.url}: {out.stdout}{out.stderr}"


@pytest.fixture(scope="module")
def sent(services: tuple[Service, Service], prometheus: str) -> None:
    """The api traffic of `traffic`, once both jobs are scraped."""
    await_result(prometheus, 'up{job="model"} == 1')
    await_result(prometheus, 'up{job="api"} == 1')
    traffic(services[1])


def test_every_dashboard_panel_has_data(prometheus: str, tiny_events: str, sent: None) -> None:
    for _title, expr in panel_exprs(rate_interval="1m"):
        await_result(prometheus, expr, positive=False)
    for title, expr in panel_exprs(rate_interval="1m"):
        if (
            title in MUST_BE_POSITIVE
            and "or vector(0)" not in expr
            and not any(z in expr for z in ZERO_AT_REST)
        ):
            await_result(prometheus, expr, positive=True)


def test_every_exported_metric_family_is_listed(
    services: tuple[Service, Service], tiny: Service, tiny_events: str, sent: None
) -> None:
    """Every sample name the three services export is in tests/deploy/promql.py (hence on the dashboard, see
    test_grafana.py), and every listed name is exported: a new metric cannot be left off the dashboard."""
    names = {key.split("[", 1)[0] for svc in (*services, tiny) for key in scraped(svc)}
    names = {n for n in names if not n.endswith("_created")}
    assert names - EXPORTED == set()
    assert EXPORTED - names - {"up"} == ON_FAILURE_ONLY


def test_alert_rules_load_and_stay_quiet(
    services: tuple[Service, Service], prometheus: str, tiny_events: str
) -> None:
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
    deliberate = {("ModelEngineRestarted", tiny_events)}  # the engine child this module killed
    assert [
        a for a in firing if (a["labels"]["alertname"], a["labels"].get("instance")) not in deliberate
    ] == []


def test_engine_restart_alert_fires_for_the_killed_replica(prometheus: str, tiny_events: str) -> None:
    deadline = time.monotonic() + 30
    restarted: list[dict] = []
    while time.monotonic() < deadline and not restarted:
        alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        restarted = [a for a in alerts if a["labels"]["alertname"] == "ModelEngineRestarted"]
        if not restarted:
            time.sleep(0.5)  # polling: rules are evaluated every second
    assert [(a["labels"]["instance"], a["state"]) for a in restarted] == [(tiny_events, "firing")], restarted
