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
        "KV cache, prefill and engine",
        [
            Panel(
                "KV cache in use vs budget",
                [
                    ("sum by (instance, kind) (model_kv_cache_bytes)", "{{instance}} {{kind}}"),
                    ("sum by (instance) (model_kv_cache_budget_bytes)", "{{instance}} budget"),
                ],
                unit="bytes",
                description=(
                    "rows: reserved by running requests (a request waits when they would pass the budget);"
                    " prefixes: kept prompts, evicted first, so they may fill what the rows leave."
                    " Budget: KV_CACHE_BYTES (0: the engine keeps no KV, e.g. ENGINE=fake)."
                ),
            ),
            Panel(
                "KV cache share of budget",
                [
                    (
                        'max by (instance) (model_kv_cache_bytes{kind="rows"})'
                        " / max by (instance) (model_kv_cache_budget_bytes > 0)",
                        "{{instance}} rows",
                    ),
                    (
                        "sum by (instance) (model_kv_cache_bytes)"
                        " / max by (instance) (model_kv_cache_budget_bytes > 0)",
                        "{{instance}} rows + prefixes",
                    ),
                ],
                unit="percentunit",
                description="ModelKVCacheNearBudget watches the rows' share (kept prefixes go first).",
            ),
            Panel(
                "Prefix cache hit ratio and reused share of prompt tokens",
                [
                    (
                        f"sum(rate(model_prefix_cache_hits_total[{RATE}]))"
                        f" / (sum(rate(model_prefix_cache_hits_total[{RATE}]))"
                        f" + sum(rate(model_prefix_cache_misses_total[{RATE}])))",
                        "hit ratio",
                    ),
                    (
                        f"sum(rate(model_prefix_cache_reused_tokens_total[{RATE}]))"
                        f" / sum(rate(model_prompt_tokens_total[{RATE}]))",
                        "reused / prompt tokens",
                    ),
                ],
                unit="percentunit",
                description=(
                    "Prefills that started from a kept prompt prefix, and the share of prompt tokens whose KV"
                    " was reused instead of computed."
                ),
            ),
            Panel(
                "Prefix cache lookups and reused tokens",
                [
                    (f"sum(rate(model_prefix_cache_hits_total[{RATE}]))", "hits/s"),
                    (f"sum(rate(model_prefix_cache_misses_total[{RATE}]))", "misses/s"),
                    (f"sum(rate(model_prefix_cache_reused_tokens_total[{RATE}]))", "reused tokens/s"),
                ],
                unit="short",
            ),
            Panel(
                "Media cache: processed images/videos looked up, evicted",
                [
                    (f"sum(rate(model_media_cache_hits_total[{RATE}]))", "hits/s"),
                    (f"sum(rate(model_media_cache_misses_total[{RATE}]))", "misses/s"),
                    (f"sum(rate(model_media_cache_evictions_total[{RATE}]))", "evictions/s"),
                ],
                unit="short",
                description=(
                    "A hit skips the image/video decode, the processor and the pixel digest"
                    " (MEDIA_CACHE_BYTES); evictions mean the bound is too small for the media in use."
                ),
            ),
            Panel(
                "Media cache size",
                [("sum by (instance) (model_media_cache_bytes)", "{{instance}}")],
                unit="bytes",
            ),
            Panel(
                "Media cache entries",
                [("sum by (instance) (model_media_cache_entries)", "{{instance}} images/videos")],
                unit="short",
            ),
            Panel(
                "Prefills vs requests",
                [
                    (f"sum(rate(model_prefills_total[{RATE}]))", "prefills"),
                    (
                        f'sum(rate(model_requests_total{{outcome!="rejected"}}[{RATE}]))',
                        "requests finished (not rejected)",
                    ),
                ],
                unit="reqps",
                description="One prefill per admitted request whatever its n: n choices share one prefill.",
            ),
            Panel(
                "Engine restarts (15 min)",
                [("sum by (instance) (increase(model_engine_restarts_total[15m]))", "{{instance}}")],
                description=(
                    "The engine process died and was started anew (ENGINE_PROCESS); past ENGINE_MAX_RESTARTS"
                    " within ENGINE_RESTART_WINDOW_SECONDS the service exits."
                ),
            ),
            Panel(
                "CUDA graphs: decode steps and captures",
                [
                    (
                        f"sum by (instance, mode) (rate(model_cuda_graph_decode_steps_total[{RATE}]))",
                        "{{instance}} {{mode}} steps/s",
                    ),
                    (
                        f"sum by (instance, outcome) (rate(model_cuda_graph_captures_total[{RATE}]))",
                        "{{instance}} captures {{outcome}}/s",
                    ),
                ],
                unit="short",
                description=(
                    "With CUDA_GRAPHS on: graphed steps replay the captured decode forward, eager ones fell"
                    " back (a failed capture: the whole process, ~3x slower steps on an H200). A capture"
                    " per buffer shape, and again after the batch empties; ModelDecodingEagerly watches it."
                ),
            ),
            Panel(
                "Finished generation logs kept for re-attach",
                [("sum by (instance) (model_finished_logs_bytes)", "{{instance}}")],
                unit="bytes",
                description="Bounded by FINISHED_RETENTION_BYTES (oldest evicted first).",
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
