"""Structured JSON logs with the request and session ids, and secrets redacted from every line: one line
per record on stderr, for both services (the api, the model service and its engine process).

The ids travel in context variables: set by the api's request middleware (request id) and by its routes and
runners (session id); tasks started while handling a request inherit them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
session_id_var: ContextVar[str | None] = ContextVar("session_id", default=None)

_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@/\s]+@")
_EXTRA_FIELDS = ("method", "path", "status", "duration_ms", "route", "client")


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # longest first, so a key that contains another is replaced whole
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[REDACTED]")
        text = _BEARER.sub(r"\1[REDACTED]", text)
        return _URL_PASSWORD.sub(r"\1[REDACTED]@", text)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,  # which gunicorn worker: resumes may land on another one
            "msg": record.getMessage(),
        }
        for key, var in (("request_id", request_id_var), ("session_id", session_id_var)):
            value = getattr(record, key, None) or var.get()
            if value:
                entry[key] = value
        for key in _EXTRA_FIELDS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(entry, ensure_ascii=False, default=str))


def configure_logging(level: str, secrets: Iterable[str]) -> None:
    """One JSON handler on the root logger (replacing any); uvicorn's and gunicorn's loggers go through it
    too. uvicorn's access log is off: the api's request middleware writes one line per request instead, the
    model service's callers are the api and the probes. ``secrets``: strings replaced by ``[REDACTED]``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    logging.captureWarnings(True)  # ``warnings.warn`` (torch, transformers): records of "py.warnings"
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "gunicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)
