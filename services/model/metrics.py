"""Every Prometheus object of the model service, on its own registry (built in the lifespan, never global).

The names are a contract with the Grafana dashboards and alerts: rename nothing without updating deploy/.
Gauges that mirror state (queue, running, memory) are refreshed on scrape; the rest move as events happen.
The same object is the scheduler's step observer (``on_step`` / ``on_first_token``).
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("stop", "length", "cancelled", "error", "rejected")

# ms to minutes: a first token can wait behind a long video prefill or a full queue.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# one decode step: about a millisecond on the tiny model, tens of ms for the 2B model on a busy GPU.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class EngineTotals:
    """Prometheus counters fed with an engine's cumulative totals, one snapshot at a time.

    Totals are counted per ``epoch`` (one engine's, or one cache's, lifetime: they start at 0 with it).
    Each counter advances by how far a total passes the largest one seen from the same epoch, so a
    snapshot that arrives late (older, smaller totals: several prepare threads hand them on) adds nothing,
    and a restarted engine's totals add from 0 even when they are already past the old engine's. The last
    ``KEEP_EPOCHS`` epochs are remembered (a late snapshot of one forgotten before would count again)."""

    KEEP_EPOCHS = 8

    def __init__(self, *counters: Counter) -> None:
        self._counters = counters
        self._seen: OrderedDict[str, tuple[int, ...]] = OrderedDict()  # the largest totals, by epoch

    def advance(self, epoch: str, totals: tuple[int, ...]) -> bool:
        """Count ``totals`` of ``epoch``; True when ``epoch`` is the latest one seen (the running engine:
        its gauges may be set)."""
        seen = self._seen.get(epoch)
        if seen is None:
            seen = (0,) * len(totals)
            while len(self._seen) >= self.KEEP_EPOCHS:
                self._seen.popitem(last=False)
        for counter, now, last in zip(self._counters, totals, seen, strict=True):
            if now > last:
                counter.inc(now - last)
        self._seen[epoch] = tuple(max(now, last) for now, last in zip(totals, seen, strict=True))
        return epoch == next(reversed(self._seen))


class ModelMetrics:
    """The model service's metrics on their own ``registry``; rendered by ``render`` at scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._add_request_metrics(self.registry)
        self._add_engine_metrics(self.registry)
        self._add_kv_metrics(self.registry)
        self._add_media_metrics(self.registry)
        # Reported by an engine in a child process (ENGINE_PROCESS): its RSS adds to ours, its devices' rows
        # are set as they are (this process never imports torch then).
        self.engine_process_memory: dict[tuple[str, str], float] = {}

    def _add_request_metrics(self, r: CollectorRegistry) -> None:
        """Per-request outcomes, tokens and latencies (seconds)."""
        self.requests = Counter(
            "model_requests", "Generation requests by outcome", ["outcome"], registry=r
        )  # exported as model_requests_total
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every series exists from the start, so rate() sees the first one
        self.ttft = Histogram(
            "model_time_to_first_token_seconds",
            "Submit to first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "model_inter_token_latency_seconds",
            "Time between tokens of one request",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "model_request_duration_seconds", "Submit to finished", buckets=DURATION_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("model_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("model_generated_tokens", "Tokens generated", registry=r)
        self.cancellations = Counter(
            "model_cancellations", "Cancel calls that stopped a generation", registry=r
        )
        self.prefills = Counter(
            "model_prefills", "Prompts prefilled (once per request, whatever its n)", registry=r
        )  # exported as model_prefills_total

    def _add_kv_metrics(self, r: CollectorRegistry) -> None:
        """The KV cache (bytes, bounded by KV_CACHE_BYTES) and the prefix cache's outcomes."""
        self.kv_cache_bytes = Gauge(
            "model_kv_cache_bytes",
            "KV cache memory in use: rows (reserved by running requests) and prefixes (kept prompts)",
            ["kind"],
            registry=r,
        )
        for kind in ("rows", "prefixes"):  # a series from the start, before the engine's first step
            self.kv_cache_bytes.labels(kind)
        self.kv_cache_budget = Gauge(
            "model_kv_cache_budget_bytes",
            "KV_CACHE_BYTES (0: the engine keeps no KV, e.g. ENGINE=fake)",
            registry=r,
        )
        self.prefix_hits = Counter(
            "model_prefix_cache_hits", "Prompts prefilled from a cached prefix", registry=r
        )
        self.prefix_misses = Counter(
            "model_prefix_cache_misses", "Prompts prefilled without a cached prefix", registry=r
        )
        self.prefix_reused = Counter(
            "model_prefix_cache_reused_tokens",
            "Prompt tokens whose KV came from the prefix cache",
            registry=r,
        )
        steps = Counter(
            "model_cuda_graph_decode_steps",
            "Decode steps with CUDA_GRAPHS on, by how the forward ran: graphed (replayed) or eager",
            ["mode"],
            registry=r,
        )
        captures = Counter(
            "model_cuda_graph_captures",
            "Decode forwards captured as CUDA graphs, by outcome (failed: the process decodes eagerly)",
            ["outcome"],
            registry=r,
        )
        graph_counters = (steps.labels("graphed"), steps.labels("eager"))
        graph_counters += (captures.labels("captured"), captures.labels("failed"))
        self._kv_totals = EngineTotals(
            self.prefix_hits, self.prefix_misses, self.prefix_reused, *graph_counters
        )
        self._kv_lock = threading.Lock()  # an old engine process's last report may race the new one's

    def _add_media_metrics(self, r: CollectorRegistry) -> None:
        """The processed-media cache (MEDIA_CACHE_BYTES): lookups, evictions, size."""
        self._media_lock = threading.Lock()  # reported from the engine's prepare threads
        self._media_gauged: Any = None  # the snapshot the gauges show
        self.media_cache_hits = Counter(
            "model_media_cache_hits",
            "Images/videos whose processed pixels came from the media cache",
            registry=r,
        )
        self.media_cache_misses = Counter(
            "model_media_cache_misses",
            "Images/videos decoded and processed (not in the media cache)",
            registry=r,
        )
        self.media_cache_evictions = Counter(
            "model_media_cache_evictions", "Media cache entries evicted for room", registry=r
        )
        self.media_cache_bytes = Gauge(
            "model_media_cache_bytes", "Bytes of processed pixels in the media cache", registry=r
        )
        self.media_cache_entries = Gauge(
            "model_media_cache_entries", "Images/videos in the media cache", registry=r
        )
        self._media_totals = EngineTotals(
            self.media_cache_hits, self.media_cache_misses, self.media_cache_evictions
        )

    def _add_engine_metrics(self, r: CollectorRegistry) -> None:
        """The engine's state: queue, batch, steps (seconds), readiness, restarts, memory (bytes)."""
        self.queue_depth = Gauge("model_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("model_running_generations", "Requests in the running batch", registry=r)
        self.engine_restarts = Counter(
            "model_engine_restarts", "Engines started anew after the engine process died", registry=r
        )  # exported as model_engine_restarts_total
        self.ready = Gauge(
            "model_ready", "1 when the weights are loaded and requests are admitted", registry=r
        )
        self.batch_size = Histogram(
            "model_batch_size", "Rows per scheduler step", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_duration = Histogram(
            "model_step_duration_seconds", "Wall time of one scheduler step", buckets=STEP_BUCKETS, registry=r
        )
        self.retained_bytes = Gauge(
            "model_finished_logs_bytes",
            "Bytes of finished generations' logs kept for re-attach (bounded by FINISHED_RETENTION_BYTES)",
            registry=r,
        )
        self.device_memory = Gauge(
            "model_device_memory_bytes", "Memory in use by device and kind", ["device", "kind"], registry=r
        )

    # --- the scheduler observer -------------------------------------------------------------------
    def on_step(self, batch_size: int, seconds: float, prefill_tokens: int = 0, prefills: int = 0) -> None:
        self.batch_size.observe(batch_size)
        self.step_duration.observe(seconds)
        if prefills:
            self.prefills.inc(prefills)

    def on_first_token(self, request_id: str, seconds: float) -> None:
        """Time to first token is measured by the generation registry (the same for every engine)."""

    def on_finish(self, request_id: str, finish_reason: str, completion_tokens: int) -> None:
        """Outcomes are counted by the generation registry, which also sees every FinalOutput."""

    def on_kv_cache(self, stats: Any) -> None:
        """The engine's ``KVCacheStats`` (in order within an engine): the prefix-cache and CUDA-graph
        counters advance by the totals' growth within its ``epoch`` (``EngineTotals``); the gauges follow the
        latest engine."""
        with self._kv_lock:
            if not self._kv_totals.advance(stats.epoch, stats.totals()):
                return  # a late report of an engine that was replaced
            self.kv_cache_bytes.labels("rows").set(stats.rows_bytes)
            self.kv_cache_bytes.labels("prefixes").set(stats.prefix_bytes)
            self.kv_cache_budget.set(stats.budget_bytes)

    def on_media_cache(self, stats: Any) -> None:
        """The engine's ``MediaCacheStats``, from any thread and in any order: counters advance by the
        totals' growth within its ``epoch`` (``EngineTotals``: an older snapshot adds nothing); the gauges
        show the newest snapshot of the latest cache (``MediaCacheStats.newer_than``)."""
        with self._media_lock:
            latest = self._media_totals.advance(stats.epoch, (stats.hits, stats.misses, stats.evictions))
            if latest and stats.newer_than(self._media_gauged):
                self._media_gauged = stats
                self.media_cache_bytes.set(stats.nbytes)
                self.media_cache_entries.set(stats.entries)

    def on_memory(self, rows: dict[tuple[str, str], float]) -> None:
        """An engine process's memory by ``(device, kind)`` in bytes: its RSS adds to ours at scrape."""
        self.engine_process_memory.update(rows)

    # --- scrape -----------------------------------------------------------------------------------
    def render(self, queue_and_running: Callable[[], tuple[int, int]] | None) -> bytes:
        if queue_and_running is not None:
            queued, running = queue_and_running()
            self.queue_depth.set(queued)
            self.running.set(running)
        self._refresh_memory()
        return generate_latest(self.registry)

    def _refresh_memory(self) -> None:
        rss = _process_rss_bytes()
        child = dict(self.engine_process_memory)
        if rss is not None:
            self.device_memory.labels("cpu", "rss").set(rss + child.pop(("cpu", "rss"), 0))
        for (device, kind), value in child.items():
            self.device_memory.labels(device, kind).set(value)
        # Only when the engine already imported torch: a scrape must never pull torch in (fake engine).
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            self.device_memory.labels(device, "allocated").set(torch.cuda.memory_allocated(index))
            self.device_memory.labels(device, "reserved").set(torch.cuda.memory_reserved(index))


def process_memory() -> dict[tuple[str, str], float]:
    """This process's RSS and, when torch is imported, its CUDA devices' memory (an engine child's report)."""
    rows: dict[tuple[str, str], float] = {}
    rss = _process_rss_bytes()
    if rss is not None:
        rows["cpu", "rss"] = rss
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            rows[f"cuda:{index}", "allocated"] = torch.cuda.memory_allocated(index)
            rows[f"cuda:{index}", "reserved"] = torch.cuda.memory_reserved(index)
    return rows


def _process_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        # ru_maxrss is the peak, in KiB on Linux and bytes on macOS: better than nothing off Linux.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None
