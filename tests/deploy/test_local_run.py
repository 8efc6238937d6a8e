"""`python -m deploy.local.run` (make run): the whole system on loopback, stopped cleanly by SIGTERM."""

from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from deploy.local.run import read_env_file
from tests.helpers.env import REPO, free_port
from tests.helpers.procs import Proc

pytestmark = [pytest.mark.integration]


def await_line(proc: Proc, text: str, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.log_path.read_text(errors="replace").splitlines():
            if text in line:
                return line
        assert proc.popen.poll() is None, f"runner exited:\n{proc.log_tail()}"
        time.sleep(0.1)  # polling interval
    raise TimeoutError(f"no {text!r} in the runner's output:\n{proc.log_tail()}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_runner(tmp_path: Path, *args: str) -> tuple[Proc, dict[str, int]]:
    ports = {"PORT": free_port(), "API_PORT": free_port(), "MODEL_PORT": free_port()}
    env = {
        **{k: str(v) for k, v in ports.items()},
        "ENGINE": "fake",
        "SESSIONS_DB_PATH": str(tmp_path / "sessions.db"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "API_WORKERS": "1",
        "API_KEYS": "",
    }
    proc = Proc("runner", [sys.executable, "-m", "deploy.local.run", *args], env, tmp_path, REPO)
    return proc, ports


def chat(base: str) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)


def stop_and_check(proc: Proc, ports: dict[str, int]) -> None:
    proc.signal(signal.SIGTERM)
    assert proc.popen.wait(90) == 0, proc.log_tail()
    proc.stop()
    for port in ports.values():
        assert not port_open(port), f"port {port} still open after the runner stopped"


def test_runner_serves_through_the_edge_and_stops_cleanly(tmp_path: Path, nginx_bin: str) -> None:
    proc, ports = start_runner(tmp_path)
    try:
        line = await_line(proc, "run: serving on")
        base = f"http://127.0.0.1:{ports['PORT']}"
        assert base in line and "no nginx edge" not in line
        resp = chat(base)
        assert resp.status_code == 200, resp.text
        assert resp.headers["server"].startswith("nginx")
        assert httpx.get(f"{base}/metrics", timeout=10).status_code == 404
        assert httpx.get(f"http://127.0.0.1:{ports['API_PORT']}/metrics", timeout=10).status_code == 200
        stop_and_check(proc, ports)
    finally:
        proc.stop()


def test_runner_without_edge_serves_the_api_on_port(tmp_path: Path) -> None:
    proc, ports = start_runner(tmp_path, "--no-edge")
    try:
        line = await_line(proc, "run: serving on")
        assert "no nginx edge" in line
        base = f"http://127.0.0.1:{ports['PORT']}"
        resp = chat(base)
        assert resp.status_code == 200, resp.text
        assert "nginx" not in resp.headers.get("server", "")
        stop_and_check(proc, ports)
    finally:
        proc.stop()


def test_env_file_parsing(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("# comment\nexport A=1\nB=\"two words\"\nC='x=y'\n\nbroken line\nD=\n")
    assert read_env_file(env) == {"A": "1", "B": "two words", "C": "x=y", "D": ""}
    assert read_env_file(tmp_path / "missing") == {}
