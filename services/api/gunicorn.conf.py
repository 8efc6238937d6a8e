"""gunicorn configuration of the api service (the same command locally and in the image):

    gunicorn -c services/api/gunicorn.conf.py 'services.api.main:create_app()'

Binds API_HOST:API_PORT with API_WORKERS uvicorn workers. The settings are validated here, in the master,
so a bad variable stops the service at once with a message naming it (not a crash loop of workers).
Prometheus multiprocess mode: PROMETHEUS_MULTIPROC_DIR is set to a fresh directory when unset (and emptied
when set), before any worker imports prometheus_client; dead workers are marked so their live gauges drop.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

# The repository root on sys.path: the config file may be loaded before the app's package is importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.api.settings import SettingsError, load_settings

try:
    _settings = load_settings()
except SettingsError as exc:
    print(f"api: {exc}", file=sys.stderr)
    raise SystemExit(2) from None


def _fresh_metrics_dir() -> str:
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not configured:
        return tempfile.mkdtemp(prefix="api-prometheus-")
    path = Path(configured)
    if path.is_dir():
        shutil.rmtree(path)  # stale files of a previous run would be summed into this one's
    path.mkdir(parents=True)
    return str(path)


os.environ["PROMETHEUS_MULTIPROC_DIR"] = _fresh_metrics_dir()
warnings.filterwarnings("ignore", message=".*uvicorn.workers.*", category=DeprecationWarning)

bind = [f"{_settings.api_host}:{_settings.api_port}"]
workers = _settings.api_workers
worker_class = "uvicorn.workers.UvicornWorker"
# Streams are long: the worker heartbeat is separate from requests, so a long timeout only delays
# detecting a wedged worker. Graceful shutdown lets runners hand their sessions over (lease release).
timeout = 60
graceful_timeout = 30
keepalive = 75  # above the edge's upstream keepalive timeout
accesslog = None  # the app writes one JSON line per request
errorlog = "-"
loglevel = _settings.log_level
# The master's own lines (boot, worker exits) in the same JSON shape as the app's.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "services.protocol.logs.JsonFormatter"}},
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    },
    "loggers": {
        "gunicorn.error": {"level": _settings.log_level.upper(), "handlers": ["stderr"], "propagate": False}
    },
    "root": {"level": _settings.log_level.upper(), "handlers": ["stderr"]},
}
proc_name = "qwen3vl-api"
# gunicorn's control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl): several instances
# (tests, replicas on a host) would fight over it, and the image's filesystem is read-only. Not needed.
control_socket_disable = True


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
