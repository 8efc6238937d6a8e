"""Soak: the model service's memory levels off under load (finished logs bounded by FINISHED_RETENTION_BYTES).

A real model service process (ENGINE=fake) serves 16 clients that run short generations back to back for
~16 s with the default 600 s retention. Without the bound every finished log stayed for 10 minutes (~170 KB
each as event objects) and the process grew all the time; now the logs are compacted and capped, so the RSS
of the second half stays flat while the finished-log gauge sits at the bound.

Run it as a script (``python -m tests.model.test_retention_soak [seconds]``) to print the figures.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.protocol import paths
from tests.helpers.env import REPO, free_port
from tests.helpers.procs import Proc
from tests.model.service_helpers import body

BOUND = 2 * 1024 * 1024
CLIENTS = 16
TOKENS = 200  # per generation


@dataclass
class Soak:
    finished: int = 0
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    retained: list[int] = field(default_factory=list)  # model_finished_logs_bytes samples


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start_service(log_dir: Path) -> tuple[Proc, str]:
    port = free_port()
    env = {
        "ENGINE": "fake",
        "FAKE_STEP_SECONDS": "0.001",
        "MODEL_HOST": "127.0.0.1",
        "MODEL_PORT": str(port),
        "MAX_BATCH_SIZE": str(CLIENTS),
        "FINISHED_RETENTION_SECONDS": "600",
        "FINISHED_RETENTION_BYTES": str(BOUND),
        "LOG_LEVEL": "warning",
    }
    proc = Proc("model-soak", [sys.executable, "-m", "services.model"], env, log_dir, REPO)
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/ready", timeout=30)
    return proc, url


async def _client(http: httpx.AsyncClient, index: int, deadline: float, soak: Soak) -> None:
    n = 0
    while time.monotonic() < deadline:
        payload = body(f"soak-{index}-{n}", f"[[fake:tokens={TOKENS}]] request {n}")
        async with http.stream("POST", paths.GENERATE, json=payload) as response:
            assert response.status_code == 200
            async for _ in response.aiter_bytes():
                pass
        soak.finished += 1
        n += 1


async def _sampler(http: httpx.AsyncClient, pid: int, deadline: float, soak: Soak) -> None:
    started = time.monotonic()
    while (now := time.monotonic()) < deadline:
        soak.rss.append((now - started, rss_bytes(pid)))
        text = (await http.get("/metrics")).text
        for family in text_string_to_metric_families(text):
            if family.name == "model_finished_logs_bytes":
                soak.retained.append(int(family.samples[0].value))
        await asyncio.sleep(0.5)  # the sampling period of a measurement, not a wait for a condition


async def run_soak(url: str, pid: int, seconds: float) -> Soak:
    soak = Soak()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=CLIENTS + 2)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        clients = [_client(http, i, deadline, soak) for i in range(CLIENTS)]
        await asyncio.gather(_sampler(http, pid, deadline, soak), *clients)
    return soak


def half_growth(soak: Soak) -> int:
    """RSS at the end minus the highest RSS of the first half (bytes)."""
    half = soak.rss[-1][0] / 2
    first = max(rss for at, rss in soak.rss if at <= half)
    return soak.rss[-1][1] - first


@pytest.mark.integration
@pytest.mark.slow
def test_memory_levels_off_under_the_retention_bound(tmp_path: Path) -> None:
    proc, url = start_service(tmp_path)
    try:
        soak = asyncio.run(run_soak(url, proc.popen.pid, 16.0))
    finally:
        proc.stop()
    # enough work that unbounded logs would have shown: at least 10x the bound as events (~170 KB each)
    assert soak.finished * TOKENS * 400 > 10 * BOUND, soak.finished
    assert max(soak.retained) <= BOUND
    assert max(soak.retained) > BOUND // 2  # the bound was reached: evictions happened
    # The second half finished ~finished/2 generations; kept as events they would have added ~40 KB each
    # at the very least. Now the RSS stays within a few MB (allocator noise) of its first-half peak.
    assert half_growth(soak) < 8 * 1024 * 1024, soak.rss


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    log_dir = Path("/tmp")
    proc, url = start_service(log_dir)
    try:
        soak = asyncio.run(run_soak(url, proc.popen.pid, seconds))
    finally:
        proc.stop()
    mib = 1024 * 1024
    print(f"finished generations: {soak.finished} in {seconds:.0f} s; bound {BOUND / mib:.1f} MiB")
    print("rss MiB:", " ".join(f"{at:.0f}s={rss / mib:.1f}" for at, rss in soak.rss[::4]))
    growth = half_growth(soak) / mib
    print(f"retained logs max {max(soak.retained) / mib:.2f} MiB; second-half RSS growth {growth:.2f} MiB")


if __name__ == "__main__":
    main()
