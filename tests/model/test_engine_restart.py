"""A dead engine heals: the service restarts it after a back-off, says so on /ready, and gives up (liveness
503, then the process exits non-zero) past ENGINE_MAX_RESTARTS. The policy runs on the fake engine; the
real thing kills the engine child of a real model service process on the tiny checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.model.engine.base import OutputSink
from services.model.engine.fake import FakeEngine
from services.model.metrics import ModelMetrics
from services.model.settings import ModelSettings
from services.protocol import paths
from tests.helpers.env import REPO, free_port
from tests.helpers.procs import Proc
from tests.model.service_helpers import (
    assert_well_formed,
    body,
    generate,
    iter_events,
    serve_in_thread,
    wait_for,
)


class MortalEngine(FakeEngine):
    """The fake engine with ProcessEngine's way of dying: ``failure`` set, watchers told, requests ended."""

    def __init__(self, settings: ModelSettings, observer: ModelMetrics | None = None) -> None:
        super().__init__(settings, observer=observer)
        self.failure: str | None = None
        self._on_exit = None
        self.started = False
        self.stopped = False

    def watch(self, on_exit) -> None:  # type: ignore[no-untyped-def]
        self._on_exit = on_exit

    def start(self, sink: OutputSink) -> None:
        super().start(sink)
        self.started = True

    def shutdown(self, grace_seconds: float) -> None:
        super().shutdown(grace_seconds)
        self.stopped = True

    def die(self) -> None:
        self.failure = "the engine process exited (exit code -9)"
        assert self._on_exit is not None
        self._on_exit(self.failure)
        self.shutdown(0.0)  # every running request ends (the real one ends them with an error)


class Factory:
    """Counts the engines it built; ``fail_after`` builds, the next ones raise. With ``gate``, every build
    sets ``building`` and then waits for the gate (a slow weight load the test controls)."""

    def __init__(self, fail_after: int | None = None, gate: threading.Event | None = None) -> None:
        self.engines: list[MortalEngine] = []
        self.fail_after = fail_after
        self.gate = gate
        self.building = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, settings: ModelSettings, metrics: ModelMetrics) -> MortalEngine:
        if self.gate is not None:
            self.building.set()
            assert self.gate.wait(30), "the test never opened the gate"
        with self.lock:
            if self.fail_after is not None and len(self.engines) >= self.fail_after:
                raise OSError("CUDA error: device lost")
            engine = MortalEngine(settings, observer=metrics)
            self.engines.append(engine)
            return engine


EXIT_ENGINE_GAVE_UP = 69  # services/model/__main__.py (not imported: importing it edits os.environ)


def _settings(**overrides: object) -> ModelSettings:
    base: dict[str, object] = {"engine": "fake", "fake_step_seconds": 0.002, "model_repo_id": "fake/model"}
    return ModelSettings.model_validate({**base, **overrides})


