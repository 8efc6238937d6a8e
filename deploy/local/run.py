"""``python -m deploy.local.run`` (``make run``): the whole system on loopback, in the foreground, supervised.

Starts the model service (MODEL_PORT, default 8001), the api under gunicorn (API_PORT, default 8000) and the
nginx edge on PORT (default 3000) when nginx is installed, else the api itself listens on PORT. Variables from
``.env`` are used unless the environment already sets them; the edge takes every ``EDGE_*`` setting that
``.env.example`` lists (deploy/nginx/render.py ``ENV_OPTIONS``).

Supervision: a child that fails during start-up stops everything (its reason is printed first and last).
Once serving, a child that exits unexpectedly is restarted after a back-off (0.5 s, doubling, at most 8 s)
while the others keep running; more than ``--max-restarts`` (5) restarts of one child within
``--restart-window`` (60 s) stop everything with that reason (exit 1). Ctrl-C or SIGTERM stops the edge,
the api and the model in that order, each draining; a second Ctrl-C kills at once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from deploy.local.supervise import Child, ChildSpec, RestartPolicy, Stopped, supervise, wait_healthy
from deploy.nginx.render import nginx_argv, options_from_env, render

REPO = Path(__file__).resolve().parents[2]


def read_env_file(path: Path) -> dict[str, str]:
    """The ``.env`` file's KEY=VALUE lines, read by python-dotenv: ``export``, quotes, comment lines and an
    inline `` # comment`` after an unquoted value, as docker compose reads the same file for ``make up``;
    no ``${VAR}`` interpolation (a ``$`` stays as written). {} without the file. A line python-dotenv
    cannot read (an unclosed quote, which would swallow the lines after it; words without ``=``) or a NUL
    character (no process environment holds one) stops the start with SystemExit naming the line, a file
    that is not UTF-8 naming the byte, as compose refuses such files (never the text: it may hold a key)."""
    from dotenv import dotenv_values
    from dotenv.parser import parse_stream

    if not path.is_file():
        return {}
    try:
        with path.open(encoding="utf-8") as stream:
            bindings = list(parse_stream(stream))
    except UnicodeDecodeError as exc:
        raise SystemExit(f"run: {path.name} is not UTF-8 text (byte {exc.start})") from None
    for b in bindings:
        if b.error or "\x00" in (b.key or "") + (b.value or ""):
            why = "a NUL character" if not b.error else "not KEY=VALUE, or an unclosed quote"
            raise SystemExit(f"run: {path.name} line {b.original.line} cannot be read ({why})")
    return {k: v for k, v in dotenv_values(path, interpolate=False).items() if v is not None}


def port_from(env: Mapping[str, str], name: str, default: int) -> int:
    """The port in ``env[name]`` (default when unset or empty); SystemExit naming the variable if invalid."""
    raw = env.get(name, "") or str(default)
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise SystemExit(f"run: invalid environment variable {name}={raw!r}: expected a port number")
    return int(raw)


def find_nginx() -> str | None:
    """The nginx executable (PATH, then the usual sbin directories), or None."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def plan(env: Mapping[str, str], use_edge: bool) -> tuple[dict[str, int], str | None]:
    """Ports (public, api, model) and the nginx executable (None: the api serves PORT itself)."""
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


def child_specs(env: dict[str, str], ports: dict[str, int], nginx: str | None) -> list[ChildSpec]:
    """How to start (and restart) each child, in start order: model, api, edge.

    Raises SystemExit naming the variable when an ``EDGE_*`` value is malformed.
    """
    model_url = f"http://127.0.0.1:{ports['model']}"
    # PROMETHEUS_MULTIPROC_DIR is the api's (gunicorn workers); in the model process prometheus_client
    # would switch to multiprocess files and its single-process registry would break.
    model_env = {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    model_env |= {"MODEL_HOST": "127.0.0.1", "MODEL_PORT": str(ports["model"])}
    model = ChildSpec(
        "model", [sys.executable, "-m", "services.model"], model_env, f"{model_url}/health", 120
    )

    api_env = env | {"API_HOST": "127.0.0.1", "API_PORT": str(ports["api"]), "MODEL_SERVICE_URL": model_url}
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    api_argv = [gunicorn, "-c", "services/api/gunicorn.conf.py", "services.api.main:create_app()"]
    api = ChildSpec("api", api_argv, api_env, f"http://127.0.0.1:{ports['api']}/health", 60)
    if nginx is None:
        return [model, api]

    try:
        options = options_from_env(env)
    except ValueError as exc:
        raise SystemExit(f"run: {exc}") from None
    edge_dir = REPO / "tmp" / f"edge-{ports['public']}"  # one per runner: PORT is unique
    conf = render(edge_dir, ports["public"], [f"127.0.0.1:{ports['api']}"], **options)
    edge = ChildSpec("edge", nginx_argv(conf, nginx), env, f"http://127.0.0.1:{ports['public']}/health", 20)
    return [model, api, edge]


def start_all(specs: Sequence[ChildSpec], children: list[Child]) -> None:
    """Start each child in order and await its health; Stopped (with the child's reason) if one fails."""
    for spec in specs:
        child = Child(spec, cwd=REPO)
        children.append(child)
        wait_healthy(child)
        print(f"run: {spec.name} started (pid {child.pid})", flush=True)


def stop_all(children: Sequence[Child]) -> None:
    """Stop the children in reverse start order (edge, api, model), each draining within its timeout."""
    for child in reversed(children):
        child.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--no-edge", action="store_true", help="serve the api on PORT directly")
    parser.add_argument("--max-restarts", type=int, default=5, help="restarts of one child per window (5)")
    parser.add_argument("--restart-window", type=float, default=60.0, help="seconds (60)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the system until Ctrl-C / SIGTERM (exit 0) or a failure that supervision cannot heal (exit 1)."""
    args = parse_args(argv)
    env = read_env_file(REPO / ".env") | dict(os.environ)
    ports, nginx = plan(env, use_edge=not args.no_edge)
    specs = child_specs(env, ports, nginx)
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
    code, reason = 0, ""
    try:
        start_all(specs, children)
        url = f"http://127.0.0.1:{ports['public']}"
        edge_note = "" if nginx else " (no nginx edge: the api serves PORT directly)"
        print(f"run: serving on {url}{edge_note}  (Ctrl-C stops)", flush=True)
        policy = RestartPolicy(max_restarts=args.max_restarts, window_seconds=args.restart_window)
        model_ready, api_ready = (f"http://127.0.0.1:{ports[name]}/ready" for name in ("model", "api"))
        supervise(children, policy, model_ready, api_ready)
    except Stopped as why:
        reason = str(why)
        code = 0 if reason in {"SIGINT", "SIGTERM"} else 1
        print(f"run: stopping ({reason})", file=sys.stderr, flush=True)
    finally:
        stopping = True
        stop_all(children)
    if code:  # the reason again, below whatever the children printed while stopping
        print(f"run: stopped: {reason}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
