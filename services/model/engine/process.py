"""``ProcessEngine``: the HF engine and its scheduler thread in a child process (``ENGINE_PROCESS``).

Why: in one process the scheduler thread shares the GIL with the HTTP event loop, and at 16 streams every
decode step waits behind the loop's Python work. In a child (started with ``spawn``: no forked threads or
torch state) the model gets a GIL of its own; the HTTP process only moves small messages.

Wire (one duplex ``multiprocessing`` Pipe, tuples of plain values):

- parent -> child: ``("prepare", key, GenerateRequest)``, ``("submit", key)``, ``("cancel", request_id)``,
  ``("shutdown", grace)``.
- child -> parent: ``("ready", model_id)`` / ``("load_error", type_name, message)`` once at start;
  ``("prepared", key, sampling, prompt_tokens)`` / ``("prepare_error", key, type_name, message)``;
  ``("out", outputs, first_tokens)`` once per scheduler step (the step's sink call: one parent sink call,
  so the one-hop-per-step property holds end to end); ``("step", batch, seconds, prefill, running,
  queued)`` after it (the observer's ``on_step`` plus the child's batch occupancy); ``("memory", rows)``
  at most once a second (the child's RSS and device memory, for ``model_device_memory_bytes``);
  ``("drained",)``.

The child runs ``prepare`` in a worker thread and keeps the ``Prepared`` (with its tensors) under a key;
the parent's ``Prepared`` carries the key as ``inputs``. ``submit`` refuses synchronously with the
scheduler's own rule (running + queued >= max_batch_size + max_queue, counted on the parent until the
request's FinalOutput arrives), so the child never refuses what the parent admitted. If the child dies,
every active request ends with an ``error`` FinalOutput, the engine refuses new work and calls the
callback given to ``watch`` (the service then starts a new engine: ``services/model/lifecycle.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from services.model.engine.base import EngineStats, FinalOutput, Output, OutputSink, Prepared, TokenOutput
from services.model.settings import ModelSettings
from services.protocol import errors
from services.protocol.errors import Conflict, NotReady, Overloaded
from services.protocol.generate import GenerateRequest

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 1800.0  # weights from the hub on a slow link
EXIT_MARGIN_SECONDS = 30.0  # past the grace: the child's drain, then join, then terminate
MEMORY_REPORT_SECONDS = 1.0  # the child's RSS and device memory, at most this often (with a step)
UNSUBMITTED_TTL_SECONDS = 300.0  # a prepared request nobody submitted (a refused admit) is dropped then


class ProcessEngine:
    """Implements ``services.model.engine.base.Engine`` by driving an ``HFEngine`` in a child process."""

    def __init__(
        self,
        settings: ModelSettings,
        observer: Any | None = None,
        start_timeout: float = START_TIMEOUT_SECONDS,
    ) -> None:
        self.settings = settings
        self.max_batch_size = settings.max_batch_size
        self._capacity = settings.max_batch_size + settings.max_queue
        self._observer = observer
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._process = ctx.Process(
            target=child_main, args=(child_conn, settings), name="engine-child", daemon=True
        )
        self._process.start()
        child_conn.close()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._active: set[str] = set()  # submitted, FinalOutput not yet received
        self._running = 0  # as last reported by the child
        self._closing = False
        self._dead = False
        self.failure: str | None = None  # set when the child died on its own: the service is then not ready
        self._drained = threading.Event()
        self._keys = itertools.count()
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Prepared], str]] = {}
        self._sink: OutputSink | None = None
        self._reader: threading.Thread | None = None
        self._on_exit: Callable[[str], None] | None = None
        self.model_id = self._await_ready(start_timeout)

    def _await_ready(self, timeout: float) -> str:
        try:
            if not self._conn.poll(timeout):
                raise RuntimeError(f"the engine process did not load in {timeout:.0f} s")
            msg = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._kill()
            self._conn.close()
            raise RuntimeError(
                f"the engine process exited while loading (exit code {self._process.exitcode})"
            ) from exc
        except BaseException:
            self._kill()
            self._conn.close()
            raise
        if msg[0] == "ready":
            return str(msg[1])
        self._kill()
        self._conn.close()
        _, type_name, message = msg
        if type_name == "ModelLoadError":
            from services.model.loading import ModelLoadError  # torch-free at import

            raise ModelLoadError(message)
        raise RuntimeError(f"{type_name}: {message}")

    # ---- Engine -------------------------------------------------------------------------------------

    def watch(self, on_exit: Callable[[str], None]) -> None:
        """Call ``on_exit(reason)`` once, from the reader thread, if the child dies on its own (not after
        ``shutdown``); the active requests get their error FinalOutput right after. Call before ``start``."""
        self._on_exit = on_exit

    def start(self, sink: OutputSink) -> None:
        self._sink = sink
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)
        self._reader.start()

    async def prepare(self, request: GenerateRequest) -> Prepared:
        if self._dead:
            raise NotReady("the engine process is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Prepared] = loop.create_future()
        key = next(self._keys)
        with self._lock:
            self._waiting[key] = (loop, future, request.request_id)
        try:
            self._send(("prepare", key, request))
        except (OSError, ValueError) as exc:
            with self._lock:
                self._waiting.pop(key, None)
            raise NotReady("the engine process is not running") from exc
        try:
            return await future
        finally:
            with self._lock:
                self._waiting.pop(key, None)

    def submit(self, prepared: Prepared) -> None:
        request_id = prepared.request_id
        with self._lock:
            if self._closing or self._dead:
                raise NotReady("the model service is shutting down")
            if request_id in self._active:
                raise Conflict(f"request {request_id!r} is already running")
            if len(self._active) >= self._capacity:
                raise Overloaded("the generation queue is full")
            self._active.add(request_id)
        try:
            self._send(("submit", prepared.inputs))
        except (OSError, ValueError) as exc:
            with self._lock:
                self._active.discard(request_id)
            raise NotReady("the engine process is not running") from exc

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            if request_id not in self._active:
                return False
        try:
            self._send(("cancel", request_id))
        except (OSError, ValueError):
            return False
        return True

    def stats(self) -> EngineStats:
        with self._lock:
            active = len(self._active)
            running = min(self._running, active)
        return EngineStats(running=running, queued=active - running)

    def shutdown(self, grace_seconds: float) -> None:
        with self._lock:
            self._closing = True
        try:
            if self._dead:
                raise OSError("the engine process is gone")  # nothing to drain, nothing to wait for
            self._send(("shutdown", grace_seconds))
        except (OSError, ValueError):
            pass  # the child is gone already
        else:
            self._drained.wait(grace_seconds + EXIT_MARGIN_SECONDS)
        if self._drained.is_set():
            with self._send_lock:
                self._conn.close()  # the child's message loop ends on EOF and the process exits
            self._process.join(EXIT_MARGIN_SECONDS)
        if self._process.is_alive():
            log.error("the engine process did not drain and exit; terminating it")
            self._kill()
        if self._reader is not None:
            self._reader.join(EXIT_MARGIN_SECONDS)
        self._conn.close()
        self._fail_active("cancelled", None)  # only those the child never reported (it died)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def is_alive(self) -> bool:
        return self._process.is_alive()

    # ---- internals ----------------------------------------------------------------------------------

    def _send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _kill(self) -> None:
        self._process.kill()  # the child ignores SIGTERM (see child_main)
        self._process.join(10.0)

    def _read(self) -> None:
        """The parent's reader thread: one sink call per child step; replies to prepare; observer calls."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:
                log.exception("undecodable message from the engine process")
                continue
            try:
                self._dispatch(msg)
            except Exception:
                log.exception("handling %s from the engine process failed", msg[0])
            if msg[0] == "drained":
                break
        died = not self._closing
        if died:
            self._process.join(5.0)  # the pipe closes as the process dies: let its exit code arrive
            log.error("the engine process exited (exit code %s)", self._process.exitcode)
            self.failure = f"the engine process exited (exit code {self._process.exitcode})"
        self._dead = True
        if died and self._on_exit is not None and self.failure is not None:
            self._on_exit(self.failure)  # first: no client learns of the death before /ready does
        self._fail_active("error", "the engine process exited")
        self._fail_waiting()

    def _dispatch(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "out":
            self._on_outputs(msg[1], msg[2])
        elif kind == "step":
            _, batch_size, seconds, prefill, running, _queued = msg
            with self._lock:
                self._running = running
            if self._observer is not None:
                self._observer.on_step(batch_size, seconds, prefill)
        elif kind == "prepared":
            _, key, sampling, prompt_tokens = msg
            self._resolve(key, lambda rid: Prepared(rid, sampling, prompt_tokens, inputs=key))
        elif kind == "prepare_error":
            _, key, type_name, message = msg
            self._resolve(key, None, _error(type_name, message))
        elif kind == "memory":
            memory = getattr(self._observer, "engine_process_memory", None)
            if isinstance(memory, dict):
                memory.update(msg[1])
        elif kind == "drained":
            self._drained.set()

    def _on_outputs(self, raw: list[tuple[Any, ...]], first_tokens: list[tuple[str, float]]) -> None:
        outputs: list[tuple[str, Output]] = []
        finished: list[tuple[str, str, int]] = []
        for item in raw:
            if len(item) == 4:
                request_id, reasoning, content, tokens = item
                outputs.append((request_id, TokenOutput(reasoning, content, tokens)))
            else:
                request_id, reason, prompt, completion, error = item
                outputs.append((request_id, FinalOutput(reason, prompt, completion, error)))
                finished.append((request_id, reason, completion))
        if finished:
            with self._lock:
                for request_id, _, _ in finished:
                    self._active.discard(request_id)
        observer = self._observer
        if observer is not None:
            for request_id, seconds in first_tokens:
                observer.on_first_token(request_id, seconds)
            for request_id, reason, completion in finished:
                observer.on_finish(request_id, reason, completion)
        if self._sink is not None and outputs:
            self._sink(outputs)

    def _resolve(self, key: int, make: Any, exc: BaseException | None = None) -> None:
        with self._lock:
            entry = self._waiting.get(key)
        if entry is None:
            return
        loop, future, request_id = entry

        def settle() -> None:
            if future.done():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(make(request_id))

        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(settle)

    def _fail_active(self, reason: str, error: str | None) -> None:
        with self._lock:
            left, self._active = sorted(self._active), set()
        if left and self._sink is not None:
            self._sink([(rid, FinalOutput(reason, 0, 0, error)) for rid in left])

    def _fail_waiting(self) -> None:
        with self._lock:
            keys = list(self._waiting)
        for key in keys:
            self._resolve(key, None, NotReady("the engine process is not running"))


def _error(type_name: str, message: str) -> Exception:
    cls = getattr(errors, type_name, None)
    if isinstance(cls, type) and issubclass(cls, errors.ModelServiceError):
        return cls(message)
    return RuntimeError(f"{type_name}: {message}")


# ---- the child process ------------------------------------------------------------------------------


class _ChildBridge:
    """In the child: the HFEngine's sink and observer, turned into one message per step."""

    def __init__(self, conn: Any, send_lock: threading.Lock) -> None:
        self._conn = conn
        self._send_lock = send_lock
        self._first_tokens: list[tuple[str, float]] = []
        self._memory_at = 0.0
        self.engine: Any = None

    def send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(msg)

    # the OutputSink (engine thread)
    def __call__(self, outputs: Sequence[tuple[str, Output]]) -> None:
        raw: list[tuple[Any, ...]] = []
        for request_id, out in outputs:
            if isinstance(out, TokenOutput):
                raw.append((request_id, out.reasoning, out.content, out.tokens))
            else:
                raw.append(
                    (request_id, out.finish_reason, out.prompt_tokens, out.completion_tokens, out.error)
                )
        first, self._first_tokens = self._first_tokens, []
        self.send(("out", raw, first))

    # the SchedulerObserver (engine thread)
    def on_step(self, batch_size: int, seconds: float, prefill_tokens: int) -> None:
        stats = self.engine.stats() if self.engine is not None else EngineStats(0, 0)
        self.send(("step", batch_size, seconds, prefill_tokens, stats.running, stats.queued))
        now = time.monotonic()
        if now - self._memory_at >= MEMORY_REPORT_SECONDS:
            self._memory_at = now
            self.report_memory()

    def report_memory(self) -> None:
        from services.model.metrics import process_memory

        self.send(("memory", process_memory()))

    def on_first_token(self, request_id: str, seconds: float) -> None:
        self._first_tokens.append((request_id, seconds))

    def on_finish(self, request_id: str, finish_reason: str, completion_tokens: int) -> None:
        """Sent with the step's outputs (the parent calls the observer for each FinalOutput)."""


def child_main(conn: Any, settings: ModelSettings) -> None:
    """The child process: load, report ready, then serve the parent's messages until shutdown.

    SIGINT/SIGTERM sent to the whole process group (Ctrl-C, a group kill) are ignored: the parent drains
    the child through the pipe, and the child ends on its own when the parent's end closes (even if the
    parent was killed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [engine process]: %(message)s",
    )
    send_lock = threading.Lock()
    bridge = _ChildBridge(conn, send_lock)
    try:
        from services.model.engine.hf import HFEngine
        from services.model.loading import load_model_and_processor

        loaded = load_model_and_processor(settings)
        engine = HFEngine(loaded, settings, observer=bridge)
    except Exception as exc:  # reported to the parent, which raises it in the loader thread
        bridge.send(("load_error", type(exc).__name__, str(exc)))
        return
    bridge.engine = engine
    engine.start(bridge)
    bridge.send(("ready", engine.model_id))
    bridge.report_memory()  # the weights' footprint, before any request

    prepared: dict[int, tuple[Prepared, float]] = {}
    prepared_lock = threading.Lock()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="prepare")

    def do_prepare(key: int, request: GenerateRequest) -> None:
        try:
            p = engine.prepare_sync(request)
        except Exception as exc:
            if not isinstance(exc, errors.ModelServiceError):
                log.exception("prepare of %s failed", request.request_id)
            bridge.send(("prepare_error", key, type(exc).__name__, str(exc)))
            return
        with prepared_lock:
            prepared[key] = (p, time.monotonic())
        bridge.send(("prepared", key, p.sampling, p.prompt_tokens))

    def do_shutdown(grace: float) -> None:
        engine.shutdown(grace)  # every request gets its FinalOutput through the bridge first
        bridge.send(("drained",))

    shutdown_thread: threading.Thread | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent closed its end: after "drained", or it is gone
            break
        kind = msg[0]
        if kind == "prepare":
            pool.submit(do_prepare, msg[1], msg[2])
            _drop_stale(prepared, prepared_lock)
        elif kind == "submit":
            with prepared_lock:
                entry = prepared.pop(msg[1], None)
            if entry is None:
                log.error("submit of an unknown prepared request %s", msg[1])
                continue
            p = entry[0]
            try:
                engine.submit(p)
            except errors.ModelServiceError as exc:  # the parent counted it: it must still end
                bridge([(p.request_id, FinalOutput("error", p.prompt_tokens, 0, str(exc)))])
        elif kind == "cancel":
            engine.cancel(msg[1])  # also while draining
        elif kind == "shutdown" and shutdown_thread is None:
            shutdown_thread = threading.Thread(target=do_shutdown, args=(msg[1],), name="engine-drain")
            shutdown_thread.start()
    if shutdown_thread is None:
        engine.shutdown(0.0)
    else:
        shutdown_thread.join()
    pool.shutdown(wait=False, cancel_futures=True)
    conn.close()


def _drop_stale(prepared: dict[int, tuple[Prepared, float]], lock: threading.Lock) -> None:
    cutoff = time.monotonic() - UNSUBMITTED_TTL_SECONDS
    with lock:
        for key in [k for k, (_, at) in prepared.items() if at < cutoff]:
            del prepared[key]