def _restarts(client: httpx.Client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "model_engine_restarts":
            return family.samples[0].value
    raise AssertionError("model_engine_restarts_total is missing")


def test_a_dead_engine_is_restarted_after_a_back_off_and_ready_tells_the_truth() -> None:
    factory = Factory()
    # Long enough that the checks below surely run before the new engine is installed, on a loaded machine
    # too; the test waits for ready anyway.
    settings = _settings(engine_restart_backoff_seconds=5.0)
    with serve_in_thread(settings, factory) as url, httpx.Client(base_url=url, timeout=10) as client:
        wait_for(lambda: client.get("/ready").status_code == 200, what="ready")
        assert_well_formed(generate(client, body("before", max_tokens=3)))
        factory.engines[0].die()
        ready = client.get("/ready")
        assert ready.status_code == 503, ready.text
        assert ready.json()["status"] == "restarting"
        assert "engine restarting" in ready.json()["error"]["message"]
        assert "exit code -9" in ready.json()["error"]["message"]
        assert client.get("/health").status_code == 200  # healing: alive
        refused = client.post(paths.GENERATE, json=body("during"))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        wait_for(lambda: client.get("/ready").status_code == 200, timeout=30, what="ready again")
        assert client.get("/ready").json()["status"] == "ready"
        assert len(factory.engines) == 2 and _restarts(client) == 1
        assert_well_formed(generate(client, body("after", max_tokens=3)))


def test_past_the_restart_limit_liveness_fails() -> None:
    factory = Factory(fail_after=1)  # the first engine loads; every reload fails
    settings = _settings(engine_max_restarts=2, engine_restart_backoff_seconds=0.05)
    with serve_in_thread(settings, factory) as url, httpx.Client(base_url=url, timeout=10) as client:
        wait_for(lambda: client.get("/ready").status_code == 200, what="ready")
        factory.engines[0].die()  # death 1, then reloads fail: 2 and 3 > ENGINE_MAX_RESTARTS
        wait_for(lambda: client.get("/health").status_code == 503, what="liveness failing")
        health = client.get("/health").json()
        assert health["status"] == "failed" and health["error"]["code"] == "not_ready"
        assert "gave up after 2 engine restarts" in health["error"]["message"]
        assert "CUDA error: device lost" in health["error"]["message"]
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert len(factory.engines) == 1 and _restarts(client) == 0


def test_a_drain_during_the_back_off_stops_the_restart() -> None:
    factory = Factory()
    settings = _settings(engine_restart_backoff_seconds=30)
    with serve_in_thread(settings, factory) as url, httpx.Client(base_url=url, timeout=10) as client:
        wait_for(lambda: client.get("/ready").status_code == 200, what="ready")
        factory.engines[0].die()
        assert client.get("/ready").json()["status"] == "restarting"
        started = time.monotonic()
    # leaving the server drained it: the 30 s back-off was cut short and no engine was built
    assert time.monotonic() - started < 15 and len(factory.engines) == 1


def test_an_engine_that_loads_after_the_drain_began_is_shut_down() -> None:
    gate = threading.Event()
    factory = Factory(gate=gate)
    with serve_in_thread(_settings(), factory) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert factory.building.wait(15), "the engine load never began"
        assert client.get("/ready").json()["status"] == "loading"
    # the server drained while the weights were loading; now the load completes
    gate.set()
    wait_for(lambda: len(factory.engines) == 1 and factory.engines[0].stopped, what="the late engine stopped")
    assert factory.engines[0].started  # started with a sink that drops everything, then shut down at once


# --- the real thing: SIGKILL the engine child of a real model service ---------------------------------------
def _engine_child(pid: int) -> int:
    """The pid of the service's engine process (its spawned child running ``multiprocessing.spawn``)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as cmd:
                    argv = cmd.read().split(b"\0")
                if any(b"spawn_main" in a for a in argv) and not any(b"resource_tracker" in a for a in argv):
                    return int(child)
    raise AssertionError(f"no engine child under {pid}")


def _real_service(tiny_model_dir: Path, log_dir: Path, name: str, **env: str) -> tuple[Proc, str]:
    """``python -m services.model`` on the tiny checkpoint with its engine in a child process; started, not
    yet ready (the caller waits)."""
    port = free_port()
    base = {
        "ENGINE": "hf",
        "ENGINE_PROCESS": "1",
        "MODEL_REPO_ID": str(tiny_model_dir),
        "HF_HUB_OFFLINE": "1",
        "DEVICE_MAP": "cpu",
        "TORCH_THREADS": "1",
        "MODEL_HOST": "127.0.0.1",
        "MODEL_PORT": str(port),
        "SHUTDOWN_GRACE_SECONDS": "2",
    }
    proc = Proc(name, [sys.executable, "-m", "services.model"], {**base, **env}, log_dir, REPO)
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.integration
@pytest.mark.slow
def test_killing_the_engine_child_of_a_real_service_heals_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc, url = _real_service(tiny_model_dir, tmp_path, "model-heal", ENGINE_RESTART_BACKOFF_SECONDS="0.5")
    try:
        proc.wait_http(f"{url}/ready", timeout=180)
        first = _engine_child(proc.popen.pid)
        with httpx.Client(base_url=url, timeout=60) as client:
            payload = body("running", "Tell a long story", max_tokens=60000, temperature=0)
            with client.stream("POST", paths.GENERATE, json=payload) as response:
                events = iter_events(response)
                next(events)  # generating
                os.kill(first, signal.SIGKILL)  # an OOM kill, say
                rest = list(events)
            finished = rest[-1]
            assert finished.finish_reason == "error"  # type: ignore[union-attr]
            statuses: set[str] = set()

            def healed() -> bool:
                ready = client.get("/ready")
                if ready.status_code == 503:
                    statuses.add(ready.json()["status"])
                    assert "engine restarting" in ready.json()["error"]["message"]
                    assert client.get("/health").status_code == 200
                return ready.status_code == 200

            wait_for(healed, timeout=120, what="the engine restarted")
            assert statuses == {"restarting"}  # seen while the new child loaded, never "ready" with a 503
            assert _engine_child(proc.popen.pid) != first
            after = generate(client, body("after", "Say something", max_tokens=8, temperature=0))
            assert assert_well_formed(after).finish_reason in {"stop", "length"}
            assert "engine restarted" in proc.log_tail(200)
            # README: logs are JSON lines — the service's, both engine processes', the libraries' (no bars)
            lines = [line for line in proc.log_path.read_text().splitlines() if line.strip()]
            fields = {"ts", "level", "logger", "msg"}
            assert lines and all(fields <= json.loads(line).keys() for line in lines)
    finally:
        proc.stop()
        assert proc.popen.returncode is not None


@pytest.mark.integration
@pytest.mark.slow
def test_past_the_restart_limit_a_real_service_exits_non_zero_saying_why(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # ENGINE_MAX_RESTARTS=0: the first death is past the limit. The process must end by itself (make run,
    # Docker's restart policy and Kubernetes all restart a process that exits; none restarts a 503).
    proc, url = _real_service(tiny_model_dir, tmp_path, "model-give-up", ENGINE_MAX_RESTARTS="0")
    try:
        proc.wait_http(f"{url}/ready", timeout=180)
        os.kill(_engine_child(proc.popen.pid), signal.SIGKILL)
        try:
            returncode = proc.popen.wait(timeout=60)  # 2 s of 503 on /health, then a drain of a dead engine
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the service did not exit:\n{proc.log_tail()}") from None
        assert returncode == EXIT_ENGINE_GAVE_UP, proc.log_tail()
        log = proc.log_tail(200)
        assert "gave up after 0 engine restarts" in log and "exit code -9" in log, log
        assert f"model service exits with status {EXIT_ENGINE_GAVE_UP}" in log, log
    finally:
        proc.stop()
