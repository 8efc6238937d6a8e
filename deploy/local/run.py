"""``python -m deploy.local.run`` (``make run``): the whole system on loopback, in the foreground.

Starts the model service (MODEL_PORT, default 8001), the api under gunicorn (API_PORT, default 8000) and the
nginx edge on PORT (default 3000) when nginx is installed, else the api itself listens on PORT. Variables from
``.env`` are used unless the environment already sets them. Ctrl-C or SIGTERM stops everything (edge, api,
model, each draining in turn); a second Ctrl-C kills at once. If one process dies, the others are stopped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from deploy.nginx.render import nginx_argv, render

REPO = Path(__file__).resolve().parents[2]
STOP_TIMEOUT = {"edge": 10.0, "api": 45.0, "model": 50.0}  # above each one's own graceful shutdown


class Stopped(Exception):
    """Ctrl-C / SIGTERM, or a child that exited."""


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (``export``, quotes and comments allowed)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def port_from(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "") or str(default)
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise SystemExit(f"run: invalid environment variable {name}={raw!r}: expected a port number")
    return int(raw)


def find_nginx() -> str | None:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    return found


class Child:
    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.name = name
        # Own process group: the terminal's Ctrl-C reaches only us, and we stop the children in order.
        self.popen = subprocess.Popen(list(argv), env=dict(env), cwd=REPO, start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"run: {self.name} did not stop within {timeout:.0f}s, killing it", file=sys.stderr)
            self.signal(signal.SIGKILL)
            self.popen.wait()


def wait_http(child: Child, url: str, timeout: float, ok: Sequence[int] = (200,)) -> None:
    """Poll ``url`` until it answers one of ``ok``; stop early if the child exits."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if not child.alive():
            raise Stopped(f"{child.name} exited with {child.popen.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status in ok:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
        except OSError:
            pass
        time.sleep(delay)  # polling interval while awaiting a condition
        delay = min(delay * 1.5, 0.5)
    raise Stopped(f"{child.name} not answering {url} after {timeout:.0f}s")


def plan(env: Mapping[str, str], use_edge: bool) -> tuple[dict[str, int], str | None]:
    ports = {
        "public": port_from(env, "PORT", 3000),
        "api": port_from(env, "API_PORT", 8000),
        "model": port_from(env, "MODEL_PORT", 8001),
    }
    nginx = find_nginx() if use_edge else None
    if nginx is None:
        ports["api"] = ports["public"]  # no edge: the api is the public endpoint
    if len(set(ports.values())) != (3 if nginx else 2):
        raise SystemExit(f"run: PORT, API_PORT and MODEL_PORT must differ (got {ports})")
    return ports, nginx


def start_all(env: dict[str, str], ports: dict[str, int], nginx: str | None, children: list[Child]) -> str:
    model_url = f"http://127.0.0.1:{ports['model']}"
    # PROMETHEUS_MULTIPROC_DIR is the api's (gunicorn workers); in the model process prometheus_client
    # would switch to multiprocess files and its single-process registry would break.
    model_env = {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    model_env |= {"MODEL_HOST": "127.0.0.1", "MODEL_PORT": str(ports["model"])}
    model = Child("model", [sys.executable, "-m", "services.model"], model_env)
    children.append(model)
    wait_http(model, f"{model_url}/health", timeout=120)

    api_env = env | {"API_HOST": "127.0.0.1", "API_PORT": str(ports["api"]), "MODEL_SERVICE_URL": model_url}
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    api_argv = [gunicorn, "-c", "services/api/gunicorn.conf.py", "services.api.main:create_app()"]
    api = Child("api", api_argv, api_env)
    children.append(api)
    api_url = f"http://127.0.0.1:{ports['api']}"
    wait_http(api, f"{api_url}/health", timeout=60)
    if nginx is None:
        return api_url

    conf = render(REPO / "tmp" / "edge", ports["public"], [f"127.0.0.1:{ports['api']}"])
    edge = Child("edge", nginx_argv(conf, nginx), env)
    children.append(edge)
    public = f"http://127.0.0.1:{ports['public']}"
    wait_http(edge, f"{public}/health", timeout=20)
    return public


def supervise(children: list[Child], model_ready_url: str) -> None:
    """Block until a signal or a child's exit; say once when the model has loaded."""
    announced = False
    while True:
        for child in children:
            if not child.alive():
                raise Stopped(f"{child.name} exited with {child.popen.returncode}")
        if not announced:
            try:
                with urllib.request.urlopen(model_ready_url, timeout=2):
                    print("run: model ready", flush=True)
                    announced = True
            except OSError:
                pass
        time.sleep(0.5)  # supervision tick


def main(argv: Sequence[str] | None = None) -> int:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--no-edge", action="store_true", help="serve the api on PORT directly")
    args = parser.parse_args(argv)

    env = read_env_file(REPO / ".env") | dict(os.environ)
    ports, nginx = plan(env, use_edge=not args.no_edge)
    children: list[Child] = []
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stopping:  # a second Ctrl-C while draining: kill at once
            for child in children:
                child.signal(signal.SIGKILL)
            return
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        url = start_all(env, ports, nginx, children)
        edge_note = "" if nginx else " (no nginx edge: the api serves PORT directly)"
        print(f"run: serving on {url}{edge_note}  (Ctrl-C stops)", flush=True)
        supervise(children, f"http://127.0.0.1:{ports['model']}/ready")
    except Stopped as why:
        code = 0 if str(why) in {"SIGINT", "SIGTERM"} else 1
        print(f"run: stopping ({why})", file=sys.stderr, flush=True)
    finally:
        stopping = True
        for child in reversed(children):
            child.stop(STOP_TIMEOUT[child.name])
    return code


if __name__ == "__main__":
    sys.exit(main())
