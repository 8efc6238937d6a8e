"""Start the real services for integration tests: the model service (fake engine or the tiny checkpoint)
and the api service (under gunicorn, as in production, or one uvicorn process). Reusable by the nginx tests.

    model = start_model(log_dir)                       # ENGINE=fake, free port, awaits /ready
    api = start_api(log_dir, model_urls=[model.url])   # gunicorn, 2 workers, SQLite in log_dir
    ...
    api.proc.stop(); model.proc.stop()
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.helpers.env import REPO, VENV_BIN, free_port
from tests.helpers.procs import Proc


@dataclass
class Service:
    proc: Proc
    url: str
    port: int
    env: dict[str, str] = field(default_factory=dict)


def start_model(
    log_dir: Path,
    *,
    name: str = "model",
    env: Mapping[str, str] | None = None,
    model_dir: Path | None = None,
    port: int | None = None,
    timeout: float = 180.0,
) -> Service:
    """The model service: ENGINE=fake unless ``model_dir`` (then ENGINE=hf on that checkpoint, CPU)."""
    port = port or free_port()
    full_env = {"ENGINE": "fake", "MODEL_HOST": "127.0.0.1", "MODEL_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    if model_dir is not None:
        full_env |= {"ENGINE": "hf", "MODEL_REPO_ID": str(model_dir), "DEVICE_MAP": "cpu"}
    full_env |= dict(env or {})
    proc = Proc(name, [sys.executable, "-m", "services.model"], full_env, log_dir, REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{url}/ready", timeout=timeout)
    except BaseException:
        proc.stop()
        raise
    return Service(proc, url, port, full_env)


def api_env(
    log_dir: Path, model_urls: Sequence[str], port: int, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The api's environment for tests: loopback, SQLite in ``log_dir``, quick leases and pings."""
    return {
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "API_WORKERS": "2",
        "MODEL_SERVICE_URL": ",".join(model_urls),
        "SESSIONS_DB_PATH": str(log_dir / "sessions.db"),
        "PROMETHEUS_MULTIPROC_DIR": str(log_dir / f"prometheus-{port}"),
        "RUNNER_LEASE_SECONDS": "2",
        "LOG_LEVEL": "info",
        **dict(env or {}),
    }


def start_api(
    log_dir: Path,
    *,
    model_urls: Sequence[str],
    name: str = "api",
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    gunicorn: bool = True,
    timeout: float = 60.0,
) -> Service:
    """The api service on a free (or the given) port; awaits /health. ``gunicorn=False``: one uvicorn
    process (``python -m services.api``), quicker to start for tests that need no second worker."""
    port = port or free_port()
    full_env = api_env(log_dir, model_urls, port, env)
    if not gunicorn:
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if gunicorn:
        cmd = [
            str(VENV_BIN / "gunicorn"),
            "-c",
            "services/api/gunicorn.conf.py",
            "services.api.main:create_app()",
        ]
    else:
        cmd = [sys.executable, "-m", "services.api"]
    proc = Proc(name, cmd, full_env, log_dir, REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{url}/health", timeout=timeout)
    except BaseException:
        proc.stop()
        raise
    return Service(proc, url, port, full_env)


@contextlib.contextmanager
def keyed_fake_stack(
    log_dir: Path, key: str, model_env: Mapping[str, str] | None = None
) -> Iterator[Service]:
    """The model service (ENGINE=fake, ``model_env``) and one uvicorn api process in front of it with the
    single API key ``key`` and SQLite in ``log_dir``; yields the api. Both are stopped on the way out."""
    model = start_model(log_dir, env=model_env)
    try:
        env = {"API_KEYS": key, "SESSIONS_DB_PATH": str(log_dir / "s.db")}
        api = start_api(log_dir, model_urls=[model.url], env=env, gunicorn=False)
        try:
            yield api
        finally:
            api.proc.stop()
    finally:
        model.proc.stop()


@contextlib.contextmanager
def keyed_client(api: Service, key: str, timeout: float = 30.0) -> Iterator[httpx.Client]:
    """An httpx client for ``api`` that sends ``Authorization: Bearer <key>``."""
    with httpx.Client(
        base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
    ) as client:
        yield client
