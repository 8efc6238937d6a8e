"""The runner: one background task per running session, independent of any client connection.

It reads the model stream, folds the text into pending chunks (consecutive text of one kind merges into a
single chunk until the next flush: that is the coalescing, bounded by EVENT_FLUSH_MS), and a flusher writes
the pending chunks to the store in one ``append`` per interval together with the model seq they cover.
Only after a batch is stored does it become visible (``LiveLog.publish``), so a process that dies can never
have shown a client an event that its successor, re-attaching at the stored model seq, would produce
differently. The runner holds the session's lease and renews it; it also performs auto-cancel.

Store failures: a write that fails is retried with back-off (``STORE_RETRY_SECONDS``), and every retry
carries everything that arrived meanwhile (one growing batch). Before a retry the runner re-claims its lease
and checks what the failed attempt may have stored after all (a commit whose answer was lost), so nothing is
written twice. Appends name the runner (fencing): a runner that lost its lease can never write after its
successor. When the store stays down past the bound, the runner stops (its lease lapses) and the session is
taken over later, here or by any other process, at the stored model seq.

Several choices (``n`` > 1): every chunk carries one choice's ``index``; each choice starts with its own
role chunk and ends with its own finish chunk (when its choice-end delta arrives, or, for choices that never
ended on their own, with the request's ``Finished``); one usage chunk counts every choice. Text coalesces
per choice. With tools each choice has its own ``ToolCallParser`` and call numbering (call ids are derived
from the chunk id and the choice), and chunks wait in ``_held`` until every choice's parser is clean, so a
takeover re-folds from a model seq where nothing of any choice was held.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from services.api.metrics import ApiMetrics
from services.api.model_client import EventStream, GenerationBackend, StreamBroken
from services.api.settings import ApiSettings
from services.api.store.base import (
    FINAL_STATUSES,
    AppendBatch,
    AppendConflict,
    SessionRecord,
    SessionStore,
    StoredEvent,
    StoreUnavailable,
)
from services.api.streaming.live import Attachments, LiveLog
from services.api.streaming.toolcalls import Call, ToolCallParser, call_id
from services.api.streaming.translate import (
    DONE,
    ChunkEncoder,
    choice_reason,
    error_payload,
    final_chunks,
    request_error,
    usage_dict,
)
from services.protocol.errors import ModelServiceError
from services.protocol.events import Delta, Finished
from services.protocol.logs import session_id_var

log = logging.getLogger("api.runner")

_RETRY_FIRST_SECONDS = 0.05
_RETRY_MAX_SECONDS = 1.0


class LeaseLost(Exception):
    """Another process owns the session now: stop without writing or cancelling anything."""


class HandOver(Exception):
    """The store stayed unavailable past STORE_RETRY_SECONDS: stop (the lease lapses) so that another
    runner, in this process or another, continues the session once the store answers again."""


class _Retry:
    """Back-off between attempts of one failing store write (50 ms doubling to 1 s, jittered), bounded by
    ``bound`` seconds from the first failure; past it, ``pause`` raises HandOver."""

    def __init__(self, session_id: str, bound: float) -> None:
        self._session_id = session_id
        self._bound = bound
        self._deadline: float | None = None
        self._delay = _RETRY_FIRST_SECONDS
        self.failures = 0

    async def pause(self, exc: Exception) -> None:
        now = time.monotonic()
        self.failures += 1
        if self._deadline is None:
            self._deadline = now + self._bound
            log.warning("session %s: store unavailable (%s); retrying the write", self._session_id, exc)
        if now >= self._deadline:
            log.error("session %s: store unavailable for %.1fs; handing over", self._session_id, self._bound)
            raise HandOver from exc
        await asyncio.sleep(min(self._delay * random.uniform(0.5, 1.0), self._deadline - now))
        self._delay = min(self._delay * 2, _RETRY_MAX_SECONDS)


@dataclass(slots=True)
class RunnerDeps:
    """What every runner of one process shares (owned by the ``SessionHub``): the session store, the model
    client, the metrics, the settings (EVENT_FLUSH_MS, RUNNER_LEASE_SECONDS, STORE_RETRY_SECONDS,
    CANCEL_AFTER_DISCONNECT_SECONDS), the process's reader ``Attachments`` (auto-cancel) and its runner id
    (the lease holder written to the store and named by every append: fencing)."""

    store: SessionStore
    model: GenerationBackend
    metrics: ApiMetrics
    settings: ApiSettings
    attachments: Attachments
    runner_id: str


@dataclass(slots=True)
class _Text:
    kind: str  # "reasoning" | "content"
    choice: int = 0  # the choice (index) the text belongs to
    parts: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None  # entries of the tokens folded in (logprobs requested)


@dataclass(slots=True)
class _Unwritten:
    """The runner's write buffer: the events of one or more flushes not yet stored, with the session
    fields they advance, plus its retry state. Grows while the store is unavailable (``extend``); each
    attempt sends it as one ``AppendBatch`` (``to_append``)."""

    events: list[StoredEvent]
    model_seq: int
    status: str | None
    finish_reason: str | None
    usage: dict[str, Any] | None
    final: bool
    uncertain: bool = False  # a write of it failed: a prefix may be stored after all
    rechecked: bool = False  # an append of it conflicted once; the store was checked since

    def extend(self, later: _Unwritten) -> None:
        """Append a later flush (what arrived while this one could not be written)."""
        self.events.extend(later.events)
        self.model_seq = later.model_seq
        if later.status is not None:
            self.status = later.status
        if later.final:
            self.finish_reason, self.usage, self.final = later.finish_reason, later.usage, True

    def to_append(self, runner_id: str, now: float) -> AppendBatch:
        """The store write of this buffer, fenced by ``runner_id``, ``now`` in seconds since the epoch."""
        return AppendBatch(
            events=self.events,
            model_seq=self.model_seq,
            now=now,
            status=self.status,
            finish_reason=self.finish_reason,
            usage=self.usage,
            runner_id=runner_id,
        )


@dataclass(slots=True)
class _Final:
    status: str
    finish_reason: str | None
    usage: dict[str, Any] | None


class SessionRunner:
    """Runs one session's generation in this process, independent of any client: reads the model stream
    (re-attaching at the stored model seq after a break or a takeover), coalesces deltas into chunks,
    stores them in one append per flush (every EVENT_FLUSH_MS; the first text and the final events at
    once), publishes each stored batch to its ``LiveLog``, holds and renews the lease (every lease/3
    seconds), and auto-cancels after CANCEL_AFTER_DISCONNECT_SECONDS without a reader. Owns the pending
    chunks, the unwritten batch (retried through store outages) and the model stream; ``run()`` is its
    whole life (the hub's task). Ends with the session final, ``handed_over`` (store down past
    STORE_RETRY_SECONDS), or quietly when another runner took the lease."""

    def __init__(
        self,
        deps: RunnerDeps,
        record: SessionRecord,
        live: LiveLog,
        stream: EventStream | None,
        started_at: float | None = None,
    ) -> None:
        self._d = deps
        self.session_id = record.id
        meta = record.meta
        self._include_usage = bool(meta.get("include_usage"))
        self._enc = ChunkEncoder(meta["chunk_id"], int(meta["created"]), meta["model"], self._include_usage)
        self.model_url = record.model_url or ""
        self.request_id = record.model_request_id or ""
        self._live = live
        self._stream = stream
        self._started_at = started_at  # monotonic arrival of the creating request (TTFT); None on takeover
        self._next_index = record.last_index + 1
        self._model_seq = record.model_seq  # last model seq folded into pending/stored chunks
        self._pending: list[str | _Text] = []
        # Tool calls: the parser may hold back text (an undecided tag, an open block). Chunks of deltas
        # folded while it holds something wait in ``_held``; stored batches name the last model seq whose
        # output is wholly in them (``_safe_seq``), so a takeover re-folds from a point with nothing held.
        self._tools: list[str] = meta.get("tools") or []
        self._max_calls = 1 if meta.get("parallel_tool_calls") is False else None  # one call at most
        self._n = int(meta.get("n") or 1)
        self._parsers: dict[int, ToolCallParser] = {}  # by choice, made on its first text
        self._held: list[str | _Text] = []
        self._safe_seq = record.model_seq
        self._calls: dict[int, int] = {}  # by choice: calls emitted so far (the next one's index)
        self._ended: set[int] = set()  # choices whose finish chunk is out (n > 1)
        self._recount = bool(self._tools or self._n > 1) and record.last_index > 0  # recounted on takeover
        self._batch: _Unwritten | None = None
        self._final: _Final | None = None
        self._mark_running = record.status == "queued"
        self._saw_text = record.last_index > 0
        self._text_flushed = self._saw_text
        self._flush_wanted = asyncio.Event()
        self._hurry = asyncio.Event()  # ends a batching wait early: the first text or the final events
        self._last_flush = 0.0
        self._since = time.monotonic()
        self.auto_cancelled = False
        self.handed_over = False  # stopped because the store stayed down (the hub retries a takeover)
        if self._next_index == 0:
            self._pending.extend(self._enc.role(i) for i in range(self._n))
            self._flush_wanted.set()

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def run(self) -> None:
        session_id_var.set(self.session_id)  # this task's own context: its log lines name the session
        final_status: str | None = None
        release = True
        try:
            if self._recount:
                await self._recount_stored()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._keep_lease())
                flusher = tg.create_task(self._flusher())
                await self._generate()
                await flusher
                raise _Done
        except* _Done:
            final_status = self._final.status if self._final else None
        except* LeaseLost:
            release = False  # the lease is someone else's now: leave it alone
            log.warning("session %s: lease lost, another process continues it", self.session_id)
        except* HandOver:
            release = False  # the store is down: the lease lapses by itself
            self.handed_over = True
        except* Exception:
            log.exception("session %s: runner failed", self.session_id)
            final_status = await self._fail_now()
        finally:
            self._live.close(final_status)
            if final_status is None and release:
                await self._release()

    async def _fail_now(self) -> str | None:
        """After an unexpected error: end the session as failed (best effort) so readers do not wait."""
        self._pending = []
        self._fail("internal error while streaming the generation", "internal_error")
        try:
            await self._flush()  # a batch left over from before the error, with the failure appended
        except Exception:
            log.exception("session %s: could not store the failure", self.session_id)
            return None
        return "failed"

    async def _release(self) -> None:
        """Hand the session over at once (shutdown) instead of after the lease lapses; only while the lease
        is still ours (compare-and-swap in the store): a successor's lease is never cleared."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self._d.store.release(self.session_id, self._d.runner_id))

    async def _generate(self) -> None:
        attempts = 0
        while self._final is None:
            stream = self._stream or await self._reattach()
            self._stream = None
            if stream is None:
                return
            try:
                await self._consume(stream)
            except StreamBroken as exc:
                attempts += 1
                self._d.metrics.model_errors.labels("stream_broken").inc()
                log.warning("session %s: %s (attempt %d)", self.session_id, exc, attempts)
                if attempts >= 2:
                    self._fail("the model stream broke before the generation finished", "model_stream_broken")
            finally:
                await stream.aclose()

    async def _reattach(self) -> EventStream | None:
        try:
            return await self._d.model.events(self.model_url, self.request_id, self._model_seq)
        except ModelServiceError as exc:
            self._d.metrics.model_error(exc)
            log.warning("session %s: re-attach failed: %s", self.session_id, exc.code)
            self._fail("the generation was lost by the model service", "generation_lost")
            return None

    async def _consume(self, stream: EventStream) -> None:
        async for event in stream.events():
            if isinstance(event, Delta):
                self._fold(event)
            else:
                self._finish(event)
                return

    # ---- folding model events into pending chunks -----------------------------------------------------

    def _fold(self, delta: Delta) -> None:
        if delta.seq <= self._model_seq:
            return  # already folded (a re-attach may repeat the boundary event)
        self._model_seq = delta.seq
        self._mark_text_started()
        lp = delta.logprobs
        reasoning_lp = [e.model_dump() for e in lp.reasoning] if lp else None
        content_lp = [e.model_dump() for e in lp.content] if lp else None
        c = delta.index
        if not self._tools:
            _add_text(self._pending, "reasoning", delta.reasoning, reasoning_lp, c)
            _add_text(self._pending, "content", delta.content, content_lp, c)
            if delta.finish_reason is not None:
                self._end_choice(self._pending, c, delta.finish_reason)
            self._safe_seq = delta.seq
        else:
            parser = self._parser(c)
            _add_text(self._held, "reasoning", delta.reasoning, reasoning_lp, c)
            self._add_answer(c, parser.feed(delta.content) if delta.content else [])
            _add_text(self._held, "content", "", content_lp, c)  # after the answer's text
            if delta.finish_reason is not None:
                self._add_answer(c, parser.finish())
                self._end_choice(self._held, c, delta.finish_reason)
            if all(p.clean for p in self._parsers.values()):
                self._release_held(delta.seq)
        self._flush_wanted.set()

    def _parser(self, choice: int) -> ToolCallParser:
        parser = self._parsers.get(choice)
        if parser is None:
            parser = self._parsers[choice] = ToolCallParser(self._tools, max_calls=self._max_calls)
            parser.calls = self._calls.get(choice, 0)
        return parser

    def _end_choice(self, items: list[str | _Text], choice: int, reason: str) -> None:
        """A choice's own end (n > 1): its finish chunk; an error has none (the request's error event
        follows with ``Finished``)."""
        if reason == "error" or choice in self._ended:
            return
        self._ended.add(choice)
        items.append(self._enc.finish(choice_reason(reason, self._calls.get(choice, 0) > 0), choice))

    def _add_answer(self, choice: int, items: list[str | Call]) -> None:
        for item in items:
            if isinstance(item, str):
                _add_text(self._held, "content", item, None, choice)
                continue
            index = self._calls.get(choice, 0)
            self._calls[choice] = index + 1
            # choice 0 keeps the ids an n = 1 session has; other choices derive theirs from their index
            base = self._enc.chunk_id if choice == 0 else f"{self._enc.chunk_id}:{choice}"
            start = self._enc.tool_call_start(index, call_id(base, index), item.name, choice)
            self._held.extend([start, self._enc.tool_call_arguments(index, item.arguments, choice)])

    def _release_held(self, seq: int) -> None:
        for item in self._held:
            if isinstance(item, _Text):
                _add_text(self._pending, item.kind, "".join(item.parts), item.logprobs, item.choice)
            else:
                self._pending.append(item)
        self._held = []
        self._safe_seq = seq

    async def _recount_stored(self) -> None:
        """After a takeover: from the stored chunks, each choice's calls (its next call's index) and the
        choices whose finish chunk is stored already."""
        after = -1
        while page := await self._d.store.read(self.session_id, after):
            for stored in page:
                self._recount_chunk(stored.data)
            after = page[-1].index
        for choice, parser in self._parsers.items():
            parser.calls = self._calls.get(choice, 0)

    def _recount_chunk(self, data: str) -> None:
        if not data.startswith("{"):
            return  # [DONE]
        for choice in json.loads(data).get("choices") or ():
            c = int(choice.get("index", 0))
            started = [f for f in (choice.get("delta") or {}).get("tool_calls") or () if f.get("id")]
            if started:
                self._calls[c] = self._calls.get(c, 0) + len(started)
            if choice.get("finish_reason") and self._n > 1:
                self._ended.add(c)

    def _mark_text_started(self) -> None:
        if self._saw_text:
            return
        if self._started_at is not None:
            self._d.metrics.ttft.observe(time.monotonic() - self._started_at)
        self._saw_text = True
        self._hurry.set()

    def _finish(self, finished: Finished) -> None:
        self._model_seq = max(self._model_seq, finished.seq)
        if self._tools:
            for choice in range(self._n):
                if choice not in self._ended:
                    self._add_answer(choice, self._parser(choice).finish())
            self._release_held(self._model_seq)
        self._safe_seq = self._model_seq
        if finished.finish_reason == "error" and request_error(finished) is None:
            self._d.metrics.model_errors.labels("generation_error").inc()
        called = {c: self._calls.get(c, 0) > 0 for c in range(self._n) if c not in self._ended}
        open_choices = called if self._n > 1 else None
        args = (self._enc, finished, self._include_usage, called.get(0, False), open_choices)
        chunks, status, reason = final_chunks(*args)
        self._pending.extend(chunks)
        self._final = _Final(status, reason, usage_dict(finished))
        self._hurry.set()
        self._flush_wanted.set()

    def _fail(self, message: str, code: str) -> None:
        self._pending.extend([error_payload(message, type_="server_error", code=code), DONE])
        self._final = _Final("failed", None, None)
        self._hurry.set()
        self._flush_wanted.set()

    # ---- batching writes ------------------------------------------------------------------------------

    async def _flusher(self) -> None:
        interval = self._d.settings.event_flush_ms / 1000.0
        while True:
            await self._flush_wanted.wait()
            delay = self._last_flush + interval - time.monotonic()
            if delay > 0 and not self._urgent():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), delay)
            self._hurry.clear()
            self._flush_wanted.clear()
            self._last_flush = time.monotonic()
            await self._flush()
            if self._final is not None and not self._pending:
                return
            if self._pending:
                self._flush_wanted.set()  # arrived during the write: never wait for another signal

    def _urgent(self) -> bool:
        """The first text (time to first token) and the final events go out at once; everything else waits
        for the batching interval."""
        return self._final is not None or (self._saw_text and not self._text_flushed)

    async def _flush(self) -> None:
        """Store everything pending (one batch), retrying with back-off while the store is unavailable;
        each retry includes what arrived meanwhile. An append that conflicts is settled once (what the store
        holds is compared with the batch) and retried. Raises LeaseLost (another runner holds the session)
        or HandOver (the store stayed down past STORE_RETRY_SECONDS)."""
        retry = _Retry(self.session_id, self._d.settings.store_retry_seconds)
        self._merge_pending()
        while (batch := self._batch) is not None:
            try:
                if batch.uncertain:
                    await self._settle(batch)
                if batch.events or batch.final:
                    await self._append(batch)
            except StoreUnavailable as exc:
                batch.uncertain = True
                await retry.pause(exc)
                self._merge_pending()
                continue
            except AppendConflict as exc:
                # A write abandoned at its deadline may commit late (a stalled database that resumes):
                # look once at what is stored before concluding that another runner holds the session.
                if batch.rechecked:
                    raise LeaseLost from exc
                batch.uncertain = batch.rechecked = True
                continue
            self._batch = None
        if retry.failures:
            log.info("session %s: store writes resumed after %d failures", self.session_id, retry.failures)

    def _merge_pending(self) -> None:
        """Fold the pending chunks into the unwritten batch (a new one when none is waiting)."""
        later = self._take_batch()
        if later is not None:
            if self._batch is None:
                self._batch = later
            else:
                self._batch.extend(later)

    async def _append(self, batch: _Unwritten) -> None:
        await self._d.store.append(self.session_id, batch.to_append(self._d.runner_id, time.time()))
        self._live.publish(batch.events)
        batch.events = []
        batch.final = False  # written: the loop's next look finds nothing left

    async def _settle(self, batch: _Unwritten) -> None:
        """After a failed write: re-claim the lease (nobody may take over between the outage and our next
        write), then drop from ``batch`` the prefix that the failed attempt stored after all (the commit
        happened, its answer was lost). Raises LeaseLost when the session is someone else's now."""
        s = self._d.settings
        await self._d.store.claim(self.session_id, self._d.runner_id, s.runner_lease_seconds, time.time())
        record = await self._d.store.get(self.session_id)
        if record is None or record.runner_id != self._d.runner_id:
            raise LeaseLost
        first = batch.events[0].index if batch.events else self._next_index
        stored = record.last_index - (first - 1)
        if stored < 0 or stored > len(batch.events):
            raise LeaseLost
        if stored:
            found = await self._d.store.read(self.session_id, first - 1, stored)
            if [e.data for e in found] != [e.data for e in batch.events[:stored]]:
                raise LeaseLost
            self._live.publish(batch.events[:stored])
            del batch.events[:stored]
            if not batch.events and record.status in FINAL_STATUSES:
                batch.final = False  # the final batch itself was stored
        batch.uncertain = False

    def _take_batch(self) -> _Unwritten | None:
        """The pending chunks as a new batch (indexes from ``_next_index``); None when nothing is pending."""
        if not self._pending:
            return None
        datas = [self._encode(p) for p in self._pending]
        self._pending = []
        self._text_flushed = self._text_flushed or self._saw_text
        events = [StoredEvent(self._next_index + i, d) for i, d in enumerate(datas)]
        self._next_index += len(events)
        final = self._final if datas[-1] == DONE else None
        status = final.status if final else ("running" if self._mark_running and self._saw_text else None)
        if status == "running":
            self._mark_running = False
        return _Unwritten(
            events=events,
            model_seq=self._safe_seq,
            status=status,
            finish_reason=final.finish_reason if final else None,
            usage=final.usage if final else None,
            final=final is not None,
        )

    def _encode(self, pending: str | _Text) -> str:
        if isinstance(pending, str):
            return pending
        text = "".join(pending.parts)
        if pending.kind == "reasoning":
            return self._enc.reasoning(text, pending.logprobs, pending.choice)
        return self._enc.content(text, pending.logprobs, pending.choice)

    # ---- lease and auto-cancel ------------------------------------------------------------------------

    async def _keep_lease(self) -> None:
        s = self._d.settings
        tick = min(s.runner_lease_seconds / 3.0, 1.0)
        last_renew = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            if time.monotonic() - last_renew >= s.runner_lease_seconds / 3.0:
                await self._renew()
                last_renew = time.monotonic()
            await self._maybe_auto_cancel()

    async def _renew(self) -> None:
        s = self._d.settings
        try:
            ok = await self._d.store.claim(
                self.session_id, self._d.runner_id, s.runner_lease_seconds, time.time()
            )
        except StoreUnavailable:
            return  # keep going; the flusher retries, and nobody else can claim while the store is down
        if not ok and self._final is None:
            raise LeaseLost

    async def _maybe_auto_cancel(self) -> None:
        after = self._d.settings.cancel_after_disconnect_seconds
        if after <= 0 or self.auto_cancelled or self._final is not None:
            return
        if self._d.attachments.idle_for(self.session_id, self._since) < after:
            return
        try:
            record = await self._d.store.get(self.session_id)
        except StoreUnavailable:
            return
        if record is None or time.time() - record.reader_seen_at < after:
            return
        log.info("session %s: no client for %.0fs, cancelling", self.session_id, after)
        self.auto_cancelled = True
        self._d.metrics.cancels.labels("auto").inc()
        await self.cancel()

    async def cancel(self) -> None:
        """Ask the owning replica to stop; the Finished(cancelled) event then ends the stream here."""
        try:
            await self._d.model.cancel(self.model_url, self.request_id)
        except ModelServiceError as exc:
            self._d.metrics.model_error(exc)
            log.warning("session %s: cancel failed: %s", self.session_id, exc.code)

    @property
    def finished(self) -> bool:
        return self._final is not None


def _add_text(
    items: list[str | _Text],
    kind: str,
    text: str,
    logprobs: list[dict[str, Any]] | None = None,
    choice: int = 0,
) -> None:
    """Append ``text`` of ``kind`` of ``choice`` (and the logprob entries of its tokens) to ``items``,
    merged into that choice's last item when it is text of that kind and only other choices' text follows
    it (their order against this choice's does not matter). Entries without text (a token that released
    none, such as the end of sequence) still make an item: they are never dropped."""
    if not text and not logprobs:
        return
    last: _Text | None = None
    for item in reversed(items):
        if not isinstance(item, _Text):
            break  # a tool-call or finish chunk: nothing merges across it
        if item.choice == choice:
            last = item if item.kind == kind else None
            break
    if last is None:
        last = _Text(kind, choice)
        items.append(last)
    if text:
        last.parts.append(text)
    if logprobs:
        last.logprobs = (last.logprobs or []) + logprobs


class _Done(Exception):
    """Internal: the generation ended and its final events are stored."""
