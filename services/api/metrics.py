"""Every Prometheus object of the api service (names are a contract with the dashboards and alerts).

Under gunicorn the values live in PROMETHEUS_MULTIPROC_DIR (set by gunicorn.conf.py) and /metrics merges
all workers. The objects register in a private registry built per app, never the global default one, so
building two apps in one process (tests) does not collide.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from services.protocol.errors import InvalidRequest, ModelServiceError, Overloaded

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


# api_model_errors_total's reasons: the model service's error codes the api counts (``model_error``) and the
# runner's own (a stream that broke twice, a generation that ended in an error)
MODEL_ERROR_REASONS = (
    "internal",
    "not_ready",
    "not_found",
    "unauthorized",
    "conflict",
    "stream_broken",
    "generation_error",
)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "api_requests_total", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.request_duration = Histogram(
            "api_request_duration_seconds",
            "Time to the end of the response (streams: the whole stream)",
            ["route"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge(
            "api_active_streams", "SSE responses being sent now", multiprocess_mode="livesum", registry=r
        )
        self.resumes = Counter(
            "api_resumes_total", "Attaches to an existing session (resume/replay)", registry=r
        )
        self.cancels = Counter("api_cancels_total", "Generations cancelled", ["kind"], registry=r)
        self.store_latency = Histogram(
            "api_store_latency_seconds",
            "Session store call latency",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.events_written = Counter(
            "api_events_written_total", "SSE events persisted to the store", registry=r
        )
        self.model_errors = Counter(
            "api_model_errors_total", "Failed calls or streams to the model service", ["reason"], registry=r
        )
        # a series per label from the start (0, not "no data", on a dashboard before the first one)
        for kind in ("manual", "auto"):
            self.cancels.labels(kind)
        for reason in MODEL_ERROR_REASONS:
            self.model_errors.labels(reason)
        self.ttft = Histogram(
            "api_time_to_first_token_seconds",
            "Request arrival to the first generated text being sendable",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )

    def model_error(self, exc: ModelServiceError) -> None:
        """Count a failed call to the model service under its code, unless the model service refused the
        request itself: a 400 (``InvalidRequest``: the client's input, answered to the client as such) or a
        429 (``Overloaded``: at capacity; ``api_requests_total`` counts those answers). What is left — cannot
        connect, not ready, a generation it lost, an internal error — is what ``ApiModelErrors`` alerts on."""
        if not isinstance(exc, (InvalidRequest, Overloaded)):
            self.model_errors.labels(exc.code).inc()

    @asynccontextmanager
    async def store_op(self, op: str) -> AsyncIterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.store_latency.labels(op).observe(time.perf_counter() - start)

    def exposition(self) -> tuple[bytes, str]:
        """The text page: all workers' values in multiprocess mode, else this registry."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
