"""``python -m services.model``: one uvicorn worker on MODEL_HOST:MODEL_PORT with a draining shutdown."""

from __future__ import annotations

import os

# prometheus_client picks its multiprocess value class from this variable when it is first imported. It is
# the api's (gunicorn) setting; a shared .env must not switch the single-process model service into that mode.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

import logging
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from services.model.main import create_app
from services.model.settings import ModelSettings

log = logging.getLogger("services.model")

# Beyond the engine's grace: time for the last Finished events to be written and the sockets to close.
CLOSE_MARGIN_SECONDS = 5.0


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, start draining the engine at once.

    uvicorn waits for open responses before it runs the lifespan shutdown, and our streams stay open until
    their generation ends; draining first makes them end (finished or cancelled, always with a Finished
    event) within the grace period instead of being cut when the graceful timeout expires.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        service = getattr(self._app.state, "service", None)
        if service is not None:
            service.request_drain_threadsafe()
        super().handle_exit(sig, frame)


def load_settings() -> ModelSettings:
    try:
        return ModelSettings()
    except ValidationError as exc:
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]).upper()
            print(f"model service: invalid environment variable {name}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds + CLOSE_MARGIN_SECONDS),
        access_log=False,
    )
    server = DrainingServer(config, app)
    server.run()


if __name__ == "__main__":
    main()
