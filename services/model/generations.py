"""The registry between the engine and HTTP: one append-only event log per submitted request.

The engine thread hands over each step's outputs through ``sink``; they hop to the event loop once per step
and become protocol events with consecutive ``seq`` (0, 1, 2, ...; the index in the log). Readers replay
"events with seq > n, then the live ones until Finished", so a stream can be dropped and re-attached, and
the generation never depends on a reader being there.

Finished logs are kept only for re-attach and takeover (the api stores every event itself): each is
compacted when its Finished arrives (``CompactLog``: the deltas' texts joined, 12 bytes per delta for where
each ends and its tokens; re-attach at seq s still gets exactly the events after s, rebuilt) and kept for
``FINISHED_RETENTION_SECONDS`` but at most ``FINISHED_RETENTION_BYTES`` in all, the oldest evicted first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence

from services.model.engine.base import FinalOutput, Output, TokenLogprobs, TokenOutput
from services.model.engine.logprobs import merge as merge_logprobs
from services.model.engine.logprobs import to_delta_logprobs
from services.model.metrics import ModelMetrics
from services.protocol.errors import Conflict, NotFound
from services.protocol.events import Delta, ErrorInfo, Event, Finished, Usage

log = logging.getLogger(__name__)


# What a retained finished log costs beyond its buffers: the Generation object and its attributes, the
# Finished event, the registry's dict entries (measured with tracemalloc: ~1.6 KiB; rounded up).
LOG_OVERHEAD_BYTES = 2048


class CompactLog:
    """A finished generation's events in three flat buffers, rebuilt into the same events on demand.

    ``reasoning``/``content``: every delta's text of that kind joined; ``_marks``: per delta (seq 0..n-1)
    the end offset of its reasoning and of its content (in characters) and its token count, as unsigned
    32-bit ints. ``finished`` is the last event (seq n). A re-attach rebuilds only the events it asks for.
    ``_choices`` (requests with ``n`` > 1 only): by seq, the choice index and finish reason of each delta
    that has either.
    """

    __slots__ = ("_choices", "_logprobs", "_marks", "content", "finished", "reasoning")

    def __init__(self, deltas: Sequence[Delta], finished: Finished) -> None:
        # logprobs (requests that asked for them) are kept as they were, per delta: they are the bulk
        self._logprobs = [d.logprobs for d in deltas] if any(d.logprobs for d in deltas) else None
        choices = {d.seq: (d.index, d.finish_reason) for d in deltas if d.index or d.finish_reason}
        self._choices = choices or None
        self.reasoning = "".join(d.reasoning for d in deltas)
        self.content = "".join(d.content for d in deltas)
        marks = array("I")
        r_end = c_end = 0
        for d in deltas:
            r_end += len(d.reasoning)
            c_end += len(d.content)
            marks.extend((r_end, c_end, d.tokens))
        self._marks = marks
        self.finished = finished

    def __len__(self) -> int:
        """Events in the log, Finished included."""
        return len(self._marks) // 3 + 1

    @property
    def nbytes(self) -> int:
        """Approximate bytes held by this log (texts, marks and the fixed per-log overhead)."""
        marks = self._marks.buffer_info()[1] * self._marks.itemsize
        texts = sys.getsizeof(self.reasoning) + sys.getsizeof(self.content)
        return texts + marks + self._logprobs_bytes() + LOG_OVERHEAD_BYTES

    def _logprobs_bytes(self) -> int:
        """About what the kept logprob entries hold (~200 bytes per candidate as Python objects)."""
        if self._logprobs is None:
            return 0
        entries = [e for d in self._logprobs if d is not None for e in (*d.reasoning, *d.content)]
        return sum(200 * (1 + len(e.top_logprobs)) for e in entries)

    def events_from(self, index: int) -> list[Event]:
        """The events with seq >= ``index`` (``[]`` past the end), identical to the ones first streamed."""
        marks, count = self._marks, len(self._marks) // 3
        out: list[Event] = []
        for i in range(max(index, 0), count):
            r_start, c_start = (marks[3 * i - 3], marks[3 * i - 2]) if i else (0, 0)
            r_end, c_end, tokens = marks[3 * i], marks[3 * i + 1], marks[3 * i + 2]
            reasoning, content = self.reasoning[r_start:r_end], self.content[c_start:c_end]
            delta = Delta(seq=i, reasoning=reasoning, content=content, tokens=tokens)
            if self._logprobs is not None:
                delta.logprobs = self._logprobs[i]
            if self._choices is not None and i in self._choices:
                delta.index, delta.finish_reason = self._choices[i]
            out.append(delta)
        if index <= count:
            out.append(self.finished)
        return out


class Generation:
    """One request's events. Touched only on the event loop.

    Running: a list of events; finished and compacted (``compact``): a ``CompactLog``. Readers use
    ``count`` and ``events_from``, which work the same in both forms."""

    def __init__(self, request_id: str, prompt_tokens: int, created: float) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.created = created
        self._live: list[Event] = []
        self._compact: CompactLog | None = None
        self.finished: Finished | None = None  # the last event, once it came
        self.finished_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        # by choice index: tokens of outputs that carried no text yet (and their logprob entries), folded
        # into that choice's next delta
        self._pending: dict[int, tuple[int, TokenLogprobs | None]] = {}
        self._waiters: list[asyncio.Future[None]] = []  # woken by every append
        self._final_waiters: list[asyncio.Future[None]] = []  # woken by Finished only

    @property
    def count(self) -> int:
        """Events so far (the next seq)."""
        return len(self._compact) if self._compact is not None else len(self._live)

    @property
    def events(self) -> list[Event]:
        """Every event so far (a copy; rebuilt when compacted)."""
        return self.events_from(0)

    def events_from(self, index: int) -> list[Event]:
        """The events with seq >= ``index``."""
        if self._compact is not None:
            return self._compact.events_from(index)
        return self._live[max(index, 0) :]

    def compact(self) -> int:
        """Turn a finished log into a ``CompactLog``; returns the bytes it now holds (idempotent)."""
        if self._compact is None:
            assert self.finished is not None, "only a finished log can be compacted"
            deltas = [e for e in self._live if isinstance(e, Delta)]
            self._compact, self._live = CompactLog(deltas, self.finished), []
        return self._compact.nbytes

    def append_delta(self, out: TokenOutput) -> bool:
        """False when the output carried no text, no logprobs and no choice end (its tokens then travel
        with its choice's next delta); an output with logprobs always makes a delta (its tokens' entries
        are never dropped), and so does a choice's end (``finish_reason``, n > 1)."""
        tokens, logprobs = self._pending.pop(out.index, (0, None))
        tokens += out.tokens
        logprobs = merge_logprobs(logprobs, out.logprobs)
        if not out.reasoning and not out.content and logprobs is None and out.finish_reason is None:
            self._pending[out.index] = (tokens, logprobs)
            return False
        seq = len(self._live)
        delta = Delta(
            seq=seq,
            index=out.index,
            finish_reason=out.finish_reason,  # type: ignore[arg-type]  # the engine's literals
            reasoning=out.reasoning,
            content=out.content,
            tokens=tokens,
        )
        if logprobs is not None:
            delta.logprobs = to_delta_logprobs(logprobs)
        self._live.append(delta)
        return True

    def append_finished(self, out: FinalOutput, now: float) -> Finished:
        error = None
        if out.error or out.finish_reason == "error":
            error = ErrorInfo(code=out.error_code, message=out.error or "generation failed")
        event = Finished(
            seq=len(self._live),
            finish_reason=out.finish_reason,  # type: ignore[arg-type]  # the engine uses the same literals
            usage=Usage(
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                cached_tokens=out.cached_tokens,
            ),
            error=error,
        )
        self._live.append(event)
        self.finished = event
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
        """Lists of the events with seq > ``after`` (all that are there at each wake-up: one stream write
        each), up to Finished.

        ``interval`` > 0: at least that many seconds between two writes, so that a fast engine costs one
        write per interval rather than one per step. The first write and the one with Finished are never
        held back."""
        loop = asyncio.get_running_loop()
        index = after + 1  # seq is the index in the log
        next_write = 0.0
        while True:
            if index < self.count:
                delay = next_write - loop.time()
                if delay > 0 and self.finished is None:
                    await self._wait(self._final_waiters, delay)
                    continue
                ready = self.events_from(index)
                index += len(ready)
                yield ready
                if isinstance(ready[-1], Finished):
                    return
                next_write = loop.time() + interval if interval > 0 else 0.0
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
        retention_bytes: int | None = None,
    ) -> None:
        """``retention_seconds``/``retention_bytes``: how long, and how many bytes of compacted logs in all
        (None: no byte bound), finished generations are kept for re-attach; the oldest go first."""
        self._loop = loop
        # Least time between two writes of one stream (the first and the last go out at once).
        self.stream_interval = stream_interval_seconds
        self._metrics = metrics
        self._retention = retention_seconds
        self._clock = clock
        self._generations: dict[str, Generation] = {}
        self._retention_bytes = retention_bytes
        self._retained: OrderedDict[str, int] = OrderedDict()  # finished ids, oldest first -> bytes
        self.retained_bytes = 0
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

    def admitted(self, generation: Generation, prompt_tokens: int) -> None:
        """The engine admitted the request: its prompt size; its latencies count from now (unless a token
        came first, which an engine process can report before ``admit`` returns)."""
        generation.prompt_tokens = prompt_tokens
        if generation.first_token_at is None:
            generation.created = self._clock()

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
        self._retain(generation)
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
    def _retain(self, generation: Generation) -> None:
        """Compact a just-finished log and keep it within the byte bound (evicting the oldest first)."""
        size = generation.compact()
        self._retained[generation.request_id] = size
        self.retained_bytes += size
        bound = self._retention_bytes
        while bound is not None and self.retained_bytes > bound and self._retained:
            self._forget(next(iter(self._retained)))
        self._metrics.retained_bytes.set(self.retained_bytes)

    def _forget(self, request_id: str) -> None:
        self.retained_bytes -= self._retained.pop(request_id, 0)
        self._generations.pop(request_id, None)

    def sweep(self) -> int:
        """Forget generations finished longer than the retention ago; returns how many."""
        cutoff = self._clock() - self._retention
        expired = []
        for rid in self._retained:  # oldest first: stop at the first one still within the retention
            finished_at = self._generations[rid].finished_at
            if finished_at is not None and finished_at > cutoff:
                break
            expired.append(rid)
        for rid in expired:
            self._forget(rid)
        self._metrics.retained_bytes.set(self.retained_bytes)
        return len(expired)

    async def run_sweeper(self) -> None:
        # Often enough that an expired log answers 404 soon after its retention, rarely enough to be free.
        interval = min(max(self._retention / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            self.sweep()
