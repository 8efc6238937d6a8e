"""The process supervisor behind ``make run``: start a child, await its health, restart it with back-off.

Each child runs in its own process group (the terminal's Ctrl-C reaches only the runner, which stops the
children in order). When a child's leader exits, whatever is left of its group (gunicorn workers, the model's
engine process) is killed before it is started again, so the new one finds its port free.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Seconds a child may take to drain on SIGTERM before it is killed: above each one's own graceful shutdown.
STOP_TIMEOUT = {"edge": 10.0, "api": 45.0, "model": 50.0}
TICK_SECONDS = 0.2  # how often the children are checked
API_READY_SECONDS = 5.0  # how often the api's /ready is asked (each answer checks the database's write lock)
READY_TIMEOUT_SECONDS = 10.0  # longer than the api's own database check (STORE_CALL_TIMEOUT_SECONDS, 5 s)


class Stopped(Exception):
    """Ctrl-C / SIGTERM, or a failure supervision cannot heal; the message is the reason."""


class ChildFailed(Stopped):
    """A child exited, or did not answer its health check in time, while it was being (re)started."""


@dataclass(frozen=True)
class ChildSpec:
    """How to start one child: ``argv`` with ``env``; healthy once ``health_url`` answers 200 (within
    ``start_timeout`` seconds)."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    health_url: str
    start_timeout: float


def describe_exit(returncode: int | None) -> str:
    """``exit code N`` or ``signal SIGKILL`` for a Popen return code."""
    if returncode is not None and returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class Child:
    """One supervised process (and its process group)."""

    def __init__(self, spec: ChildSpec, cwd: Path) -> None:
        self.spec = spec
        self._cwd = cwd
        self.popen = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(self.spec.argv), env=dict(self.spec.env), cwd=self._cwd, start_new_session=True
        )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child's process group while its leader runs."""
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def kill_leftovers(self) -> None:
        """SIGKILL what remains of the process group once its leader has exited (orphaned workers)."""
        if self.alive():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left
            os.killpg(self.popen.pid, signal.SIGKILL)

    def restart(self) -> None:
        """Start the child anew (its previous process must have exited)."""
        self.kill_leftovers()
        self.popen = self._spawn()

    def stop(self) -> None:
        """SIGTERM the group, wait up to the child's drain timeout, then SIGKILL; leave nothing behind."""
        timeout = STOP_TIMEOUT.get(self.name, 30.0)
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            print(
                f"run: {self.name} did not stop within {timeout:.0f}s, killing it",
                file=sys.stderr,
                flush=True,
            )
            self.signal(signal.SIGKILL)
            self.popen.wait()
        self.kill_leftovers()


def http_ok(url: str) -> bool:
    """True when ``url`` answers 200 within 2 s (:func:`not_ready_reason` says None)."""
    return not_ready_reason(url, timeout=2) is None


