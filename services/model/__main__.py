"""``python -m services.model``: one uvicorn worker on MODEL_HOST:MODEL_PORT with a draining shutdown.

Exit status: 0 after SIGTERM/SIGINT, 2 for an invalid setting, ``EXIT_ENGINE_GAVE_UP`` (69) when the engine
could not be healed within ENGINE_MAX_RESTARTS: every supervisor then restarts the whole service.
"""

from __future__ import annotations

import os

# prometheus_client picks its multiprocess value class from this variable when it is first imported. It is
# the api's (gunicorn) setting; a shared .env must not switch the single-process model service into that mode.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

import asyncio
import logging
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from services.model.main import create_app
from services.model.settings import ModelSettings, log_secrets
from services.protocol.logs import configure_logging

log = logging.getLogger("services.model")

# Beyond the engine's grace: time for the last Finished events to be written and the sockets to close.
CLOSE_MARGIN_SECONDS = 5.0
# Past ENGINE_MAX_RESTARTS, /health answers 503 with the reason this long (a probe, the api or an operator can
# read it), then the process exits so that make run, Docker's restart policy or Kubernetes starts it anew.
GIVE_UP_EXIT_DELAY_SECONDS = 2.0
EXIT_ENGINE_GAVE_UP = 69  # EX_UNAVAILABLE (sysexits.h)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, start draining the engine at once.

    uvicorn waits for open responses before it runs the lifespan shutdown, and our streams stay open until
    their generation ends; draining first makes them end (finished or cancelled, always with a Finished
    event) within the grace period instead of being cut when the graceful timeout expires.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self.gave_up: str | None = None  # why the engine could not be healed, once the exit began

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        service = getattr(self._app.state, "service", None)
        if service is not None:
            service.request_drain_threadsafe()
        super().handle_exit(sig, frame)

    def give_up(self, reason: str) -> None:
        """On the event loop, when the engine cannot be healed: stop (draining, as on SIGTERM) after
        ``GIVE_UP_EXIT_DELAY_SECONDS``; ``main`` then exits with ``EXIT_ENGINE_GAVE_UP``."""
        log.error(
            "exiting with status %d in %.0f s so that the supervisor restarts the service: %s",
            EXIT_ENGINE_GAVE_UP,
            GIVE_UP_EXIT_DELAY_SECONDS,
            reason,
        )
        asyncio.get_running_loop().call_later(GIVE_UP_EXIT_DELAY_SECONDS, self._stop_after_giving_up, reason)

    def _stop_after_giving_up(self, reason: str) -> None:
        self.gave_up = reason
        self.should_exit = True  # uvicorn's main loop sees it within 0.1 s


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
    configure_logging(settings.log_level, log_secrets(settings))

    def give_up(reason: str) -> None:
        server.give_up(reason)  # the server exists before the lifespan can call this

    app = create_app(settings, on_give_up=give_up)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's own loggers go through the root's JSON handler (configure_logging)
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds + CLOSE_MARGIN_SECONDS),
        access_log=False,
    )
    server = DrainingServer(config, app)
    server.run()
    if server.gave_up is not None:
        log.error("model service exits with status %d: %s", EXIT_ENGINE_GAVE_UP, server.gave_up)
        raise SystemExit(EXIT_ENGINE_GAVE_UP)


if __name__ == "__main__":
    main()
