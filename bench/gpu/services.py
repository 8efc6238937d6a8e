"""The model service and the api as real processes for the GPU check (no nginx: the GPU machine has none).

The model service runs as in production (``python -m services.model``, ENGINE=hf, engine child process);
the api runs under uvicorn (``python -m services.api``; gunicorn is not on the GPU machine) with SQLite
sessions. Both use this interpreter, so wheels installed with ``--target`` reach them through PYTHONPATH.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.servers import REPO, free_port
from tests.helpers.procs import Proc


@dataclass
class Services:
    """``start_model`` then (optionally) ``start_api``; ``stop`` ends whatever started, api first."""

    model_dir: Path
    work_dir: Path
    device_map: str = "auto"
    max_batch_size: int = 16
    torch_threads: int = 0
    serving: tuple[tuple[str, str], ...] = ()  # model settings (environment names) the model service gets
    procs: list[Proc] = field(default_factory=list)
    model_url: str = ""
    api_url: str = ""

    def _env(self) -> dict[str, str]:
        return {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}

    def start_model(self, timeout: float) -> None:
        """Start the model service and wait until ``/ready`` (weights loaded).

        Raises:
            RuntimeError: it exited (the message holds its log's tail). TimeoutError: not ready in time.
        """
        port = free_port()
        env = {
            **self._env(),
            "ENGINE": "hf",
            "MODEL_REPO_ID": str(self.model_dir),
            "MODEL_HOST": "127.0.0.1",
            "MODEL_PORT": str(port),
            "DEVICE_MAP": self.device_map,
            "MAX_BATCH_SIZE": str(self.max_batch_size),
            "MAX_QUEUE": str(max(64, 4 * self.max_batch_size)),
            "TORCH_THREADS": str(self.torch_threads),
            "LOG_LEVEL": "warning",
            **dict(self.serving),
        }
        proc = self._spawn("model", [sys.executable, "-m", "services.model"], env)
        self.model_url = f"http://127.0.0.1:{port}"
        proc.wait_http(f"{self.model_url}/ready", timeout=timeout)

    def start_api(self, timeout: float) -> None:
        """Start the api (uvicorn, SQLite) in front of the model service; wait until ``/ready``.

        Raises:
            RuntimeError: it exited (the message holds its log's tail). TimeoutError: not ready in time.
        """
        port = free_port()
        env = {
            **self._env(),
            "API_HOST": "127.0.0.1",
            "API_PORT": str(port),
            "MODEL_SERVICE_URL": self.model_url,
            "MODEL_REPO_ID": str(self.model_dir),
            "PERSIST_SESSIONS": "true",
            "SESSIONS_DB_PATH": str(self.work_dir / "sessions.db"),
            "LOG_LEVEL": "warning",
        }
        proc = self._spawn("api", [sys.executable, "-m", "services.api"], env)
        self.api_url = f"http://127.0.0.1:{port}"
        proc.wait_http(f"{self.api_url}/ready", timeout=timeout)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> Proc:
        logs = self.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        proc = Proc(name, cmd, env, logs, REPO)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
