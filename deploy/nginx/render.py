"""Render the edge's nginx.conf from deploy/nginx/nginx.conf.template for local runs and tests.

The template's placeholders are ``${EDGE_*}``; containers fill the same template with entrypoint.sh
(envsubst), so both ways produce the same file for the same settings (tests/deploy checks it).

    python -m deploy.nginx.render --out tmp/edge --port 3000 --api 127.0.0.1:8000 [--api 127.0.0.1:8002 ...]
    nginx -p tmp/edge -c tmp/edge/nginx.conf -e tmp/edge/logs/error.log
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
PLACEHOLDER = re.compile(r"\$\{(EDGE_[A-Z0-9_]+)\}")
RUNTIME_SUBDIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "logs")

_UPSTREAM = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
_SIZE = re.compile(r"^\d+[kKmMgG]?$")
_RATE = re.compile(r"^\d+r/[sm]$")
_DURATION = re.compile(r"^\d+(ms|s|m|h)?$")


@dataclass(frozen=True)
class EdgeSettings:
    """Everything the template needs; the defaults are the production ones (entrypoint.sh has the same)."""

    listen: str
    api_upstreams: Sequence[str]
    runtime_dir: Path
    client_max_body_size: str = "64m"
    rate_limit: str = "1000r/s"  # a flood guard only: tokens and streams are the cost, not requests
    rate_burst: int = 2000
    conn_limit: int = 128  # concurrent requests (open streams included) per key
    retry_after_seconds: int = 1
    read_timeout: str = "3600s"
    client_timeout: str = "60s"  # client_header_timeout and client_body_timeout
    worker_processes: str = "auto"
    worker_connections: int = 4096
    resolver: str | None = None  # a DNS server: upstream names are re-resolved (nginx >= 1.27.3)
    error_log: str | None = None  # default: <runtime_dir>/logs/error.log
    access_log: str | None = None  # default: <runtime_dir>/logs/access.log
    worker_user: str | None = None

    def invalid_fields(self) -> list[str]:
        """Names of the fields whose values the template cannot take (empty when all are valid)."""
        checks = {
            "api_upstreams": bool(self.api_upstreams) and all(_UPSTREAM.match(u) for u in self.api_upstreams),
            "client_max_body_size": bool(_SIZE.match(self.client_max_body_size)),
            "rate_limit": bool(_RATE.match(self.rate_limit)),
            "read_timeout": bool(_DURATION.match(self.read_timeout)),
            "client_timeout": bool(_DURATION.match(self.client_timeout)),
            "rate_burst": self.rate_burst >= 0,
            "conn_limit": self.conn_limit >= 1,
            "worker_processes": self.worker_processes == "auto" or self.worker_processes.isdigit(),
            "worker_connections": self.worker_connections >= 1,
            "retry_after_seconds": self.retry_after_seconds >= 0,
            "listen": bool(re.match(r"^([0-9.]+:|\[[0-9a-fA-F:]+\]:)?\d{1,5}$", self.listen)),
            "resolver": self.resolver is None or bool(re.match(r"^[0-9a-fA-F.:\[\]]+$", self.resolver)),
        }
        return [name for name, ok in checks.items() if not ok]

    def validate(self) -> None:
        """Raise ValueError naming every invalid field (values go into nginx.conf verbatim)."""
        bad = self.invalid_fields()
        if bad:
            raise ValueError(f"invalid edge settings: {', '.join(bad)} ({self!r})")

    def values(self) -> dict[str, str]:
        """The ``EDGE_*`` placeholder values."""
        self.validate()
        resolve = " resolve" if self.resolver else ""
        servers = "\n        ".join(f"server {u}{resolve};" for u in self.api_upstreams)
        logs = self.runtime_dir / "logs"
        return {
            "EDGE_LISTEN": self.listen,
            "EDGE_API_SERVERS": servers,
            "EDGE_RUNTIME_DIR": str(self.runtime_dir),
            "EDGE_CLIENT_MAX_BODY_SIZE": self.client_max_body_size,
            "EDGE_RATE_LIMIT": self.rate_limit,
            "EDGE_RATE_BURST": str(self.rate_burst),
            "EDGE_CONN_LIMIT": str(self.conn_limit),
            "EDGE_CLIENT_TIMEOUT": self.client_timeout,
            "EDGE_RETRY_AFTER_SECONDS": str(self.retry_after_seconds),
            "EDGE_READ_TIMEOUT": self.read_timeout,
            "EDGE_WORKER_PROCESSES": self.worker_processes,
            "EDGE_WORKER_CONNECTIONS": str(self.worker_connections),
            "EDGE_RESOLVER_DIRECTIVE": (
                f"resolver {self.resolver} valid=10s ipv6=off;" if self.resolver else "# no resolver"
            ),
            "EDGE_ERROR_LOG": self.error_log or str(logs / "error.log"),
            "EDGE_ACCESS_LOG": self.access_log or str(logs / "access.log"),
            "EDGE_USER_DIRECTIVE": f"user {self.worker_user};" if self.worker_user else "# user: unchanged",
        }


# The EDGE_* variables an operator sets (make run, compose, Kubernetes), each with its EdgeSettings field
# and type. EDGE_API_UPSTREAMS, EDGE_LISTEN and EDGE_RESOLVER are the containers' (entrypoint.sh); make run
# derives them from API_PORT and PORT.
ENV_OPTIONS: dict[str, tuple[str, type]] = {
    "EDGE_CLIENT_MAX_BODY_SIZE": ("client_max_body_size", str),
    "EDGE_RATE_LIMIT": ("rate_limit", str),
    "EDGE_RATE_BURST": ("rate_burst", int),
    "EDGE_CONN_LIMIT": ("conn_limit", int),
    "EDGE_RETRY_AFTER_SECONDS": ("retry_after_seconds", int),
    "EDGE_READ_TIMEOUT": ("read_timeout", str),
    "EDGE_CLIENT_TIMEOUT": ("client_timeout", str),
    "EDGE_WORKER_PROCESSES": ("worker_processes", str),
    "EDGE_WORKER_CONNECTIONS": ("worker_connections", int),
}


def options_from_env(env: Mapping[str, str]) -> dict[str, object]:
    """EdgeSettings keyword arguments from the ``EDGE_*`` variables of ``env`` that are set and not empty.

    Each value is checked the way the template needs it. Raises ValueError naming the variable when one is
    malformed (e.g. ``EDGE_RATE_LIMIT=10/s``).
    """
    options: dict[str, object] = {}
    for name, (field, kind) in ENV_OPTIONS.items():
        raw = env.get(name, "").strip()
        if not raw:
            continue
        if kind is int and not raw.isdigit():
            raise ValueError(f"invalid environment variable {name}={raw!r}: expected a whole number")
        options[field] = int(raw) if kind is int else raw
    probe = EdgeSettings(listen="1", api_upstreams=["127.0.0.1:1"], runtime_dir=Path("."), **options)  # type: ignore[arg-type]
    names = {field: name for name, (field, _) in ENV_OPTIONS.items()}
    bad = [f"{names[f]}={env[names[f]].strip()!r}" for f in probe.invalid_fields() if f in names]
    if bad:
        raise ValueError(f"invalid environment variable {', '.join(bad)}")
    return options


def substitute(template: str, values: Mapping[str, str]) -> str:
    """Replace each ``${EDGE_*}`` placeholder; a placeholder without a value is an error."""
    unknown = sorted(set(PLACEHOLDER.findall(template)) - set(values))
    if unknown:
        raise KeyError(f"no value for {', '.join(unknown)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def render_settings(settings: EdgeSettings) -> Path:
    """Write ``<runtime_dir>/nginx.conf`` (and the directories it names); return its path."""
    text = substitute(TEMPLATE.read_text(), settings.values())
    for sub in RUNTIME_SUBDIRS:
        (settings.runtime_dir / sub).mkdir(parents=True, exist_ok=True)
    conf = settings.runtime_dir / "nginx.conf"
    conf.write_text(text)
    return conf


def render(
    out_dir: Path | str,
    listen_port: int,
    api_upstreams: Sequence[str],
    *,
    listen_host: str = "127.0.0.1",
    **options: object,
) -> Path:
    """Render a config for a local nginx on ``listen_host:listen_port`` in front of ``api_upstreams``.

    ``options`` are EdgeSettings fields (client_max_body_size, rate_limit, rate_burst, ...). As root, the
    workers run as root too: the prefix directory (e.g. under pytest's private tmp) may not be reachable by
    nginx's default worker user, and request bodies over 1 MiB are spooled there.
    """
    out = Path(out_dir).resolve()
    if os.geteuid() == 0:
        options.setdefault("worker_user", "root")
    options.setdefault("worker_processes", "1")
    settings = EdgeSettings(
        listen=f"{listen_host}:{listen_port}", api_upstreams=list(api_upstreams), runtime_dir=out, **options
    )  # type: ignore[arg-type]
    return render_settings(settings)


def nginx_argv(conf: Path, nginx: str = "nginx") -> list[str]:
    """The foreground command for a rendered config (prefix = its directory)."""
    prefix = conf.parent
    return [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs" / "error.log")]


def main(argv: Sequence[str] | None = None) -> None:
    """Render a config (the environment's EDGE_* variables apply, options win); print nginx's command."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--out", required=True, help="prefix directory (nginx.conf, logs, temp paths)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api", action="append", required=True, help="api replica host:port (repeatable)")
    parser.add_argument("--client-max-body-size")
    parser.add_argument("--rate-limit")
    parser.add_argument("--rate-burst", type=int)
    parser.add_argument("--conn-limit", type=int)
    args = parser.parse_args(argv)
    options = options_from_env(os.environ)
    for field in ("client_max_body_size", "rate_limit", "rate_burst", "conn_limit"):
        if getattr(args, field) is not None:
            options[field] = getattr(args, field)
    conf = render(args.out, args.port, args.api, listen_host=args.host, **options)
    print(" ".join(nginx_argv(conf)))


if __name__ == "__main__":
    main()
