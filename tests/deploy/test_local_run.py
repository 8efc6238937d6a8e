"""`python -m deploy.local.run` (make run): the whole system on loopback, supervised (a child that dies is
restarted, the others keep running), honouring every EDGE_* setting, stopped cleanly by SIGTERM."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy.local.run import read_env_file
from deploy.local.supervise import RestartPolicy, describe_exit
from tests.api.sse import check_stream, finish_reason, read_sse
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


def start_runner(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, name: str = "runner"
) -> tuple[Proc, dict[str, int]]:
    ports = {"PORT": free_port(), "API_PORT": free_port(), "MODEL_PORT": free_port()}
    full_env = {
        **{k: str(v) for k, v in ports.items()},
        "ENGINE": "fake",
        "SESSIONS_DB_PATH": str(tmp_path / "sessions.db"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "API_WORKERS": "1",
        "API_KEYS": "",
        **(env or {}),
    }
    proc = Proc(name, [sys.executable, "-m", "deploy.local.run", *args], full_env, tmp_path, REPO)
    return proc, ports


@pytest.fixture(autouse=True)
def _no_edge_dirs_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """The runner renders its edge config under tmp/edge-<PORT>: remove what the test's runners left."""
    before = set((REPO / "tmp").glob("edge-*"))
    yield
    for left in set((REPO / "tmp").glob("edge-*")) - before:
        shutil.rmtree(left, ignore_errors=True)


def pid_from(proc: Proc, text: str) -> int:
    """The pid in the runner's latest line containing ``text`` (e.g. "run: api started (pid 123)")."""
    lines = [line for line in proc.log_path.read_text(errors="replace").splitlines() if text in line]
    match = re.search(r"\(pid (\d+)\)", lines[-1])
    assert match, lines[-1]
    return int(match.group(1))


