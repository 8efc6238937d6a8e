"""The runner: one background task per running session, independent of any client connection.

It reads the model stream, folds the text into pending chunks (consecutive text of one kind merges into a
single chunk until the next flush: that is the coalescing, bounded by EVENT_FLUSH_MS), and a flusher writes
the pending chunks to the store in one ``append`` per interval together with the model seq they cover.
Only after a batch is stored does it become visible (``LiveLog.publish``), so a process that dies can never
have shown a client an event that its successor, re-attaching at the stored model seq, would produce
differently. The runner holds the session's lease and renews it; it also performs auto-cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from services.api.logs import session_id_var
from services.api.metrics import ApiMetrics
from services.api.model_client import EventStream, GenerationBackend, StreamBroken
from services.api.settings import ApiSettings
from services.api.store.base import AppendConflict, SessionRecord, SessionStore, StoredEvent, StoreUnavailable
from services.api.streaming.live import Attachments, LiveLog
from services.api.streaming.translate import DONE, ChunkEncoder, error_payload, final_chunks, usage_dict
from services.protocol.errors import ModelServiceError
from services.protocol.events import Delta, Finished

log = logging.getLogger("api.runner")

_FINAL_WRITE_GIVE_UP_SECONDS = 120.0


class LeaseLost(Exception):
    """Another process owns the session now: stop without writing or cancelling anything."""


@dataclass(slots=True)
class RunnerDeps:
    store: SessionStore
    model: GenerationBackend
    metrics: ApiMetrics
    settings: ApiSettings
    attachments: Attachments
    runner_id: str


@dataclass(slots=True)
class _Text:
    kind: str  # "reasoning" | "content"
    parts: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Batch:
    events: list[StoredEvent]
    model_seq: int
    status: str | None
    finish_reason: str | None
    usage: dict[str, int] | None
    final: bool


@dataclass(slots=True)
class _Final:
    status: str
    finish_reason: str | None
    usage: dict[str, int] | None


class SessionRunner:
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
        self._batch: _Batch | None = None
        self._final: _Final | None = None
        self._mark_running = record.status == "queued"
        self._saw_text = record.last_index > 0
        self._text_flushed = self._saw_text
        self._flush_wanted = asyncio.Event()
        self._hurry = asyncio.Event()  # ends a batching wait early: the first text or the final events
        self._last_flush = 0.0
        self._since = time.monotonic()
        self.auto_cancelled = False
        if self._next_index == 0:
            self._pending.append(self._enc.role())
            self._flush_wanted.set()

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def run(self) -> None:
        session_id_var.set(self.session_id)  # this task's own context: its log lines name the session
        final_status: str | None = None
        release = True
        try:
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
            for _ in range(2):  # a batch left over from before the error, then the failure itself
                if not await self._flush():
                    return None
        except Exception:
            log.exception("session %s: could not store the failure", self.session_id)
            return None
        return "failed"

    async def _release(self) -> None:
        """Hand the session over at once (shutdown, store down) instead of after the lease lapses."""
        with contextlib.suppress(Exception):
            await asyncio.shield(
                self._d.store.update(self.session_id, now=time.time(), runner_id=None, lease_until=0.0)
            )

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
            self._d.metrics.model_errors.labels(exc.code).inc()
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
        for kind, text in (("reasoning", delta.reasoning), ("content", delta.content)):
            if not text:
                continue
            last = self._pending[-1] if self._pending else None
            if isinstance(last, _Text) and last.kind == kind:
                last.parts.append(text)
            else:
                self._pending.append(_Text(kind, [text]))
        self._flush_wanted.set()

    def _mark_text_started(self) -> None:
        if self._saw_text:
            return
        if self._started_at is not None:
            self._d.metrics.ttft.observe(time.monotonic() - self._started_at)
        self._saw_text = True
        self._hurry.set()

    def _finish(self, finished: Finished) -> None:
        self._model_seq = max(self._model_seq, finished.seq)
        if finished.finish_reason == "error":
            self._d.metrics.model_errors.labels("generation_error").inc()
        chunks, status, reason = final_chunks(self._enc, finished, self._include_usage)
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
        give_up_at: float | None = None
        while True:
            await self._flush_wanted.wait()
            delay = self._last_flush + interval - time.monotonic()
            if delay > 0 and not self._urgent():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), delay)
            self._hurry.clear()
            self._flush_wanted.clear()
            self._last_flush = time.monotonic()
            if await self._flush():
                if self._batch is None and self._final is not None and not self._pending:
                    return
                continue
            give_up_at = give_up_at or time.monotonic() + _FINAL_WRITE_GIVE_UP_SECONDS
            if self._final is not None and time.monotonic() > give_up_at:
                log.error("session %s: store unavailable, giving up on the final events", self.session_id)
                return
            await asyncio.sleep(0.5)
            self._flush_wanted.set()

    def _urgent(self) -> bool:
        """The first text (time to first token) and the final events go out at once; everything else waits
        for the batching interval."""
        return self._final is not None or (self._saw_text and not self._text_flushed)

    async def _flush(self) -> bool:
        """Write the pending chunks as one batch; False when the store is unavailable (kept for retry)."""
        if self._batch is None:
            self._batch = self._take_batch()
        batch = self._batch
        if batch is None:
            return True
        try:
            await self._d.store.append(
                self.session_id,
                batch.events,
                model_seq=batch.model_seq,
                status=batch.status,
                finish_reason=batch.finish_reason,
                usage=batch.usage,
                now=time.time(),
            )
        except StoreUnavailable:
            log.warning("session %s: store unavailable, will retry the flush", self.session_id)
            return False
        except AppendConflict as exc:
            raise LeaseLost from exc
        self._batch = None
        self._live.publish(batch.events)
        return True

    def _take_batch(self) -> _Batch | None:
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
        return _Batch(
            events=events,
            model_seq=self._model_seq,
            status=status,
            finish_reason=final.finish_reason if final else None,
            usage=final.usage if final else None,
            final=final is not None,
        )

    def _encode(self, pending: str | _Text) -> str:
        if isinstance(pending, str):
            return pending
        text = "".join(pending.parts)
        return self._enc.reasoning(text) if pending.kind == "reasoning" else self._enc.content(text)

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
            self._d.metrics.model_errors.labels(exc.code).inc()
            log.warning("session %s: cancel failed: %s", self.session_id, exc.code)

    @property
    def finished(self) -> bool:
        return self._final is not None


class _Done(Exception):
    """Internal: the generation ended and its final events are stored."""
