"""Fixtures for the deploy tests: a real nginx running the project's rendered edge config."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.nginx.render import nginx_argv, render
from tests.helpers.env import REPO, free_port, require_binary
from tests.helpers.procs import Proc

EdgeFactory = Callable[..., str]


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    return require_binary("nginx")


def check_config(nginx: str, conf: Path) -> subprocess.CompletedProcess[str]:
    argv = nginx_argv(conf, nginx)
    return subprocess.run([argv[0], "-t", *argv[1:]], capture_output=True, text=True, timeout=30)


def start_edge(nginx: str, work_dir: Path, api_upstreams: list[str], **options: object) -> tuple[Proc, str]:
    """nginx with the rendered config (checked by `nginx -t` first) in front of ``api_upstreams``."""
    port = free_port()
    conf = render(work_dir / f"edge-{port}", port, api_upstreams, **options)
    checked = check_config(nginx, conf)
    assert checked.returncode == 0, checked.stderr
    proc = Proc(f"nginx-{port}", nginx_argv(conf, nginx), {}, work_dir, REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{base}/_edge_probe", timeout=20, status=404)  # answered by nginx itself
    except BaseException:
        proc.stop()
        raise
    return proc, base


@pytest.fixture
def edge(nginx_bin: str, tmp_path: Path) -> Iterator[EdgeFactory]:
    """Start nginx in front of the given api upstreams; returns its base URL."""
    procs: list[Proc] = []

    def start(api_upstreams: list[str], **options: object) -> str:
        proc, base = start_edge(nginx_bin, tmp_path, api_upstreams, **options)
        procs.append(proc)
        return base

    yield start
    for proc in procs:
        proc.stop()
