"""Finding real components: in CI (CI=true) a missing one fails the test, elsewhere it skips with a reason."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(what: str) -> None:
    """Fail in CI, skip elsewhere: the component is absent on this machine."""
    if in_ci():
        pytest.fail(f"{what} is required in CI but was not found", pytrace=False)
    pytest.skip(f"{what} not available on this machine")


def require_binary(name: str) -> str:
    """Path of an executable (PATH, then .venv/bin, then /usr/sbin), or fail/skip."""
    for cand in (shutil.which(name), VENV_BIN / name, Path("/usr/sbin") / name, Path("/usr/bin") / name):
        if cand and Path(cand).exists():
            return str(cand)
    missing(f"the `{name}` executable")
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
