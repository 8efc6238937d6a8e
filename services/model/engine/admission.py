"""The one admission rule of every engine: queue, capacity, cancel, drain and the duplicate-request conflict.

Torch-free. ``Admission`` is the ledger of the requests an engine has accepted and not yet finished
(``ProcessEngine``'s parent side uses it alone: the queue is in the child); ``AdmissionQueue`` adds the
queue and the engine thread's life around a caller-given step (the real ``Scheduler`` and the fake).

The rule, the same for every engine:

- a request is *known* from ``reserve`` (before its prepare work) to its ``FinalOutput`` (``finish``) or
  its refusal (``release``), and weighs its ``rows`` (its ``n`` choices: one batch row each);
  ``reserve`` refuses, in this order: ``NotReady`` once shutdown began, ``Conflict`` for a request id
  already known, ``InvalidValue`` (param ``n``) for more rows than ``max_batch_size`` (it could never
  run), ``Overloaded`` when the known rows plus its own exceed ``max_batch_size + max_queue`` (the queue
  counts only what cannot take a batch slot at the next step);
- ``cancel`` is True once per known request (False when unknown, finished or already cancelled); a
  request cancelled while it is prepared is dropped when it reaches the queue;
- ``stats``: ``running`` = rows of the requests that left the queue for the batch, ``queued`` = the rest;
- ``shutdown(grace)``: stop admitting; requests that hold a batch slot (running, or queued within the free
  slots) may finish within ``grace`` seconds; those still waiting for a slot are cancelled at once, the
  rest once the grace is over; every request gets exactly one ``FinalOutput``; then the thread ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from services.model.engine.base import EngineStats
from services.protocol.errors import Conflict, InvalidValue, NotReady, Overloaded

log = logging.getLogger(__name__)


class HasRequestId(Protocol):
    @property
    def request_id(self) -> str: ...

    @property
    def rows(self) -> int: ...


ItemT = TypeVar("ItemT", bound=HasRequestId)


class Admission:
    """The ledger: known request ids, the capacity and duplicate rule, cancel marks. Thread-safe."""

    def __init__(self, max_batch_size: int, max_queue: int) -> None:
        """``max_batch_size`` rows run at once; ``max_queue`` more may wait for a slot."""
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._known: dict[str, int] = {}  # request id -> its rows
        self._rows = 0  # sum of the known requests' rows
        self._cancels: set[str] = set()
        self._closing = False
        self._reported_running = 0

    @property
    def closing(self) -> bool:
        return self._closing

    def reserve(self, request_id: str, rows: int = 1) -> None:
        """Count the request (``rows`` batch rows: its ``n``) from now on. Raises ``NotReady``,
        ``Conflict``, ``InvalidValue`` or ``Overloaded`` (in this order, see the module doc)."""
        with self._cond:
            self._check(request_id, rows)
            self._add(request_id, rows)

    def _check(self, request_id: str, rows: int) -> None:
        if self._closing:
            raise NotReady("the model service is shutting down")
        if request_id in self._known:
            raise Conflict(f"request {request_id!r} is already queued or running")
        if rows > self.max_batch_size:
            raise InvalidValue(f"n: {rows} choices exceed this server's batch size of {self.max_batch_size}")
        if self._rows + rows > self.max_batch_size + self.max_queue:
            raise Overloaded("the generation queue is full")

    def _add(self, request_id: str, rows: int) -> None:
        self._known[request_id] = rows
        self._rows += rows

    def release(self, request_id: str) -> None:
        """Forget a request: refused after ``reserve`` (no ``FinalOutput``), or finished."""
        with self._cond:
            self._forget(request_id)
            self._cond.notify_all()

    def _forget(self, request_id: str) -> None:
        self._rows -= self._known.pop(request_id, 0)
        self._cancels.discard(request_id)

    def is_known(self, request_id: str) -> bool:
        with self._cond:
            return request_id in self._known

    def cancel(self, request_id: str) -> bool:
        """Mark a known request cancelled; False when unknown, finished or already marked."""
        with self._cond:
            if request_id not in self._known or request_id in self._cancels:
                return False
            self._cancels.add(request_id)
            self._cond.notify_all()
            return True

    def close(self) -> None:
        """Stop admitting: every later ``reserve`` raises ``NotReady``."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def known(self) -> list[str]:
        """The known request ids (sorted)."""
        with self._cond:
            return sorted(self._known)

    def report_running(self, running: int) -> None:
        """The batch occupancy as reported by whoever runs the queue (``ProcessEngine``'s child)."""
        with self._cond:
            self._reported_running = running

    def stats(self) -> EngineStats:
        """Rows (not requests): an ``n`` = 3 request counts 3."""
        with self._cond:
            running = min(self._reported_running, self._rows)
            return EngineStats(running=running, queued=self._rows - running)


