"""The model service's HTTP API with ENGINE=fake, through a real uvicorn server on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.model.engine.fake import FakeEngine
from services.model.metrics import ModelMetrics
from services.model.settings import ModelSettings
from services.protocol import paths
from services.protocol.events import Finished
from tests.helpers.env import REPO, free_port
from tests.helpers.procs import Proc
from tests.model.service_helpers import (
    assert_well_formed,
    body,
    generate,
    iter_events,
    reattach,
    serve_in_thread,
    text_of,
    wait_for,
)

LONG = "[[fake:tokens=100000]]"  # runs until cancelled


def fake_settings(**overrides: object) -> ModelSettings:
    base: dict[str, object] = {"engine": "fake", "fake_step_seconds": 0.002, "model_repo_id": "fake/model"}
    return ModelSettings.model_validate({**base, **overrides})


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(fake_settings(max_batch_size=4, max_queue=4, finished_retention_seconds=60)) as url:
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, what="ready")
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as c:
        yield c


def test_stream_has_consecutive_seq_and_one_finished(client: httpx.Client) -> None:
    events = generate(client, body("seq-1", seed=3))
    finished = assert_well_formed(events)
    assert finished.finish_reason == "stop"
    reasoning, content = text_of(events)
    assert reasoning and content
    assert finished.usage.prompt_tokens > 0
    again = generate(client, body("seq-2", seed=3))
    assert text_of(again) == (reasoning, content)  # same prompt and seed, same text


def test_max_tokens_and_stop(client: httpx.Client) -> None:
    events = generate(client, body("len-1", max_tokens=5))
    finished = assert_well_formed(events)
    assert (finished.finish_reason, finished.usage.completion_tokens) == ("length", 5)
    reasoning, content = text_of(generate(client, body("stop-probe", seed=9)))
    stop = content.split()[2]
    events = generate(client, body("stop-1", seed=9, stop=[stop]))
    assert assert_well_formed(events).finish_reason == "stop"
    assert text_of(events) == (reasoning, content[: content.index(stop)])


def test_cancel_one_of_several(client: httpx.Client, base_url: str) -> None:
    ids = ["cx-0", "cx-1", "cx-2"]
    first_seen = {rid: threading.Event() for rid in ids}

    def consume(rid: str, text: str) -> list:
        with (
            httpx.Client(base_url=base_url, timeout=10) as own,
            own.stream("POST", paths.GENERATE, json=body(rid, text)) as response,
        ):
            assert response.status_code == 200
            stream = iter_events(response)
            events = [next(stream)]
            first_seen[rid].set()
            return events + list(stream)

    with ThreadPoolExecutor(3) as pool:
        texts = {"cx-0": "[[fake:tokens=150]]", "cx-1": LONG, "cx-2": "[[fake:tokens=150]]"}
        futures = {rid: pool.submit(consume, rid, text) for rid, text in texts.items()}
        for rid in ids:
            assert first_seen[rid].wait(10)
        response = client.post(paths.CANCEL.format(request_id="cx-1"))
        assert response.status_code == 200
        assert response.json() == {"request_id": "cx-1", "status": "cancelled"}
        results = {rid: f.result(timeout=20) for rid, f in futures.items()}
    assert assert_well_formed(results["cx-1"]).finish_reason == "cancelled"
    for rid in ("cx-0", "cx-2"):
        finished = assert_well_formed(results[rid])
        assert (finished.finish_reason, finished.usage.completion_tokens) == ("stop", 151)
    # idempotent, and a generation that ended by itself reports "finished"
    assert client.post(paths.CANCEL.format(request_id="cx-1")).json()["status"] == "cancelled"
    assert client.post(paths.CANCEL.format(request_id="cx-0")).json()["status"] == "finished"
    missing = client.post(paths.CANCEL.format(request_id="nope"))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_reattach_after_disconnect_gets_exactly_the_rest(client: httpx.Client) -> None:
    with client.stream("POST", paths.GENERATE, json=body("re-1", "[[fake:tokens=120]]")) as response:
        head = list(islice(iter_events(response), 5))
    # The caller went away after 5 events; the generation goes on and can be picked up at seq 4.
    tail = reattach(client, "re-1", after=head[-1].seq)
    assert_well_formed(tail, first_seq=5)
    full = reattach(client, "re-1")
    assert_well_formed(full)
    assert full == head + tail
    assert isinstance(full[-1], Finished) and full[-1].usage.completion_tokens == 121  # EOS counts
    assert reattach(client, "re-1", after=full[-1].seq) == []
    assert reattach(client, "re-1", after=10) == full[11:]
    unknown = client.get(paths.EVENTS.format(request_id="nope"))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


def test_bad_requests_answer_400_with_error_body(client: httpx.Client) -> None:
    cases = [
        ({"request_id": "x"}, "invalid_request"),
        ({"request_id": "has space", "messages": [{"role": "user", "content": "hi"}]}, "invalid_request"),
        (body("x", max_tokens=0), "invalid_request"),
        (body("x", parts=[{"type": "image", "data": "not base64!"}]), "invalid_media"),
        (body("x", "word " * 5000), "prompt_too_long"),
        (body("x", parts=[{"type": "image", "data": "aGk="}] * 17), "invalid_media"),  # MAX_IMAGES 16
        (body("x", parts=[{"type": "video", "data": "aGk="}] * 3), "invalid_media"),  # MAX_VIDEOS 2
    ]
    for payload, code in cases:
        response = client.post(paths.GENERATE, json=payload)
        assert response.status_code == 400, payload
        assert response.json()["error"]["code"] == code
        assert "Traceback" not in response.text
    json_type = {"content-type": "application/json"}
    malformed = client.post(paths.GENERATE, content=b"{not json", headers=json_type)
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_request"
    generate(client, body("dup-1", max_tokens=2))
    duplicate = client.post(paths.GENERATE, json=body("dup-1"))
    assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "conflict"
    assert client.get("/no/such/route").json()["error"]["code"] == "not_found"


def test_status_and_health(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/ready").json()["status"] == "ready"
    info = paths.LoadInfo.model_validate(client.get(paths.STATUS).json())
    assert info.ready and info.model == "fake/model" and info.max_batch_size == 4 and info.max_queue == 4


def samples(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_move_after_a_request(client: httpx.Client) -> None:
    before = samples(client)
    events = generate(client, body("metrics-1", max_tokens=7))
    after = samples(client)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("model_requests_total{outcome=length}") == 1
    assert delta("model_generated_tokens_total") == 7
    assert delta("model_prompt_tokens_total") == events[-1].usage.prompt_tokens
    assert delta("model_time_to_first_token_seconds_count") == 1
    assert delta("model_inter_token_latency_seconds_count") >= 1
    assert delta("model_request_duration_seconds_count") == 1
    assert delta("model_batch_size_count") >= 7 and delta("model_step_duration_seconds_count") >= 7
    assert after["model_ready"] == 1
    assert after["model_device_memory_bytes{device=cpu,kind=rss}"] > 10_000_000
    for name in ("model_queue_depth", "model_running_generations", "model_cancellations_total"):
        assert name in after
    for outcome in ("stop", "length", "cancelled", "error", "rejected"):
        assert f"model_requests_total{{outcome={outcome}}}" in after


def test_engine_error_ends_the_stream_with_an_error_event(client: httpx.Client) -> None:
    finished = assert_well_formed(generate(client, body("err-1", "[[fake:error]]")))
    assert finished.finish_reason == "error" and finished.error is not None


def test_full_queue_answers_429_at_once() -> None:
    settings = fake_settings(max_batch_size=1, max_queue=1)
    with serve_in_thread(settings) as url, httpx.Client(base_url=url, timeout=10) as client:
        wait_for(lambda: client.get("/ready").status_code == 200, what="ready")
        for rid in ("q-0", "q-1"):
            with client.stream("POST", paths.GENERATE, json=body(rid, LONG)) as response:
                assert response.status_code == 200  # accepted; the generation outlives this stream
        started = time.monotonic()
        response = client.post(paths.GENERATE, json=body("q-2"))
        assert time.monotonic() - started < 1.0
        assert response.status_code == 429 and response.json()["error"]["code"] == "overloaded"
        assert samples(client)["model_requests_total{outcome=rejected}"] == 1
        assert client.get(paths.STATUS).json()["queued"] == 1
        for rid in ("q-0", "q-1"):
            assert client.post(paths.CANCEL.format(request_id=rid)).json()["status"] == "cancelled"
        assert samples(client)["model_cancellations_total"] == 2


def test_internal_token_is_enforced() -> None:
    settings = fake_settings(internal_token="s3cret")
    with serve_in_thread(settings) as url, httpx.Client(base_url=url, timeout=10) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.get(paths.STATUS, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
            assert "s3cret" not in response.text
        # malformed bodies and unknown internal paths are refused before anything else
        assert client.post(paths.GENERATE, content=b"{").status_code == 401
        assert client.get("/internal/v1/anything").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        wait_for(lambda: client.get("/ready").status_code == 200, what="ready")
        assert client.get(paths.STATUS, headers=auth).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
        client.headers.update(auth)
        assert_well_formed(generate(client, body("tok-1", max_tokens=3)))


def test_ready_reflects_loading_and_load_errors() -> None:
    release = threading.Event()

    def slow_factory(settings: ModelSettings, metrics: ModelMetrics) -> FakeEngine:
        assert release.wait(10)
        return FakeEngine(settings, observer=metrics)

    server = serve_in_thread(fake_settings(), slow_factory)
    with server as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/health").status_code == 200
        loading = client.get("/ready")
        assert loading.status_code == 503
        assert loading.json()["status"] == "loading" and loading.json()["error"]["code"] == "not_ready"
        refused = client.post(paths.GENERATE, json=body("early"))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        assert samples(client)["model_ready"] == 0
        release.set()
        wait_for(lambda: client.get("/ready").status_code == 200, what="ready")
        assert samples(client)["model_ready"] == 1

    def failing_factory(settings: ModelSettings, metrics: ModelMetrics) -> FakeEngine:
        raise OSError("model directory '/nowhere' does not exist")

    with serve_in_thread(fake_settings(), failing_factory) as url, httpx.Client(base_url=url) as client:
        wait_for(lambda: client.get("/ready").json()["status"] == "failed", what="load failure")
        failed = client.get("/ready")
        assert failed.status_code == 503 and "/nowhere' does not exist" in failed.json()["error"]["message"]
        assert client.get("/health").status_code == 200


def test_finished_generations_expire() -> None:
    with (
        serve_in_thread(fake_settings(finished_retention_seconds=0.3)) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        wait_for(lambda: client.get("/ready").status_code == 200, what="ready")
        events = generate(client, body("exp-1", max_tokens=3))
        wait_for(
            lambda: client.get(paths.EVENTS.format(request_id="exp-1")).status_code == 404, what="expiry"
        )
        assert client.post(paths.CANCEL.format(request_id="exp-1")).status_code == 404
        generate(client, body("exp-1", max_tokens=3))  # an expired id may be used again
        assert events


# --- the real process --------------------------------------------------------------------------------------
def start_process(log_dir: Path, **env: str) -> tuple[Proc, str]:
    port = free_port()
    full_env = {"ENGINE": "fake", "MODEL_HOST": "127.0.0.1", "MODEL_PORT": str(port), **env}
    proc = Proc("model", [sys.executable, "-m", "services.model"], full_env, log_dir, REPO)
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/ready", timeout=30)
    return proc, url


@pytest.mark.integration
def test_sigterm_ends_every_stream_with_finished(log_dir: Path) -> None:
    proc, url = start_process(log_dir, FAKE_STEP_SECONDS="0.01", SHUTDOWN_GRACE_SECONDS="2")
    seen = {rid: threading.Event() for rid in ("short", "long")}

    def consume(rid: str, payload: dict) -> list:
        with httpx.Client(base_url=url, timeout=30) as c, c.stream("POST", paths.GENERATE, json=payload) as r:
            stream = iter_events(r)
            events = [next(stream)]
            seen[rid].set()
            return events + list(stream)

    try:
        with ThreadPoolExecutor(2) as pool:
            short = pool.submit(consume, "short", body("short", "[[fake:tokens=40]]"))
            long = pool.submit(consume, "long", body("long", LONG))
            assert seen["short"].wait(10) and seen["long"].wait(10)
            proc.signal(signal.SIGTERM)
            short_events, long_events = short.result(timeout=30), long.result(timeout=30)
        assert assert_well_formed(short_events).finish_reason == "stop"  # finished within the grace
        assert assert_well_formed(long_events).finish_reason == "cancelled"  # cancelled at its end
        proc.popen.wait(15)
        assert "draining" in proc.log_tail()
    finally:
        proc.stop()


@pytest.mark.integration
def test_bad_environment_stops_the_service_naming_the_variable() -> None:
    env = {**os.environ, "ENGINE": "fake", "MAX_BATCH_SIZE": "many", "MODEL_PORT": str(free_port())}
    command = [sys.executable, "-m", "services.model"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "MAX_BATCH_SIZE" in result.stderr
