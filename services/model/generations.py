"""The registry between the engine and HTTP: one append-only event log per submitted request.

The engine thread hands over each step's outputs through ``sink``; they hop to the event loop once per step
and become protocol events with consecutive ``seq`` (0, 1, 2, ...; the index in the log). Readers replay
"events with seq > n, then the live ones until Finished", so a stream can be dropped and re-attached, and
the generation never depends on a reader being there. Finished logs are kept for the retention period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

from services.model.engine.base import FinalOutput, Output, TokenOutput
from services.model.metrics import ModelMetrics
from services.protocol.errors import Conflict, NotFound
from services.protocol.events import Delta, ErrorInfo, Finished, Usage

log = logging.getLogger(__name__)

Event = Delta | Finished


class Generation:
    """One request's events. Touched only on the event loop."""

    def __init__(self, request_id: str, prompt_tokens: int, created: float) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.created = created
        self.events: list[Event] = []
        self.finished_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.pending_tokens = 0  # tokens of outputs that carried no text yet, folded into the next delta
        self._waiters: list[asyncio.Future[None]] = []  # woken by every append
        self._final_waiters: list[asyncio.Future[None]] = []  # woken by Finished only

    @property
    def finished(self) -> Finished | None:
        last = self.events[-1] if self.events else None
        return last if isinstance(last, Finished) else None

    def append_delta(self, out: TokenOutput) -> bool:
        """False when the output carried no text (its tokens then travel with the next delta)."""
        self.pending_tokens += out.tokens
        if not out.reasoning and not out.content:
            return False
        tokens, self.pending_tokens = self.pending_tokens, 0
        seq = len(self.events)
        self.events.append(Delta(seq=seq, reasoning=out.reasoning, content=out.content, tokens=tokens))
        return True

    def append_finished(self, out: FinalOutput, now: float) -> Finished:
        error = None
        if out.error or out.finish_reason == "error":
            error = ErrorInfo(code="internal", message=out.error or "generation failed")
        event = Finished(
            seq=len(self.events),
            finish_reason=out.finish_reason,  # type: ignore[arg-type]  # the engine uses the same literals
            usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens),
            error=error,
        )
        self.events.append(event)
        self.finished_at = now
        return event

    def wake(self) -> None:
        """After appending: wake the readers waiting for events (and for Finished, when it came)."""
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            _resolve_all(waiters)
        if self._final_waiters and self.finished is not None:
            waiters, self._final_waiters = self._final_waiters, []
            _resolve_all(waiters)

    async def follow(self, after: int, interval: float = 0.0) -> AsyncIterator[list[Event]]:
        """Batches of the events with seq > ``after`` (all that are there at each wake-up), up to Finished.

        ``interval`` > 0: at least that many seconds between two batches, so that a fast engine costs one
        write per interval rather than one per step. The first batch and the one with Finished are never
        held back."""
        loop = asyncio.get_running_loop()
        index = after + 1  # seq is the index in the log
        next_batch = 0.0
        while True:
            if index < len(self.events):
                delay = next_batch - loop.time()
                if delay > 0 and self.finished is None:
                    await self._wait(self._final_waiters, delay)
                    continue
                batch = self.events[index:]
                index = len(self.events)
                yield batch
                if isinstance(batch[-1], Finished):
                    return
                next_batch = loop.time() + interval if interval > 0 else 0.0
                continue
            if self.finished is not None:
                return  # the reader already had everything
            await self._wait(self._waiters)

    async def wait_finished(self, limit_seconds: float) -> Finished | None:
        """The Finished event, waiting up to ``limit_seconds`` for it; None when it did not come."""
        if self.finished is None:
            await self._wait(self._final_waiters, max(limit_seconds, 0.0))
        return self.finished

    async def _wait(self, waiters: list[asyncio.Future[None]], seconds: float | None = None) -> None:
        """Until the next wake-up of ``waiters`` or ``seconds`` (None: no limit); one timer handle, cheaper
        than ``asyncio.timeout`` on a path taken per write."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        waiters.append(waiter)
        timer = loop.call_later(seconds, _resolve, waiter) if seconds is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)  # timed out or cancelled: not woken, still listed


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _resolve_all(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        _resolve(waiter)


class GenerationRegistry:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        metrics: ModelMetrics,
        retention_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        stream_interval_seconds: float = 0.0,
    ) -> None:
        self._loop = loop
        # Least time between two writes of one stream (the first and the last go out at once).
        self.stream_interval = stream_interval_seconds
        self._metrics = metrics
        self._retention = retention_seconds
        self._clock = clock
        self._generations: dict[str, Generation] = {}
        # Steps handed over by the engine thread and not yet applied on the loop: while one hop is on its
        # way, later steps join it instead of scheduling (and waking the loop for) hops of their own.
        self._handover = threading.Lock()
        self._pending: list[tuple[list[tuple[str, Output]], float]] = []

    def __len__(self) -> int:
        return len(self._generations)

    def check_new(self, request_id: str) -> None:
        if request_id in self._generations:
            raise Conflict(f"request {request_id!r} already exists")

    def create(self, request_id: str, prompt_tokens: int) -> Generation:
        self.check_new(request_id)
        generation = Generation(request_id, prompt_tokens, self._clock())
        self._generations[request_id] = generation
        return generation

    def discard(self, request_id: str) -> None:
        """Forget a generation the engine never accepted."""
        self._generations.pop(request_id, None)

    def get(self, request_id: str) -> Generation:
        generation = self._generations.get(request_id)
        if generation is None:
            raise NotFound(f"unknown or expired request {request_id!r}")
        return generation

    # --- fed by the engine thread -------------------------------------------------------------------
    def sink(self, batch: Sequence[tuple[str, Output]]) -> None:
        """The engine's OutputSink: at most one hop to the event loop per step, whatever the batch size
        (none when a hop is still pending: the loop then applies several steps at once, in order)."""
        now = self._clock()
        with self._handover:
            self._pending.append((list(batch), now))
            if len(self._pending) > 1:
                return
        try:
            self._loop.call_soon_threadsafe(self._apply_pending)
        except RuntimeError:  # the loop is closed: the process is exiting, nobody can read these anyway
            log.debug("dropped %d outputs after the event loop closed", len(batch))

    def _apply_pending(self) -> None:
        with self._handover:
            pending, self._pending = self._pending, []
        for batch, now in pending:
            self._apply(batch, now)

    def _apply(self, batch: list[tuple[str, Output]], now: float) -> None:
        touched: dict[str, Generation] = {}
        tokens = 0
        for request_id, out in batch:
            generation = self._generations.get(request_id)
            if generation is None or generation.finished is not None:
                log.warning("output for unknown or finished request %s dropped", request_id)
                continue
            if isinstance(out, TokenOutput):
                tokens += out.tokens
                self._on_tokens(generation, out, now)
            else:
                self._on_final(generation, out, now)
            touched[request_id] = generation
        if tokens:
            self._metrics.generated_tokens.inc(tokens)  # once per step, not per row
        for generation in touched.values():
            generation.wake()

    def _on_tokens(self, generation: Generation, out: TokenOutput, now: float) -> None:
        if out.tokens > 0:
            m = self._metrics
            if generation.first_token_at is None:
                generation.first_token_at = now
                m.ttft.observe(now - generation.created)
            elif generation.last_token_at is not None:
                m.itl.observe((now - generation.last_token_at) / out.tokens)
            generation.last_token_at = now
        generation.append_delta(out)

    def _on_final(self, generation: Generation, out: FinalOutput, now: float) -> None:
        event = generation.append_finished(out, now)
        self._metrics.requests.labels(event.finish_reason).inc()
        self._metrics.duration.observe(now - generation.created)
        if event.error is not None:
            log.error("request %s failed: %s", generation.request_id, event.error.message)
        log.info(
            "request %s %s: prompt %d, completion %d tokens, %.2f s",
            generation.request_id,
            event.finish_reason,
            event.usage.prompt_tokens,
            event.usage.completion_tokens,
            now - generation.created,
        )

    # --- retention ----------------------------------------------------------------------------------
    def sweep(self) -> int:
        """Forget generations finished longer than the retention ago; returns how many."""
        cutoff = self._clock() - self._retention
        expired = [
            rid
            for rid, gen in self._generations.items()
            if gen.finished_at is not None and gen.finished_at <= cutoff
        ]
        for rid in expired:
            del self._generations[rid]
        return len(expired)

    async def run_sweeper(self) -> None:
        # Often enough that an expired log answers 404 soon after its retention, rarely enough to be free.
        interval = min(max(self._retention / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            self.sweep()
