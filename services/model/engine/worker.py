"""The engine process (``ProcessEngine``'s child): the HF engine behind the typed messages of ``wire.py``.

``child_main`` loads the model and reports ``Ready``; ``EngineWorker`` then serves the parent with one
dispatch (``handle``) and is the engine's sink and observer at once, so that each scheduler step leaves as
ONE ``StepReport`` (the scheduler calls ``on_step`` before the sink). An ``Admit`` is counted at once in the
message loop (a ``Cancel`` right behind it finds it), prepared in a worker thread and queued; a refused or
failed one holds nothing afterwards (its tensors go with the exception), so nothing needs sweeping.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from services.model.engine import wire
from services.model.engine.base import KVCacheStats, MediaCacheStats, MemoryRows, Output
from services.model.settings import ModelSettings, log_secrets
from services.protocol import errors
from services.protocol.generate import GenerateRequest
from services.protocol.logs import configure_logging

log = logging.getLogger(__name__)

MEMORY_REPORT_SECONDS = 1.0  # the child's RSS and device memory, at most this often (with a step)
PREPARE_THREADS = 4


class EngineWorker:
    """Serves one ``HFEngine`` to the parent over ``conn``; also that engine's sink and observer."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._report = wire.StepReport()  # what the step in progress has to say so far (engine thread)
        self._memory_at = 0.0
        # this engine's name in its KV stats: a restarted engine's totals start at 0 under a new epoch
        self.epoch = uuid.uuid4().hex
        # the media cache's newest stats (prepare threads write, the engine thread sends) and the last sent
        self._media: MediaCacheStats | None = None
        self._media_lock = threading.Lock()
        self._media_sent: MediaCacheStats | None = None
        self._drain: threading.Thread | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="prepare")
        self.engine: Any = None  # an HFEngine, set by ``child_main`` once loaded

    def send(self, msg: wire.ToParent) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def serve(self) -> None:
        """Handle the parent's messages until its end of the pipe closes; then stop the engine."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):  # the parent closed its end: after Drained, or it is gone
                break
            self.handle(msg)
        if self._drain is None:
            self.engine.shutdown(0.0)
        else:
            self._drain.join()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._conn.close()

    def handle(self, msg: wire.ToChild) -> None:
        """The one dispatch of the parent's messages."""
        match msg:
            case wire.Admit(request=request):
                try:
                    self.engine.reserve(request.request_id, request.sampling.n)
                except errors.ModelServiceError as exc:
                    self.send(wire.Refused(request.request_id, type(exc).__name__, str(exc)))
                    return
                self._pool.submit(self._admit, request)
            case wire.Cancel(request_id=request_id):
                self.engine.cancel(request_id)  # also while draining
            case wire.Shutdown(grace_seconds=grace) if self._drain is None:
                self._drain = threading.Thread(target=self._shutdown, args=(grace,), name="engine-drain")
                self._drain.start()
            case _:
                log.error("unexpected message from the parent: %r", type(msg).__name__)

    def _admit(self, request: GenerateRequest) -> None:
        try:
            admitted = self.engine.admit_reserved(request)
        except Exception as exc:
            if not isinstance(exc, errors.ModelServiceError):
                log.exception("prepare of %s failed", request.request_id)
            self.send(wire.Refused(request.request_id, type(exc).__name__, str(exc)))
            return
        self.send(admitted)

    def _shutdown(self, grace: float) -> None:
        self.engine.shutdown(grace)  # every request gets its FinalOutput through the sink first
        self.send(wire.Drained())

    # ---- the engine's sink and observer (engine thread) ---------------------------------------------
    def __call__(self, outputs: Sequence[tuple[str, Output]]) -> None:
        report, self._report = self._report, wire.StepReport()
        report.packed = wire.pack_outputs(outputs)
        stats = self.engine.stats()
        report.running, report.queued = stats.running, stats.queued
        media = self._media
        if media != self._media_sent:
            report.media_cache = self._media_sent = media
        now = time.monotonic()
        if now - self._memory_at >= MEMORY_REPORT_SECONDS:
            self._memory_at, report.memory = now, _memory()
        self.send(report)

    def on_step(self, batch_size: int, seconds: float, prefill_tokens: int, prefills: int = 0) -> None:
        self._report.timings.append(wire.StepTiming(batch_size, seconds, prefill_tokens, prefills))

    def on_first_token(self, request_id: str, seconds: float) -> None:
        self._report.first_tokens.append((request_id, seconds))

    def on_finish(self, request_id: str, finish_reason: str, completion_tokens: int) -> None:
        """The parent calls its observer for each FinalOutput of a report."""

    def on_memory(self, rows: MemoryRows) -> None:
        """Not called in the child (its memory leaves with the reports)."""

    def on_kv_cache(self, stats: KVCacheStats) -> None:
        """Carried by the step's report, stamped with this engine's ``epoch``."""
        self._report.kv_cache = dataclasses.replace(stats, epoch=self.epoch)

    def on_media_cache(self, stats: MediaCacheStats) -> None:
        """From a prepare thread: kept, unless a newer snapshot is kept already (prepare threads deliver
        them out of order), until the next step's report carries it."""
        with self._media_lock:
            if stats.newer_than(self._media):
                self._media = stats


def _memory() -> MemoryRows:
    from services.model.metrics import process_memory

    return process_memory()


def child_main(conn: Any, settings: ModelSettings) -> None:
    """The child process: load, report ``Ready``, then serve the parent until its end closes.

    SIGINT/SIGTERM sent to the whole process group (Ctrl-C, a group kill) are ignored: the parent drains
    the child through the pipe, and the child ends on its own when the parent's end closes (even if the
    parent was killed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(settings.log_level, log_secrets(settings))
    worker = EngineWorker(conn)
    try:
        from services.model.engine.hf import HFEngine
        from services.model.loading import load_model_and_processor

        engine = HFEngine(load_model_and_processor(settings), settings, observer=worker)
    except Exception as exc:  # reported to the parent, which raises it in the loader thread
        worker.send(wire.LoadFailed(type(exc).__name__, str(exc)))
        return
    worker.engine = engine
    engine.start(worker)
    worker.send(wire.Ready(engine.model_id))
    worker.send(wire.StepReport(memory=_memory()))  # the weights' footprint, before any request
    worker.serve()
