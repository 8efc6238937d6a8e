"""``ProcessEngine``: the HF engine and its scheduler thread in a child process (``ENGINE_PROCESS``).

Why: in one process the scheduler thread shares the GIL with the HTTP event loop, and at 16 streams every
decode step waits behind the loop's Python work. In a child (started with ``spawn``: no forked threads or
torch state) the model gets a GIL of its own; the HTTP process only moves small messages.

The parent holds the admission ledger (``admission.Admission``: the same capacity and duplicate rule as
every engine, counted here until the request's FinalOutput arrives, so the child never refuses what the
parent admitted) and talks to the child (``worker.py``) in the typed messages of ``wire.py``: one ``Admit``
round trip per request, one ``StepReport`` per scheduler step (one sink call here: the one-hop-per-step
property holds end to end). If the child dies, every known request ends with an ``error`` FinalOutput,
the engine refuses new work and calls the callback given to ``watch`` (the service then starts a new
engine: ``services/model/lifecycle.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
from collections import Counter
from collections.abc import Callable

from services.model.engine import wire
from services.model.engine.admission import Admission
from services.model.engine.base import Admitted, EngineObserver, EngineStats, FinalOutput, OutputSink
from services.model.engine.worker import child_main
from services.model.settings import ModelSettings
from services.protocol import errors
from services.protocol.errors import NotReady
from services.protocol.generate import GenerateRequest

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 1800.0  # weights from the hub on a slow link
EXIT_MARGIN_SECONDS = 30.0  # past the grace: the child's drain, then join, then terminate
_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Admitted]"]


class ProcessEngine:
    """Implements ``services.model.engine.base.Engine`` by driving an ``HFEngine`` in a child process."""

    def __init__(
        self,
        settings: ModelSettings,
        observer: EngineObserver | None = None,
        start_timeout: float = START_TIMEOUT_SECONDS,
    ) -> None:
        """Starts the child and blocks until its model is loaded (``ModelLoadError`` or ``RuntimeError``)."""
        self.settings = settings
        self.max_batch_size = settings.max_batch_size
        self.observer = observer
        self.failure: str | None = None  # set when the child died on its own: the service is then not ready
        self._admission = Admission(settings.max_batch_size, settings.max_queue)
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._process = ctx.Process(
            target=child_main, args=(child_conn, settings), name="engine-child", daemon=True
        )
        self._process.start()
        child_conn.close()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiter] = {}  # admits sent, no answer yet
        self._dead = False
        self._drained = threading.Event()
        self._sink: OutputSink | None = None
        self._reader: threading.Thread | None = None
        self._on_exit: Callable[[str], None] | None = None
        self.received: Counter[str] = Counter()  # messages from the child by type (one StepReport a step)
        self.model_id = self._await_ready(start_timeout)

    def _await_ready(self, timeout: float) -> str:
        try:
            if not self._conn.poll(timeout):
                raise RuntimeError(f"the engine process did not load in {timeout:.0f} s")
            msg = self._conn.recv()
        except BaseException as exc:
            self._kill()
            self._conn.close()
            if isinstance(exc, (EOFError, OSError)):
                code = self._process.exitcode
                raise RuntimeError(f"the engine process exited while loading (exit code {code})") from exc
            raise
        if isinstance(msg, wire.Ready):
            return msg.model_id
        self._kill()
        self._conn.close()
        if not isinstance(msg, wire.LoadFailed):
            raise RuntimeError(f"the engine process answered {type(msg).__name__} instead of Ready")
        if msg.type_name == "ModelLoadError":
            from services.model.loading import ModelLoadError  # torch-free at import

            raise ModelLoadError(msg.message)
        raise RuntimeError(f"{msg.type_name}: {msg.message}")

    # ---- Engine -------------------------------------------------------------------------------------

    def watch(self, on_exit: Callable[[str], None]) -> None:
        """Call ``on_exit(reason)`` once, from the reader thread, if the child dies on its own (not after
        ``shutdown``); the known requests get their error FinalOutput right after. Call before ``start``."""
        self._on_exit = on_exit

    def start(self, sink: OutputSink) -> None:
        self._sink = sink
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)
        self._reader.start()

    async def admit(self, request: GenerateRequest) -> Admitted:
        rid = request.request_id
        if self._dead:
            raise NotReady("the engine process is not running")
        self._admission.reserve(rid, request.sampling.n)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Admitted] = loop.create_future()
        with self._lock:
            self._waiting[rid] = (loop, future)
        try:
            self._send(wire.Admit(request))
        except (OSError, ValueError) as exc:
            with self._lock:
                self._waiting.pop(rid, None)
            self._admission.release(rid)
            raise NotReady("the engine process is not running") from exc
        try:
            return await future  # a Refused answer has released it already
        except asyncio.CancelledError:  # the caller went away: the child drops it once queued
            self.cancel(rid)
            raise
        finally:
            with self._lock:
                self._waiting.pop(rid, None)

    def cancel(self, request_id: str) -> bool:
        if not self._admission.cancel(request_id):
            return False
        try:
            self._send(wire.Cancel(request_id))
        except (OSError, ValueError):
            return False
        return True

    def stats(self) -> EngineStats:
        return self._admission.stats()

    def shutdown(self, grace_seconds: float) -> None:
        self._admission.close()
        try:
            if self._dead:
                raise OSError("the engine process is gone")  # nothing to drain, nothing to wait for
            self._send(wire.Shutdown(grace_seconds))
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
        self._fail_known("cancelled", None)  # only those the child never reported (it died)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def is_alive(self) -> bool:
        return self._process.is_alive()

    # ---- internals ----------------------------------------------------------------------------------

    def _send(self, msg: wire.ToChild) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _kill(self) -> None:
        self._process.kill()  # the child ignores SIGTERM (see worker.child_main)
        self._process.join(10.0)

    def _read(self) -> None:
        """The parent's reader thread: one sink call per StepReport; answers to admits."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:
                log.exception("undecodable message from the engine process")
                continue
            self.received[type(msg).__name__] += 1
            try:
                self._dispatch(msg)
            except Exception:
                log.exception("handling %s from the engine process failed", type(msg).__name__)
            if isinstance(msg, wire.Drained):
                break
        self._on_reader_end()

    def _on_reader_end(self) -> None:
        died = not self._admission.closing
        if died:
            self._process.join(5.0)  # the pipe closes as the process dies: let its exit code arrive
            self.failure = f"the engine process exited (exit code {self._process.exitcode})"
            log.error("%s", self.failure)
        self._dead = True
        if died and self._on_exit is not None and self.failure is not None:
            self._on_exit(self.failure)  # first: no client learns of the death before /ready does
        self._fail_waiting()
        self._fail_known("error", "the engine process exited")

    def _dispatch(self, msg: wire.ToParent) -> None:
        """The one dispatch of the child's messages."""
        match msg:
            case wire.StepReport():
                self._on_report(msg)
            case Admitted(request_id=rid):
                self._settle(rid, msg)
            case wire.Refused(request_id=rid, type_name=name, message=message):
                self._admission.release(rid)
                self._settle(rid, _error(name, message))
            case wire.Drained():
                self._drained.set()
            case _:
                log.error("unexpected message from the engine process: %s", type(msg).__name__)

    def _on_report(self, report: wire.StepReport) -> None:
        self._admission.report_running(report.running)
        outputs = report.outputs()
        finals = [(rid, out) for rid, out in outputs if isinstance(out, FinalOutput)]
        for rid, _ in finals:
            self._admission.release(rid)
        observer = self.observer
        if observer is not None:
            for t in report.timings:
                observer.on_step(t.batch_size, t.seconds, t.prefill_tokens, t.prefills)
            for rid, seconds in report.first_tokens:
                observer.on_first_token(rid, seconds)
            for rid, out in finals:
                observer.on_finish(rid, out.finish_reason, out.completion_tokens)
            if report.memory is not None:
                observer.on_memory(report.memory)
            on_kv = getattr(observer, "on_kv_cache", None)
            if report.kv_cache is not None and on_kv is not None:
                on_kv(report.kv_cache)
            on_media = getattr(observer, "on_media_cache", None)
            if report.media_cache is not None and on_media is not None:
                on_media(report.media_cache)
        if self._sink is not None and outputs:
            self._sink(outputs)

    def _settle(self, request_id: str, result: Admitted | BaseException) -> None:
        with self._lock:
            waiter = self._waiting.get(request_id)
        if waiter is None:
            return
        loop, future = waiter

        def settle() -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(settle)

    def _fail_waiting(self) -> None:
        """Admits without an answer (the child is gone): refused with ``NotReady``."""
        with self._lock:
            ids = list(self._waiting)
        for rid in ids:
            self._admission.release(rid)
            self._settle(rid, NotReady("the engine process is not running"))

    def _fail_known(self, reason: str, error: str | None) -> None:
        left = self._admission.known()
        for rid in left:
            self._admission.release(rid)
        if left and self._sink is not None:
            self._sink([(rid, FinalOutput(reason, 0, 0, error)) for rid in left])


def _error(type_name: str, message: str) -> Exception:
    cls = getattr(errors, type_name, None)
    if isinstance(cls, type) and issubclass(cls, errors.ModelServiceError):
        return cls(message)
    return RuntimeError(f"{type_name}: {message}")
