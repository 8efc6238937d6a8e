"""The model service's life: load the engine in the background, admit while ready, drain on shutdown.

States: ``loading`` -> ``ready`` (or ``failed`` with the load error) -> ``draining``. Loading runs in a
daemon thread so ``/health`` answers at once and ``/ready`` reports progress; draining stops admitting,
lets running generations finish for up to SHUTDOWN_GRACE_SECONDS, then cancels the rest, so every open
stream ends with its Finished event before the server closes.

Healing: an engine that can die on its own (``ProcessEngine``'s child, killed by the OOM killer, say) reports
it through ``watch``; its requests have ended with an error by then. The service goes ``ready`` ->
``restarting`` (``/ready`` 503 "engine restarting") and loads a new engine after a back-off
(ENGINE_RESTART_BACKOFF_SECONDS, doubling with each restart within ENGINE_RESTART_WINDOW_SECONDS, at most
``MAX_BACKOFF_SECONDS``). More than ENGINE_MAX_RESTARTS deaths or failed reloads within the window: the
service gives up (``failed``, not ``live``): ``/health`` answers 503 and ``on_give_up`` is told the reason on
the loop; ``python -m services.model`` then exits non-zero, so any supervisor (``make run``, Docker's restart
policy, Kubernetes) starts the whole service anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Literal

from services.model.engine.base import Engine, EngineStats, Output
from services.model.generations import GenerationRegistry
from services.model.metrics import ModelMetrics
from services.model.settings import ModelSettings
from services.protocol.errors import NotReady

log = logging.getLogger(__name__)

State = Literal["loading", "ready", "restarting", "failed", "draining"]
EngineFactory = Callable[[ModelSettings, ModelMetrics], Engine]
GiveUpHook = Callable[[str], None]
MAX_BACKOFF_SECONDS = 60.0


def build_engine(settings: ModelSettings, metrics: ModelMetrics) -> Engine:
    """ENGINE=fake: the deterministic engine; ENGINE=hf: the weights, the processor and the scheduler
    (in a child process when ENGINE_PROCESS is on)."""
    if settings.engine == "fake":
        from services.model.engine.fake import FakeEngine

        if settings.fake_load_seconds:
            time.sleep(settings.fake_load_seconds)  # simulated weight loading, in the loader thread
        return FakeEngine(settings, observer=metrics)
    if settings.engine_process:
        from services.model.engine.process import ProcessEngine

        return ProcessEngine(settings, observer=metrics)  # the child loads the weights; no torch here
    # Imported here: torch and transformers load only when the real engine is asked for; loading first,
    # so that a missing model directory is reported before the engine's imports are paid for.
    from services.model.loading import load_model_and_processor

    loaded = load_model_and_processor(settings)
    from services.model.engine.hf import HFEngine

    return HFEngine(loaded, settings, observer=metrics)


class ModelService:
    """Owns the engine and its state; built in the lifespan, kept on ``app.state.service``."""

    def __init__(
        self,
        settings: ModelSettings,
        metrics: ModelMetrics,
        registry: GenerationRegistry,
        engine_factory: EngineFactory = build_engine,
        on_give_up: GiveUpHook | None = None,
    ) -> None:
        """``on_give_up(reason)``: called once, on the event loop, when the engine cannot be healed (the
        process's owner decides what to do: ``__main__`` exits; tests only look at ``/health``)."""
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self._factory = engine_factory
        self._on_give_up = on_give_up
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()  # state is written by the loader thread and read by the loop
        self._state: State = "loading"
        self._reason = "loading"
        self._engine: Engine | None = None
        self._drain: asyncio.Task[None] | None = None
        self._deaths: deque[float] = deque()  # engine deaths and failed reloads (monotonic seconds)
        self._stopping = threading.Event()  # set by drain: a pending restart gives up its back-off
        self.live = True  # False once the engine cannot be healed: /health then fails

    @property
    def state(self) -> State:
        if self._state == "ready" and self._engine_failure() is not None:
            return "restarting"  # the engine just died; its watcher is about to schedule the restart
        return self._state

    @property
    def reason(self) -> str:
        if self._state == "ready":
            return self._engine_failure() or self._reason
        return self._reason

    @property
    def ready(self) -> bool:
        return self._state == "ready" and self._engine_failure() is None

    def _engine_failure(self) -> str | None:
        # An engine that can die on its own (ProcessEngine's child) says why; in-thread engines never do.
        return self._engine.failure if self._engine is not None else None

    def admitting_engine(self) -> Engine:
        """The engine, when new requests are admitted; else ``NotReady`` with the reason."""
        with self._lock:
            if not self.ready or self._engine is None:
                raise NotReady(f"model not ready: {self.reason}")
            return self._engine

    def engine(self) -> Engine | None:
        """The started engine in any state (cancel and stats still work while draining)."""
        return self._engine

    def stats(self) -> EngineStats:
        engine = self._engine
        return engine.stats() if engine is not None else EngineStats(running=0, queued=0)

    # --- loading ------------------------------------------------------------------------------------
    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="engine-loader", daemon=True).start()

    def _load(self) -> None:
        started = time.monotonic()
        log.info("loading engine %s (%s)", self.settings.engine, self.settings.model_repo_id)
        try:
            engine = self._factory(self.settings, self.metrics)
        except Exception as exc:
            reason = _describe_load_error(exc)
            log.error("engine failed to load: %s", reason)
            with self._lock:
                if self._state == "loading":
                    self._state, self._reason = "failed", reason
            return
        if self._install(engine, expected="loading"):
            log.info("engine ready in %.1f s", time.monotonic() - started)

    def _install(self, engine: Engine, expected: State) -> bool:
        """Start a freshly loaded engine and admit again, if the state is still ``expected``; else (shutdown
        began meanwhile) shut it down. Returns whether it was installed."""
        with self._lock:
            installed = self._state == expected
            if installed:
                engine.watch(lambda reason: self._on_engine_exit(engine, reason))
                engine.start(self.registry.sink)
                self._engine, self._state, self._reason = engine, "ready", "ready"
        if not installed:
            log.info("engine loaded after shutdown began; shutting it down")
            _stop_unused(engine)
            return False
        self.metrics.ready.set(1)
        return True

    # --- healing ------------------------------------------------------------------------------------
    def _on_engine_exit(self, engine: Engine, reason: str) -> None:
        """The engine's watcher (its reader thread): the engine died on its own; heal unless draining."""
        with self._lock:
            if self._engine is not engine or self._state != "ready":
                return
            self._schedule_restart(reason)
        self.metrics.ready.set(0)

    def _schedule_restart(self, reason: str) -> None:
        """Under the lock: count the death; restart after a back-off, or give up past the limit."""
        now = time.monotonic()
        window = self.settings.engine_restart_window_seconds
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - window:
            self._deaths.popleft()
        recent = len(self._deaths)
        limit = self.settings.engine_max_restarts
        if recent > limit:
            self._state, self.live = "failed", False
            self._reason = f"{reason}; gave up after {limit} engine restarts within {window:.0f} s"
            log.error("engine cannot be healed: %s (liveness now fails)", self._reason)
            self._tell_give_up(self._reason)
            return
        delay = min(self.settings.engine_restart_backoff_seconds * 2 ** (recent - 1), MAX_BACKOFF_SECONDS)
        self._state = "restarting"
        self._reason = f"engine restarting ({reason}; restart {recent} of at most {limit}, in {delay:.1f} s)"
        log.warning("%s", self._reason)
        threading.Thread(target=self._restart, args=(delay,), name="engine-restart", daemon=True).start()

    def _tell_give_up(self, reason: str) -> None:
        if self._on_give_up is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed: the process is ending anyway
            self._loop.call_soon_threadsafe(self._on_give_up, reason)

    def _restart(self, delay: float) -> None:
        old = self._engine
        if old is not None:
            old.shutdown(0.0)  # dead already: closes its pipe and joins its reader
        if self._stopping.wait(delay):
            return
        log.info("restarting the engine")
        started = time.monotonic()
        try:
            engine = self._factory(self.settings, self.metrics)
        except Exception as exc:
            with self._lock:
                if self._state == "restarting":
                    self._schedule_restart(f"reload failed: {_describe_load_error(exc)}")
            return
        if self._install(engine, expected="restarting"):
            self.metrics.engine_restarts.inc()
            log.info("engine restarted in %.1f s", time.monotonic() - started)

    # --- shutdown -----------------------------------------------------------------------------------
    def request_drain_threadsafe(self) -> None:
        """Safe from a signal handler or another thread: schedules ``begin_drain`` on the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self.begin_drain)

    def begin_drain(self) -> None:
        """Stop admitting and shut the engine down in a worker thread (idempotent)."""
        with self._lock:
            if self._state == "draining":
                return
            self._state, self._reason = "draining", "shutting down"
            engine = self._engine
        self._stopping.set()
        self.metrics.ready.set(0)
        if engine is None:
            return
        grace = self.settings.shutdown_grace_seconds
        stats = engine.stats()
        log.info("draining: %d running, %d queued, grace %.0f s", stats.running, stats.queued, grace)
        self._drain = self._loop.create_task(self._shutdown_engine(engine, grace))

    async def _shutdown_engine(self, engine: Engine, grace: float) -> None:
        try:
            await asyncio.to_thread(engine.shutdown, grace)
        except Exception:
            log.exception("engine shutdown failed")
        log.info("engine stopped")

    async def close(self) -> None:
        self.begin_drain()
        if self._drain is not None:
            await self._drain


def _stop_unused(engine: Engine) -> None:
    """Release an engine that was built but will never serve (its child process, weights, GPU memory).

    Started first with a sink that drops everything: ``shutdown`` is defined on a started engine (a
    ``ProcessEngine`` learns that its child drained through its reader thread). It holds no requests, so
    the drain is immediate. Runs in the loader thread, never on the event loop."""
    try:
        engine.start(_drop_outputs)
        engine.shutdown(0.0)
    except Exception:
        log.exception("shutting down an engine that loaded after shutdown began failed")


def _drop_outputs(batch: Sequence[tuple[str, Output]]) -> None:
    """The sink of an engine that never serves: it has no requests, so nothing arrives."""


def _describe_load_error(exc: Exception) -> str:
    # ModelLoadError messages are written for operators; anything else gets its type for context.
    if type(exc).__name__ == "ModelLoadError":
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
