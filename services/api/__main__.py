"""``python -m services.api``: one uvicorn process (development). Production uses gunicorn.conf.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import uvicorn

from services.api.main import create_app
from services.api.settings import SettingsError, load_settings


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"api: {exc}", file=sys.stderr)
        return 2
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir:  # multiprocess mode wants the directory to exist before the first metric
        Path(metrics_dir).mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    uvicorn.run(
        app, host=settings.api_host, port=settings.api_port, log_config=None, timeout_graceful_shutdown=10
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
