"""The Grafana dashboard as code.

    python -m deploy.grafana.dashboard > deploy/grafana/dashboards/qwen3vl.json

The JSON file is what Grafana loads (provisioned in compose; import it by hand elsewhere); this module is its
source and tests/deploy checks that the two agree. Every expression reads only metrics the services export,
and is written to give a result whenever the services run: ``or vector(0)`` where a labelled counter may not
have a series yet (no 5xx answered, no model error seen).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (expr, legend)
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"
    width: int = 12
    extra: dict[str, Any] = field(default_factory=dict)


def quantiles(
    histogram: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)
) -> list[tuple[str, str]]:
    group = f"{by}, le" if by else "le"
    legend_by = "".join(f" {{{{{label.strip()}}}}}" for label in by.split(",") if label.strip())
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({histogram}_bucket[{RATE}])))",
            f"p{round(q * 100)}{legend_by}",
        )
        for q in qs
    ]


ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Traffic and errors",
        [
            Panel(
                "API requests by route and status",
                [(f"sum by (route, status) (rate(api_requests_total[{RATE}]))", "{{route}} {{status}}")],
                unit="reqps",
            ),
            Panel(
                "API 5xx ratio and model outcomes",
                [
                    (
                        f'(sum(rate(api_requests_total{{status=~"5.."}}[{RATE}])) or vector(0))'
                        f" / sum(rate(api_requests_total[{RATE}]))",
                        "api 5xx ratio",
                    ),
                    (
                        f"sum by (outcome) (rate(model_requests_total[{RATE}]))"
                        f" / ignoring(outcome) group_left sum(rate(model_requests_total[{RATE}]))",
                        "model {{outcome}}",
                    ),
                ],
                unit="percentunit",
                description="Share of api answers that are 5xx, and how model generations end.",
            ),
            Panel(
                "API client errors (4xx) and api -> model failures",
                [
                    (
                        f'sum by (status) (rate(api_requests_total{{status=~"4.."}}[{RATE}])) or vector(0)',
                        "{{status}}",
                    ),
                    (
                        f"sum by (reason) (rate(api_model_errors_total[{RATE}])) or vector(0)",
                        "model error {{reason}}",
                    ),
                ],
                unit="reqps",
            ),
            Panel(
                "Replicas up and ready",
                [
                    ('sum by (job) (up{job=~"api|model"})', "{{job}} up"),
                    ("sum(model_ready)", "model ready"),
                ],
                description="Targets answering scrapes, and model replicas with their weights loaded.",
            ),
        ],
    ),
    (
        "Latency",
        [
            Panel(
                "Time to first token (api: request arrival; model: submit)",
                quantiles("api_time_to_first_token_seconds", qs=(0.5, 0.95))
                + [
                    (e, f"model {legend}")
                    for e, legend in quantiles("model_time_to_first_token_seconds", qs=(0.5, 0.95))
                ],
                unit="s",
            ),
            Panel(
                "Inter-token latency",
                quantiles("model_inter_token_latency_seconds"),
                unit="s",
            ),
            Panel(
                "End-to-end duration",
                quantiles("api_request_duration_seconds", by="route", qs=(0.5, 0.95))
                + [
                    (e, f"model {legend}")
                    for e, legend in quantiles("model_request_duration_seconds", qs=(0.5, 0.95))
                ],
                unit="s",
                description="api: until the response (a whole stream) ends; model: submit to finished.",
            ),
            Panel(
                "Session store latency",
                quantiles("api_store_latency_seconds", by="op", qs=(0.95,)),
                unit="s",
            ),
        ],
    ),
    (
        "Throughput and capacity",
        [
            Panel(
                "Tokens per second",
                [
                    (f"sum(rate(model_generated_tokens_total[{RATE}]))", "generated"),
                    (f"sum(rate(model_prompt_tokens_total[{RATE}]))", "prompt"),
                ],
                unit="short",
            ),
            Panel(
                "Queue depth and running generations",
                [
                    ("sum by (instance) (model_queue_depth)", "queued {{instance}}"),
                    ("sum by (instance) (model_running_generations)", "running {{instance}}"),
                ],
            ),
            Panel(
                "Batch size per step",
                [
                    *quantiles("model_batch_size", qs=(0.5, 0.95)),
                    (
                        f"sum(rate(model_batch_size_sum[{RATE}]))"
                        f" / sum(rate(model_batch_size_count[{RATE}]))",
                        "mean",
                    ),
                ],
            ),
            Panel("Scheduler step time", quantiles("model_step_duration_seconds"), unit="s"),
            Panel(
                "Device memory",
                [
                    (
                        "sum by (instance, device, kind) (model_device_memory_bytes)",
                        "{{instance}} {{device}} {{kind}}",
                    )
                ],
                unit="bytes",
                width=24,
            ),
        ],
    ),
    (
        "Streams and sessions",
        [
            Panel("Active SSE streams", [("sum(api_active_streams)", "streams")]),
            Panel(
                "Resumes and cancels",
                [
                    (f"sum(rate(api_resumes_total[{RATE}]))", "resumes"),
                    (f"sum by (kind) (rate(api_cancels_total[{RATE}])) or vector(0)", "api cancel {{kind}}"),
                    (f"sum(rate(model_cancellations_total[{RATE}]))", "model cancellations"),
                ],
                unit="reqps",
            ),
            Panel(
                "Events persisted",
                [(f"sum(rate(api_events_written_total[{RATE}]))", "events/s")],
                unit="short",
                width=24,
            ),
        ],
    ),
]


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
        **panel.extra,
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id, y = 1, 0
    for title, row in ROWS:
        panels.append(
            {"id": next_id, "type": "row", "title": title, "collapsed": False, "panels": []}
            | {"gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}
        )
        next_id, y, x = next_id + 1, y + 1, 0
        for panel in row:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel(panel, next_id, x, y))
            next_id, x = next_id + 1, x + panel.width
        y += 8
    return {
        "uid": "qwen3vl-overview",
        "title": "Qwen3-VL service",
        "tags": ["qwen3vl"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
