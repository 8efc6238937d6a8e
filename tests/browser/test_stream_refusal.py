"""The playground's stream follower without a browser (Node drives ``stream.js`` with a stubbed fetch): a
resume the server refuses for good (404 expired, 401) ends in the final ``error`` status with the reason,
so the page and its saved session list never stay "reconnecting…"."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from services.api.routes.playground import PLAYGROUND_DIR
from tests.helpers.env import require_binary

SCRIPT = Path(__file__).with_name("stream_refusal.mjs")


def test_a_resume_refused_for_good_ends_in_an_error_state() -> None:
    node = require_binary("node")
    out = subprocess.run(
        [node, str(SCRIPT), str(PLAYGROUND_DIR)], capture_output=True, text=True, timeout=60, check=True
    )
    cases = {c["status"]: c for c in map(json.loads, out.stdout.splitlines())}
    assert set(cases) == {404, 401}, out.stdout + out.stderr
    for status, case in cases.items():
        assert case["final"] == "error" and case["isFinal"], case
        assert case["error"].startswith(f"{status} "), case
        assert case["calls"] == 1 and case["seen"][-1] == "error", case  # no retry loop
    assert "unknown or expired" in cases[404]["error"] and "API key" in cases[401]["error"]
