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
    rate_limit: str = "10r/s"
    rate_burst: int = 20
    retry_after_seconds: int = 1
    read_timeout: str = "3600s"
    worker_processes: str = "auto"
    worker_connections: int = 4096
    resolver: str | None = None  # a DNS server: upstream names are re-resolved (nginx >= 1.27.3)
    error_log: str | None = None  # default: <runtime_dir>/logs/error.log
    access_log: str | None = None  # default: <runtime_dir>/logs/access.log
    worker_user: str | None = None

    def validate(self) -> None:
        checks = {
            "api_upstreams": bool(self.api_upstreams) and all(_UPSTREAM.match(u) for u in self.api_upstreams),
            "client_max_body_size": bool(_SIZE.match(self.client_max_body_size)),
            "rate_limit": bool(_RATE.match(self.rate_limit)),
            "read_timeout": bool(_DURATION.match(self.read_timeout)),
            "rate_burst": self.rate_burst >= 0,
            "retry_after_seconds": self.retry_after_seconds >= 0,
            "listen": bool(re.match(r"^([0-9.]+:|\[[0-9a-fA-F:]+\]:)?\d{1,5}$", self.listen)),
            "resolver": self.resolver is None or bool(re.match(r"^[0-9a-fA-F.:\[\]]+$", self.resolver)),
        }
        bad = [name for name, ok in checks.items() if not ok]
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
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--out", required=True, help="prefix directory (nginx.conf, logs, temp paths)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api", action="append", required=True, help="api replica host:port (repeatable)")
    parser.add_argument("--client-max-body-size", default="64m")
    parser.add_argument("--rate-limit", default="10r/s")
    parser.add_argument("--rate-burst", type=int, default=20)
    args = parser.parse_args(argv)
    conf = render(
        args.out,
        args.port,
        args.api,
        listen_host=args.host,
        client_max_body_size=args.client_max_body_size,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
    )
    print(" ".join(nginx_argv(conf)))


if __name__ == "__main__":
    main()