class AdmissionQueue(Admission, Generic[ItemT]):
    """The ledger plus the queue and the engine thread that drains it with a caller-given step.

    Any thread: ``submit`` (or ``reserve`` then ``enqueue``), ``cancel``, ``stats``, ``shutdown``. The engine
    thread (inside ``step``): ``take_cancels``, ``peek``/``pop``, ``finish`` (once per request that was
    enqueued, with its ``FinalOutput``), ``pause``."""

    def __init__(self, max_batch_size: int, max_queue: int) -> None:
        super().__init__(max_batch_size, max_queue)
        self._queue: deque[tuple[ItemT, float]] = deque()
        self._started: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- any thread ---------------------------------------------------------------------------------

    def submit(self, item: ItemT) -> None:
        """``reserve`` and ``enqueue`` in one: raises as ``reserve`` does."""
        with self._cond:
            self._check(item.request_id, item.rows)
            self._add(item.request_id, item.rows)
            self._append(item)

    def enqueue(self, item: ItemT) -> None:
        """A reserved request joins the queue; ``NotReady`` (and released) once shutdown began."""
        with self._cond:
            if self._closing:
                self._forget(item.request_id)
                self._cond.notify_all()
                raise NotReady("the model service is shutting down")
            self._append(item)

    def _append(self, item: ItemT) -> None:
        self._queue.append((item, time.perf_counter()))
        self._cond.notify_all()

    def stats(self) -> EngineStats:
        """Rows (not requests): an ``n`` = 3 request counts 3."""
        with self._cond:
            running = sum(self._known.get(rid, 0) for rid in self._started)
            return EngineStats(running=running, queued=self._rows - running)

    def close(self) -> None:
        """Stop admitting; cancel the queued requests that cannot take a batch slot at the next step."""
        with self._cond:
            self._closing = True
            free = max(0, self.max_batch_size - sum(self._known.get(rid, 0) for rid in self._started))
            for item, _ in self._queue:
                if item.rows <= free:
                    free -= item.rows
                else:
                    free = 0  # in arrival order: nothing after the first that does not fit starts first
                    self._cancels.add(item.request_id)
            self._cond.notify_all()

    def start(self, step: Callable[[], None], name: str) -> None:
        """Run ``step`` in a thread of its own while there is work (a step that raises is logged)."""
        self._thread = threading.Thread(target=self._run, args=(step,), name=name, daemon=True)
        self._thread.start()

    def shutdown(self, grace_seconds: float) -> None:
        """Drain (see the module doc) and end the thread; without a thread only stop admitting."""
        self.close()
        if self._thread is None:
            return
        with self._cond:
            if not self._cond.wait_for(self._idle, grace_seconds):
                self._cancels.update(self._known)
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    # ---- the engine thread --------------------------------------------------------------------------

    def has_work(self) -> bool:
        with self._cond:
            return not self._idle()

    def _idle(self) -> bool:
        return not self._queue and not self._started

    def _run(self, step: Callable[[], None]) -> None:
        while self._wait_for_work():
            try:
                step()
            except Exception:  # a sink or observer fault: the loop must live on regardless
                log.exception("engine step failed")

    def _wait_for_work(self) -> bool:
        with self._cond:
            while self._idle():
                if self._stopping:
                    return False
                self._cond.wait()
            return True

    def take_cancels(self) -> tuple[list[ItemT], set[str]]:
        """Cancelled requests: the queued ones (removed from the queue; the caller ends each with
        ``finish``) and the ids of the started ones (the caller stops them). Marks of requests still
        being prepared stay until they reach the queue."""
        with self._cond:
            if not self._cancels:
                return [], set()
            dropped = [item for item, _ in self._queue if item.request_id in self._cancels]
            if dropped:
                self._queue = deque(e for e in self._queue if e[0].request_id not in self._cancels)
            started = self._cancels & self._started
            self._cancels -= started | {item.request_id for item in dropped}
            return dropped, started

    def peek(self) -> ItemT | None:
        """The request first in the queue (only the engine thread removes queued requests)."""
        with self._cond:
            return self._queue[0][0] if self._queue else None

    def pop(self) -> tuple[ItemT, float] | None:
        """The first queued request and when it was queued (``time.perf_counter``), now started."""
        with self._cond:
            if not self._queue:
                return None
            item, queued_at = self._queue.popleft()
            self._started.add(item.request_id)
            return item, queued_at

    def finish(self, request_id: str) -> None:
        """The request's ``FinalOutput`` is out: forget it (its capacity is free again)."""
        with self._cond:
            self._forget(request_id)
            self._started.discard(request_id)
            self._cond.notify_all()

    def pause(self, seconds: float) -> None:
        """Wait up to ``seconds``, sooner on any submit, cancel or shutdown (the fake's step pacing)."""
        with self._cond:
            if not self._stopping and seconds > 0:
                self._cond.wait(seconds)