def not_ready_reason(url: str, timeout: float = READY_TIMEOUT_SECONDS) -> str | None:
    """None when ``url`` (a ``/ready``) answers 200 within ``timeout`` seconds, else why not: the error
    message of its JSON answer (without its "not ready: " lead), or what stopped the call."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        try:
            return str(json.loads(exc.read())["error"]["message"]).removeprefix("not ready: ")
        except (ValueError, KeyError, TypeError, OSError):
            return f"HTTP {exc.code}"
    except urllib.error.URLError as exc:
        return f"no answer ({exc.reason})"
    except (OSError, http.client.HTTPException) as exc:
        return f"no answer ({type(exc).__name__})"


class ReadinessWatch:
    """Asks ``url`` (the api's ``/ready``) every ``API_READY_SECONDS`` in a daemon thread, so that a slow
    answer (the api's own database check may take ``STORE_CALL_TIMEOUT_SECONDS``) never holds up the
    supervision tick. ``changed`` hands each new answer to the supervising thread once."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._lock = threading.Lock()
        self._latest: tuple[str | None] | None = None  # (reason or None when ready,) once asked
        self._said: tuple[str | None] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start asking (once; later calls do nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._ask, name="api-readiness", daemon=True)
            self._thread.start()

    def changed(self) -> tuple[bool, str | None]:
        """(True, reason or None when ready) when the answer differs from the one last handed out."""
        with self._lock:
            latest = self._latest
        if latest is None or latest == self._said:
            return False, None
        self._said = latest
        return True, latest[0]

    def _ask(self) -> None:
        while True:
            reason = not_ready_reason(self._url)
            with self._lock:
                self._latest = (reason,)
            time.sleep(API_READY_SECONDS)  # each answer takes the database's write lock: not too often


def wait_healthy(child: Child) -> None:
    """Poll the child's health URL until 200. Raises ChildFailed if it exits first or does not answer within
    its ``start_timeout``."""
    spec = child.spec
    deadline = time.monotonic() + spec.start_timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if not child.alive():
            raise ChildFailed(
                f"{spec.name} exited with {describe_exit(child.popen.returncode)} while starting"
            )
        if http_ok(spec.health_url):
            return
        time.sleep(delay)  # polling interval while awaiting a condition
        delay = min(delay * 1.5, 0.5)
    raise ChildFailed(f"{spec.name} not answering {spec.health_url} after {spec.start_timeout:.0f}s")


class RestartPolicy:
    """At most ``max_restarts`` restarts of one child within ``window_seconds``; the delay before a
    restart starts at ``base_delay`` seconds and doubles with each restart still in the window, up to
    ``max_delay``."""

    def __init__(
        self,
        max_restarts: int = 5,
        window_seconds: float = 60.0,
        *,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_restarts = max_restarts
        self.window_seconds = window_seconds
        self._base, self._max, self._clock = base_delay, max_delay, clock
        self._history: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)

    def next_delay(self, name: str) -> float | None:
        """Seconds to wait before restarting ``name`` (recording the restart), or None: give up."""
        now = self._clock()
        history = self._history[name]
        while history and history[0] <= now - self.window_seconds:
            history.popleft()
        if len(history) >= self.max_restarts:
            return None
        history.append(now)
        return min(self._base * 2 ** (len(history) - 1), self._max)

    def recent(self, name: str) -> int:
        """Restarts of ``name`` recorded in the current window."""
        return len(self._history[name])


def heal(child: Child, policy: RestartPolicy) -> None:
    """Restart a child that exited unexpectedly, with back-off, until it is healthy again. Raises Stopped
    when the policy gives up."""
    why = f"{child.name} exited unexpectedly with {describe_exit(child.popen.returncode)}"
    while True:
        print(f"run: {why}", file=sys.stderr, flush=True)
        child.kill_leftovers()
        delay = policy.next_delay(child.name)
        if delay is None:
            window = policy.window_seconds
            raise Stopped(f"{why}; restarted {policy.max_restarts} times within {window:.0f}s, giving up")
        count = policy.recent(child.name)
        print(f"run: restarting {child.name} in {delay:.1f}s ({count} of {policy.max_restarts})", flush=True)
        time.sleep(delay)  # back-off before the restart
        child.restart()
        try:
            wait_healthy(child)
        except ChildFailed as exc:
            why = str(exc)
            child.signal(signal.SIGKILL)  # not answering: give it up like a crash
            child.popen.wait()
            continue
        print(f"run: {child.name} restarted (pid {child.pid})", flush=True)
        return


def supervise(
    children: Sequence[Child], policy: RestartPolicy, model_ready_url: str, api_ready_url: str | None = None
) -> None:
    """Watch the children until a signal or a failure that cannot be healed (Stopped); restart any that
    exits. Says once (again after a model restart) when the model has loaded; then, every
    ``API_READY_SECONDS``, whether the api is ready when that changes (with its reason when it is not: a
    database that does not exist or refuses writes, which the api only logs once)."""
    announced = False
    api = ReadinessWatch(api_ready_url) if api_ready_url else None
    while True:
        for child in children:
            if not child.alive():
                heal(child, policy)
                announced = announced and child.name != "model"
        if not announced and http_ok(model_ready_url):
            print("run: model ready", flush=True)
            announced = True
        if announced and api is not None:
            api.start()
            changed, note = api.changed()
            if changed:
                print(f"run: api not ready: {note}" if note else "run: api ready", flush=True)
        time.sleep(TICK_SECONDS)  # supervision tick