def await_count(proc: Proc, text: str, count: int, timeout: float = 60.0) -> None:
    """Await ``count`` lines containing ``text`` in the runner's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.log_path.read_text(errors="replace").count(text) >= count:
            return
        assert proc.popen.poll() is None, f"runner exited:\n{proc.log_tail()}"
        time.sleep(0.1)  # polling interval
    raise TimeoutError(f"fewer than {count} {text!r} in the runner's output:\n{proc.log_tail()}")


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
    edge_env = {"EDGE_CLIENT_MAX_BODY_SIZE": "2k", "EDGE_CONN_LIMIT": "9", "EDGE_CLIENT_TIMEOUT": "17s"}
    proc, ports = start_runner(tmp_path, env=edge_env)
    try:
        line = await_line(proc, "run: serving on")
        base = f"http://127.0.0.1:{ports['PORT']}"
        assert base in line and "no nginx edge" not in line
        resp = chat(base)
        assert resp.status_code == 200, resp.text
        assert resp.headers["server"].startswith("nginx")
        # The EDGE_* settings reach the edge.
        big = {"model": "m", "messages": [{"role": "user", "content": "x" * 3000}]}
        too_big = httpx.post(f"{base}/v1/chat/completions", json=big, timeout=30)
        assert too_big.status_code == 413 and "limit 2k" in too_big.json()["error"]["message"]
        conf = (REPO / "tmp" / f"edge-{ports['PORT']}" / "nginx.conf").read_text()
        assert "limit_conn edge_conn_per_client 9;" in conf and "client_body_timeout 17s;" in conf
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
        await_line(proc, "run: api ready")
        stop_and_check(proc, ports)
    finally:
        proc.stop()


@pytest.mark.postgres
def test_runner_says_why_the_api_is_not_ready(tmp_path: Path, postgres_dsn: str) -> None:
    """A DATABASE_URL naming a database that does not exist: the api starts (and logs it once); the runner
    says it is not ready and why, rather than only "serving"."""
    missing_db = postgres_dsn.rsplit("/", 1)[0] + f"/qvl_missing_{uuid.uuid4().hex[:8]}"
    proc, _ports = start_runner(tmp_path, "--no-edge", env={"DATABASE_URL": missing_db})
    try:
        line = await_line(proc, "run: api not ready:")
        assert "database unavailable" in line, line
        assert re.search(r"session store: postgres \S+:\d+/qvl_missing_", proc.log_path.read_text())
    finally:
        proc.stop()


def test_env_file_parsing(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("# comment\nexport A=1\nB=\"two words\"\nC='x=y'\n\nD=\n")
    assert read_env_file(env) == {"A": "1", "B": "two words", "C": "x=y", "D": ""}
    # inline comments as docker compose reads them (the same .env serves `make up`)
    env.write_text('API_KEYS="a,b" # the keys\nMAX_TOKENS=64  # short\nHASH=a#b\nQ="x # y"\nP=$secret\n')
    assert read_env_file(env) == {
        "API_KEYS": "a,b",
        "MAX_TOKENS": "64",
        "HASH": "a#b",
        "Q": "x # y",
        "P": "$secret",
    }
    assert read_env_file(tmp_path / "missing") == {}
    # an unclosed quote would swallow the lines after it (API_KEYS among them): refused, naming the line only
    env.write_text('A=1\nSECRET="abc\nAPI_KEYS=k\n')
    with pytest.raises(SystemExit, match=r"\.env line 2 cannot be read") as refused:
        read_env_file(env)
    assert "abc" not in str(refused.value)
    env.write_text("A=1\nbroken line\n")  # compose refuses it too
    with pytest.raises(SystemExit, match=r"\.env line 2 cannot be read \(not KEY=VALUE"):
        read_env_file(env)
    env.write_text("A=1\nB=x\x00y\n")
    with pytest.raises(SystemExit, match=r"\.env line 2 cannot be read \(a NUL character\)"):
        read_env_file(env)
    env.write_bytes(b"A=caf\xe9\n")  # Latin-1
    with pytest.raises(SystemExit, match=r"\.env is not UTF-8"):
        read_env_file(env)


def test_runner_refuses_a_malformed_edge_variable(tmp_path: Path, nginx_bin: str) -> None:
    proc, _ = start_runner(tmp_path, env={"EDGE_RATE_LIMIT": "10/s"})
    try:
        assert proc.popen.wait(60) != 0
        assert "EDGE_RATE_LIMIT='10/s'" in proc.log_tail()
    finally:
        proc.stop()


def test_a_child_failing_at_start_stops_everything_with_its_reason_last(tmp_path: Path) -> None:
    proc, ports = start_runner(tmp_path, "--no-edge", env={"API_WORKERS": "many"})
    try:
        assert proc.popen.wait(90) == 1, proc.log_tail()
        lines = proc.log_path.read_text(errors="replace").splitlines()
        assert "API_WORKERS" in "\n".join(lines)  # the api's own reason
        assert lines[-1] == "run: stopped: api exited with exit code 2 while starting", lines[-5:]
        for port in ports.values():
            assert not port_open(port)
    finally:
        proc.stop()


def test_restart_policy_backs_off_and_gives_up() -> None:
    now = [0.0]
    policy = RestartPolicy(
        max_restarts=3, window_seconds=60, base_delay=0.5, max_delay=1.5, clock=lambda: now[0]
    )
    assert [policy.next_delay("api") for _ in range(3)] == [0.5, 1.0, 1.5]
    assert policy.next_delay("api") is None  # a 4th restart within 60 s
    assert policy.next_delay("model") == 0.5  # counted per child
    now[0] = 61.0  # the window has passed
    assert policy.next_delay("api") == 0.5
    assert describe_exit(-9) == "signal SIGKILL" and describe_exit(3) == "exit code 3"


def _stream_body(session_id: str, tokens: int) -> dict[str, object]:
    content = f"tell a story [[fake:tokens={tokens}]]"
    return {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "session_id": session_id,
    }


@pytest.mark.slow
def test_a_killed_api_is_restarted_and_a_running_generation_completes(tmp_path: Path, nginx_bin: str) -> None:
    """SIGKILL the api's gunicorn master under the runner: the runner restarts the api, the model keeps
    running (the same process), and the stream that was running resumes through the edge to its end."""
    env = {"FAKE_STEP_SECONDS": "0.03", "RUNNER_LEASE_SECONDS": "1", "CANCEL_AFTER_DISCONNECT_SECONDS": "0"}
    proc, ports = start_runner(tmp_path, env=env)
    try:
        await_line(proc, "run: serving on")
        base = f"http://127.0.0.1:{ports['PORT']}"
        model_pid, api_pid = pid_from(proc, "run: model started"), pid_from(proc, "run: api started")
        sid = f"run-{uuid.uuid4().hex[:12]}"
        with httpx.Client(base_url=base, timeout=30) as client:
            with client.stream("POST", "/v1/chat/completions", json=_stream_body(sid, 150)) as resp:
                assert resp.status_code == 200, resp.read()
                head = read_sse(resp, limit=3)
            os.kill(api_pid, signal.SIGKILL)  # the master only: its workers are orphaned
            await_line(proc, "run: api restarted")
            assert pid_from(proc, "run: api restarted") != api_pid
            resume = {"Last-Event-ID": head[-1].id}
            with client.stream("GET", f"/v1/sessions/{sid}/events", headers=resume) as resp:
                assert resp.status_code == 200, resp.read()
                tail = read_sse(resp)
        check_stream(head + tail, sid)
        assert finish_reason(tail) == "stop"
        os.kill(model_pid, 0)  # the model was never restarted
        assert "model exited" not in proc.log_path.read_text()
        stop_and_check(proc, ports)
    finally:
        proc.stop()


@pytest.mark.slow
def test_runner_gives_up_after_too_many_restarts(tmp_path: Path) -> None:
    proc, ports = start_runner(tmp_path, "--no-edge", "--max-restarts", "1")
    try:
        await_line(proc, "run: serving on")
        os.kill(pid_from(proc, "run: api started"), signal.SIGKILL)
        await_line(proc, "run: api restarted")
        os.kill(pid_from(proc, "run: api restarted"), signal.SIGKILL)
        assert proc.popen.wait(90) == 1, proc.log_tail()
        last = proc.log_path.read_text(errors="replace").splitlines()[-1]
        assert (
            last.startswith("run: stopped: api exited unexpectedly with signal SIGKILL")
            and "giving up" in last
        )
        for port in ports.values():
            assert not port_open(port), port
    finally:
        proc.stop()


@pytest.mark.slow
def test_fresh_starts_in_a_row_never_fail(tmp_path: Path) -> None:
    """20 starts (the issue's count), each on a new SQLite file with several api workers racing to set it up
    (it was 1 in 10 failing)."""
    for attempt in range(20):
        work = tmp_path / f"start-{attempt}"
        work.mkdir()
        proc, ports = start_runner(work, "--no-edge", env={"API_WORKERS": "3"}, name=f"runner-{attempt}")
        try:
            await_line(proc, "run: serving on")
            resp = chat(f"http://127.0.0.1:{ports['PORT']}")
            assert resp.status_code == 200, resp.text
            assert "exited" not in proc.log_path.read_text(), proc.log_tail()
            stop_and_check(proc, ports)
        finally:
            proc.stop()


def test_the_readiness_watch_reports_each_change_with_the_api_s_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`make run`'s view of the api's /ready: the JSON reason without its lead, a non-JSON error, no answer;
    each change once; asked in its own thread."""
    import http.server
    import threading

    from deploy.local import supervise

    answers = [
        (503, b'{"error": {"message": "not ready: database unavailable (unreachable or refusing writes)"}}'),
        (503, b"<html>oops</html>"),
        (200, b'{"status": "ready"}'),
    ]
    state = {"i": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = answers[min(state["i"], len(answers) - 1)]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None: ...

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/ready"
    try:
        assert supervise.not_ready_reason(url) == "database unavailable (unreachable or refusing writes)"
        state["i"] = 1
        assert supervise.not_ready_reason(url) == "HTTP 503"
        monkeypatch.setattr(supervise, "API_READY_SECONDS", 0.01)
        watch = supervise.ReadinessWatch(url)
        watch.start()
        seen: list[str | None] = []
        deadline = time.monotonic() + 10
        state["i"] = 2
        while not seen or seen[-1] is not None:
            assert time.monotonic() < deadline, seen
            changed, note = watch.changed()
            if changed:
                seen.append(note)
            time.sleep(0.01)  # polling the watch, as the supervision tick does
        assert seen[-1] is None and len(seen) == len(set(seen))  # each change once
        assert watch.changed() == (False, None)
    finally:
        server.shutdown()
        server.server_close()
    port = free_port()
    assert (supervise.not_ready_reason(f"http://127.0.0.1:{port}/ready", timeout=2) or "").startswith(
        "no answer"
    )
