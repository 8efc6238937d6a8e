"""e2e helpers: which gunicorn worker served a request (read from the api's JSON access log)."""

from __future__ import annotations

import json
import time

from tests.helpers.stack import Service


def served_by(api: Service, request_id: str, timeout: float = 10.0) -> int:
    """The pid of the worker that answered ``request_id`` (its access line is written when the response
    ends, so this polls the log a little)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in api.proc.log_path.read_text(errors="replace").splitlines():
            if request_id in line and line.startswith("{"):
                entry = json.loads(line)
                if entry.get("logger") == "api.access" and entry.get("request_id") == request_id:
                    return int(entry["pid"])
        time.sleep(0.05)  # polling for the log line, bounded by the deadline
    raise AssertionError(f"no access log line for request {request_id}")
