"""PromQL helpers for the deploy tests: parse an expression and list the metric names it selects."""

from __future__ import annotations

import promql_parser as pp

# Metric families the services export (services/model/metrics.py, services/api/metrics.py): a contract with
# the alerts and dashboards. Histograms add _bucket, _sum and _count.
COUNTERS = {
    "model_requests_total",
    "model_prompt_tokens_total",
    "model_generated_tokens_total",
    "model_cancellations_total",
    "model_prefills_total",
    "model_engine_restarts_total",
    "model_prefix_cache_hits_total",
    "model_prefix_cache_misses_total",
    "model_prefix_cache_reused_tokens_total",
    "model_cuda_graph_decode_steps_total",
    "model_cuda_graph_captures_total",
    "model_media_cache_hits_total",
    "model_media_cache_misses_total",
    "model_media_cache_evictions_total",
    "api_requests_total",
    "api_resumes_total",
    "api_cancels_total",
    "api_events_written_total",
    "api_model_errors_total",
}
GAUGES = {
    "model_queue_depth",
    "model_running_generations",
    "model_ready",
    "model_device_memory_bytes",
    "model_kv_cache_bytes",
    "model_kv_cache_budget_bytes",
    "model_finished_logs_bytes",
    "model_media_cache_bytes",
    "model_media_cache_entries",
    "api_active_streams",
}
HISTOGRAMS = {
    "model_time_to_first_token_seconds",
    "model_inter_token_latency_seconds",
    "model_request_duration_seconds",
    "model_batch_size",
    "model_step_duration_seconds",
    "api_request_duration_seconds",
    "api_store_latency_seconds",
    "api_time_to_first_token_seconds",
}
EXPORTED = (
    COUNTERS
    | GAUGES
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | {"up"}  # Prometheus' own, per target
)


def metric_names(expr: str) -> set[str]:
    """Names of every vector selector in ``expr`` (parsing it raises on a syntax error)."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, pp.VectorSelector):
            names.add(node.name)
        elif isinstance(node, pp.MatrixSelector):
            visit(node.vector_selector)
        elif isinstance(node, pp.BinaryExpr):
            visit(node.lhs)
            visit(node.rhs)
        elif isinstance(node, pp.AggregateExpr):
            visit(node.expr)
            if node.param is not None:
                visit(node.param)
        elif isinstance(node, pp.Call):
            for arg in node.args:
                visit(arg)
        elif isinstance(node, pp.ParenExpr | pp.UnaryExpr | pp.SubqueryExpr):
            visit(node.expr)

    visit(pp.parse(expr))
    return names
