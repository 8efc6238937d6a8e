"""Start the servers under test as real processes (``tests.helpers.procs.Proc``) and await readiness.

- ``Stack``: the model service (ENGINE=hf on the checkpoint), the api under gunicorn (SQLite sessions in a
  temporary directory) and nginx with the project's rendered edge config. The edge's per-client rate limit
  is raised for the benchmark (one client opens up to 64 streams at once); everything else is production.
- ``TransformersServe``: ``python -m bench.tf_serve`` (the library's server with our processor shim).
"""

from __future__ import annotations

import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.steps import StepTotals, model_steps
from services.model.loading import auto_cpu_threads
from tests.helpers.procs import Proc

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
BENCH_RATE_LIMIT = "100000r/s"
BENCH_RATE_BURST = 100000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _python() -> str:
    venv_python = VENV_BIN / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def _binary(name: str) -> str:
    for cand in (VENV_BIN / name, shutil.which(name), Path("/usr/sbin") / name):
        if cand and Path(cand).exists():
            return str(cand)
    raise FileNotFoundError(f"`{name}` not found (PATH, .venv/bin, /usr/sbin)")


def _base_env(torch_threads: int | None = None) -> dict[str, str]:
    env = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if torch_threads is not None:  # an experiment (--torch-threads); unset = the services' own default
        env["OMP_NUM_THREADS"] = str(torch_threads)
    return env


@dataclass
class Stack:
    """nginx -> api (gunicorn) -> model service, on free loopback ports."""

    model_dir: Path
    work_dir: Path
    torch_threads: int | None = None
    procs: list[Proc] = field(default_factory=list)
    edge_url: str = ""
    api_url: str = ""
    model_url: str = ""
    model_id: str = ""

    def start(self, timeout: float = 180.0) -> None:
        from deploy.nginx.render import nginx_argv, render

        logs = self.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        model_port, api_port, edge_port = free_port(), free_port(), free_port()
        self.model_id = str(self.model_dir)
        model_env = {
            **_base_env(self.torch_threads),
            "ENGINE": "hf",
            "MODEL_REPO_ID": self.model_id,
            "MODEL_HOST": "127.0.0.1",
            "MODEL_PORT": str(model_port),
            "LOG_LEVEL": "warning",
        }
        model = self._spawn("model", [_python(), "-m", "services.model"], model_env, logs)
        api_env = {
            **_base_env(),
            "API_HOST": "127.0.0.1",
            "API_PORT": str(api_port),
            "MODEL_SERVICE_URL": f"http://127.0.0.1:{model_port}",
            "MODEL_REPO_ID": self.model_id,
            "PERSIST_SESSIONS": "true",
            "SESSIONS_DB_PATH": str(self.work_dir / "sessions.db"),
            "PROMETHEUS_MULTIPROC_DIR": str(self.work_dir / "prometheus"),
            "LOG_LEVEL": "warning",
        }
        gunicorn = [
            _binary("gunicorn"),
            "-c",
            str(REPO / "services/api/gunicorn.conf.py"),
            "services.api.main:create_app()",
        ]
        api = self._spawn("api", gunicorn, api_env, logs)
        conf = render(
            self.work_dir / "edge",
            edge_port,
            [f"127.0.0.1:{api_port}"],
            rate_limit=BENCH_RATE_LIMIT,
            rate_burst=BENCH_RATE_BURST,
        )
        edge = self._spawn("nginx", nginx_argv(conf, _binary("nginx")), {}, logs)
        self.model_url = f"http://127.0.0.1:{model_port}"
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.edge_url = f"http://127.0.0.1:{edge_port}"
        model.wait_http(f"{self.model_url}/ready", timeout=timeout)
        api.wait_http(f"{self.api_url}/ready", timeout=timeout)
        edge.wait_http(f"{self.edge_url}/ready", timeout=timeout)

    def steps(self) -> StepTotals:
        """The model service's engine step totals so far (see ``bench.steps``)."""
        return model_steps(self.model_url)

    def pids(self) -> dict[str, int]:
        """Root pid of each process tree (gunicorn and nginx masters include their workers)."""
        names = {"model": "model service", "api": "api (gunicorn)", "nginx": "nginx"}
        return {names[p.name]: p.popen.pid for p in self.procs}

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], logs: Path) -> Proc:
        proc = Proc(name, cmd, env, logs, REPO)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):  # edge first, model last
            proc.stop()
        self.procs.clear()


@dataclass
class TransformersServe:
    model_dir: Path
    work_dir: Path
    torch_threads: int | None = None
    continuous_batching: bool = True
    proc: Proc | None = None
    url: str = ""
    model_id: str = ""

    def start(self, timeout: float = 180.0) -> None:
        logs = self.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.model_id = str(self.model_dir)
        cmd = [_python(), "-m", "bench.tf_serve", self.model_id, "--host", "127.0.0.1", "--port", str(port)]
        if self.continuous_batching:
            cmd.append("--continuous-batching")
        # Same CPU threads as our model service picks by itself, so both run the model under equal terms.
        threads = self.torch_threads if self.torch_threads is not None else auto_cpu_threads()
        self.proc = Proc("transformers-serve", cmd, _base_env(threads), logs, REPO)
        self.url = f"http://127.0.0.1:{port}"
        self.proc.wait_http(f"{self.url}/health", timeout=timeout)

    def pids(self) -> dict[str, int]:
        return {self.proc.name: self.proc.popen.pid} if self.proc is not None else {}

    def log_has(self, text: str) -> bool:
        return self.proc is not None and text in self.proc.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
