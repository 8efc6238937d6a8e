"""The session hub: creates sessions, runs their runners in this process, takes over orphaned ones,
cancels, and sweeps expired sessions. One per process, built in the lifespan (``app.state.hub``).

Takeover: a session is taken over when its runner's lease lapsed, at once when its runner was a process of
this host that is gone (``owner.owner_is_dead``: a killed worker, a crashed api), and when a runner of this
process handed it over because the store was down (retried here with back-off until the store answers).
Readers trigger takeovers; for sessions no reader comes back to (the process that ran or handed them over
died), the orphan sweep adopts them: every ``ORPHAN_SWEEP_SECONDS`` each process claims up to
``ORPHAN_SWEEP_LIMIT`` unfinished sessions whose lease lapsed more than that long ago and runs them (re-attach
at the stored model seq, then complete, or fail visibly with ``generation_lost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from services.api.errors import InternalError, error_json, session_not_found, to_api_error
from services.api.metrics import ApiMetrics
from services.api.model_client import EventStream, ModelClient
from services.api.settings import ApiSettings
from services.api.store.base import (
    FINAL_STATUSES,
    AppendBatch,
    SessionExists,
    SessionRecord,
    SessionStore,
    StoredEvent,
    StoreUnavailable,
)
from services.api.streaming.live import Attachments, LiveLog
from services.api.streaming.owner import new_runner_id, owner_is_dead
from services.api.streaming.runner import RunnerDeps, SessionRunner
from services.api.streaming.translate import DONE
from services.protocol.errors import ModelServiceError
from services.protocol.generate import GenerateRequest, Message, SamplingParams

log = logging.getLogger("api.hub")

# A reader elsewhere counts while its last mark is younger than two heartbeats plus this (store latency, a
# slow client holding the reader's loop, clock differences between hosts).
READER_GRACE_SECONDS = 2.0
MAX_READER_HEARTBEAT_SECONDS = 5.0


def reader_heartbeat_seconds(cancel_after: float) -> float:
    """How often a reader in another process marks itself present (``SessionHub.heartbeat``), in seconds:
    a quarter of ``CANCEL_AFTER_DISCONNECT_SECONDS`` within [0.2, 5], and 5 with auto-cancel off (the
    non-streaming cancel still needs to know who reads)."""
    if cancel_after <= 0:
        return MAX_READER_HEARTBEAT_SECONDS
    return min(max(cancel_after / 4.0, 0.2), MAX_READER_HEARTBEAT_SECONDS)


@dataclass(slots=True)
class NewSession:
    """What the chat route hands over to start a generation."""

    session_id: str
    owner: str
    messages: list[Message]
    sampling: SamplingParams
    include_usage: bool
    stream: bool
    started_at: float  # monotonic arrival of the request (TTFT)
    structure: dict[str, Any] = field(default_factory=dict)  # GenerateRequest tools/response_format fields
    tool_names: list[str] = field(default_factory=list)  # tools the answer may call (parsed by the runner)
    parallel_tool_calls: bool = True  # False: the answer makes one call at most


@dataclass(slots=True)
class _Running:
    runner: SessionRunner
    live: LiveLog
    task: asyncio.Task[None]


class SessionHub:
    """This process's sessions: creates them (reserving the id in the store), runs one ``SessionRunner`` task
    per session it runs, takes sessions over (readers, store hand-over, orphan sweep), cancels, and deletes
    expired ones. Owns the runner tasks, their ``LiveLog``s, the ``Attachments`` of local readers, this
    process's runner id, and two background loops (expiry every ``SESSIONS_TTL_SECONDS``/4, clamped to
    1..300 s; orphan adoption every ``ORPHAN_SWEEP_SECONDS``). Built in the lifespan; ``start()`` then
    ``close()`` (which stops runners without cancelling their generations)."""

    def __init__(
        self, settings: ApiSettings, store: SessionStore, model: ModelClient, metrics: ApiMetrics
    ) -> None:
        self.settings = settings
        self.store = store
        self.model = model
        self.metrics = metrics
        self.runner_id = new_runner_id()
        self.attachments = Attachments()
        self._deps = RunnerDeps(store, model, metrics, settings, self.attachments, self.runner_id)
        self._running: dict[str, _Running] = {}
        self._opening: set[str] = set()  # reserved here, generation still opening (no runner yet)
        self._background: set[asyncio.Task[None]] = set()  # takeover retries, reservation drops
        self._closing = False
        self._sweepers: list[asyncio.Task[None]] = []

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._sweepers = [
            asyncio.create_task(self._sweep_forever(), name="session-expiry"),
            asyncio.create_task(self._adopt_forever(), name="session-orphans"),
        ]

    async def close(self) -> None:
        """Stop local runners without cancelling their generations: each releases its lease, so the next
        reader anywhere re-attaches at once."""
        self._closing = True
        tasks = [r.task for r in self._running.values()] + list(self._background) + self._sweepers
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- lookup ---------------------------------------------------------------------------------------

    def live(self, session_id: str) -> LiveLog | None:
        running = self._running.get(session_id)
        return running.live if running else None

    def runs_locally(self, session_id: str) -> bool:
        running = self._running.get(session_id)
        return running is not None and not running.live.closed

    async def find(self, session_id: str, owner: str) -> SessionRecord | None:
        """The caller's session, None when there is none; another key's session raises 404."""
        record = await self.store.get(session_id)
        if record is None or self._expired(record):
            return None
        if record.owner != owner:
            raise session_not_found(session_id)
        return record

    async def get_owned(self, session_id: str, owner: str) -> SessionRecord:
        record = await self.find(session_id, owner)
        if record is None:
            raise session_not_found(session_id)
        return record

    def _expired(self, record: SessionRecord) -> bool:
        ttl = self.settings.sessions_ttl_seconds
        return record.status in FINAL_STATUSES and record.updated < time.time() - ttl

    # ---- creation and takeover ------------------------------------------------------------------------

    async def create(self, new: NewSession) -> SessionRecord | None:
        """Reserve the session id, then start the generation on the least busy replica. None when the id is
        taken (by a concurrent request in any process): the caller attaches to that session and no second
        generation starts. Model errors (400/429/503) end the reservation at once and leave the id free."""
        url, model_name = await self.model.pick()
        request_id = f"{new.session_id}.{uuid.uuid4().hex[:12]}"
        record = _new_record(new, url, request_id, model_name, self.runner_id, self.settings)
        try:
            await self._insert(record)
        except SessionExists:
            return None
        request = GenerateRequest(
            request_id=request_id, messages=new.messages, sampling=new.sampling, **new.structure
        )
        self._opening.add(record.id)
        try:
            stream = await self._open_holding_lease(url, request, record.id)
        except BaseException as exc:
            if isinstance(exc, ModelServiceError):
                self.metrics.model_error(exc)
            await self._drop_reservation(record.id, exc)
            raise
        finally:
            self._opening.discard(record.id)
        self._start(record, stream, new.started_at)
        return record

    async def _open_holding_lease(self, url: str, request: GenerateRequest, session_id: str) -> EventStream:
        """Open the model stream, renewing the reservation's lease meanwhile (a request with big media takes
        a while to be accepted): no reader may take over a session whose generation is still opening."""
        opening = asyncio.ensure_future(self.model.generate(url, request))
        lease = self.settings.runner_lease_seconds
        try:
            while not (await asyncio.wait({opening}, timeout=lease / 3))[0]:
                with contextlib.suppress(StoreUnavailable):
                    await self.store.claim(session_id, self.runner_id, lease, time.time())
            return opening.result()
        finally:
            opening.cancel()  # a no-op once done; stops the request when we are cancelled

    async def _drop_reservation(self, session_id: str, exc: BaseException) -> None:
        """The generation could not start: readers that attached meanwhile get the error and ``[DONE]``, and
        the session is stored as long expired, so a retry with the same id starts afresh at once."""
        error = to_api_error(exc, self.settings.retry_after_seconds)
        payload = error_json(error or InternalError("the generation could not be started"))
        events = [StoredEvent(0, payload), StoredEvent(1, DONE)]
        batch = AppendBatch(events, model_seq=-1, now=0.0, status="failed")

        async def write() -> None:
            await self.store.append(session_id, batch)

        try:
            await asyncio.shield(write())
        except StoreUnavailable:
            self._in_background(self._retry_write(session_id, "the failed reservation", write))
        except Exception:
            log.exception("session %s: could not store the failed reservation", session_id)

    async def _retry_write(self, session_id: str, what: str, write: Callable[[], Awaitable[None]]) -> None:
        """Retry a write with back-off (0.1 s doubling to 2 s) while the store is unavailable, for at most
        STORE_RETRY_SECONDS; log an error when it never succeeded."""
        deadline = time.monotonic() + self.settings.store_retry_seconds
        delay = 0.1
        while time.monotonic() < deadline:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 2.0)
            try:
                await write()
                return
            except StoreUnavailable:
                continue
        log.error("session %s: store unavailable; could not store %s", session_id, what)

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _insert(self, record: SessionRecord) -> None:
        """Create the session; an id whose previous session expired (but was not swept yet) is reusable."""
        try:
            await self.store.create(record)
        except SessionExists:
            existing = await self.store.get(record.id)
            if existing is None or not self._expired(existing):
                raise
            await self.store.delete_expired(time.time(), self.settings.sessions_ttl_seconds)
            await self.store.create(record)

    def _start(self, record: SessionRecord, stream: EventStream | None, started_at: float | None) -> None:
        live = LiveLog(record.id, record.last_index + 1)
        runner = SessionRunner(self._deps, record, live, stream, started_at)
        task = asyncio.create_task(runner.run(), name=f"runner:{record.id}")
        entry = _Running(runner, live, task)
        self._running[record.id] = entry
        task.add_done_callback(lambda _t: self._forget(record.id, entry))

    def _forget(self, session_id: str, entry: _Running) -> None:
        if self._running.get(session_id) is entry:
            del self._running[session_id]
        self.attachments.forget(session_id)
        if entry.runner.handed_over and not self._closing:
            self._in_background(self._recover(session_id))

    async def _recover(self, session_id: str) -> None:
        """A runner here stopped because the store stayed down: take the session over again (here, or
        leave it to whoever holds it now) as soon as the store answers. Back-off 0.5 s doubling to 5 s."""
        delay = 0.5
        while not self._closing:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 5.0)
            try:
                record = await self.store.get(session_id)
                if record is not None:
                    await self.ensure_runner(record)
            except StoreUnavailable:
                continue
            return

    async def ensure_runner(self, record: SessionRecord) -> None:
        """Run the session here when nobody does: its lease lapsed, its runner's process (on this host) is
        gone, or it is this process's own session that no local runner serves (handed over after a store
        outage). Re-attaches to its model replica at the stored model seq. Raises StoreUnavailable."""
        if self._closing or self.runs_locally(record.id) or record.status in FINAL_STATUSES:
            return
        now = time.time()
        dead: str | None = None
        if record.runner_id is not None and record.lease_until >= now:
            if record.runner_id == self.runner_id:
                if record.id in self._opening:
                    return  # reserved here, the generation is still opening
            elif owner_is_dead(record.runner_id):
                dead = record.runner_id
            else:
                return
        lease = self.settings.runner_lease_seconds
        if not await self.store.claim(record.id, self.runner_id, lease, now, takeover_from=dead):
            return
        if self.runs_locally(record.id) or record.id in self._opening:
            return  # started here meanwhile
        fresh = await self.store.get(record.id)  # the old runner may have stored more before it died
        if fresh is None or fresh.status in FINAL_STATUSES or self.runs_locally(record.id):
            return
        log.info(
            "session %s: taking over at index %d (model seq %d) from %s",
            fresh.id,
            fresh.last_index + 1,
            fresh.model_seq,
            "a dead process" if dead else "a lapsed lease",
        )
        self._start(fresh, None, None)

    # ---- cancel ---------------------------------------------------------------------------------------

    async def cancel(self, record: SessionRecord, kind: str, *, wait: bool = True) -> str:
        """Cancel on the owning replica and (unless ``wait`` is false) wait, bounded, for the session's
        final status."""
        record = await self._opened(record)
        if record.status in FINAL_STATUSES:
            return record.status
        await self.ensure_runner(record)  # someone must be there to write the cancelled chunk
        running = self._running.get(record.id)
        if running is not None:
            await running.runner.cancel()
        elif record.model_url and record.model_request_id:
            try:
                await self.model.cancel(record.model_url, record.model_request_id)
            except ModelServiceError as exc:
                self.metrics.model_error(exc)
        self.metrics.cancels.labels(kind).inc()
        return await self._await_final(record.id) if wait else record.status

    async def _opened(self, record: SessionRecord) -> SessionRecord:
        """A reserved session whose generation is still opening has no event yet: wait (bounded) until its
        runner stored the first one, so that the cancel reaches a generation the model service knows."""
        deadline = time.monotonic() + self.settings.cancel_wait_seconds
        while record.last_index < 0 and record.status not in FINAL_STATUSES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self.store.wait(record.id, -1, min(remaining, 0.5))
            record = await self.store.get(record.id) or record
        return record

    async def _await_final(self, session_id: str) -> str:
        deadline = time.monotonic() + self.settings.cancel_wait_seconds
        while True:
            record = await self.store.get(session_id)
            if record is None:
                return "cancelled"
            remaining = deadline - time.monotonic()
            if record.status in FINAL_STATUSES or remaining <= 0:
                return record.status
            live = self.live(session_id)
            if live is not None and not live.closed:
                await live.wait(live.next_index, min(remaining, 0.5))
            else:
                await self.store.wait(session_id, record.last_index, min(remaining, 0.5))

    async def read_elsewhere(self, session_id: str) -> bool:
        """Someone else reads the session: a client of this process follows it, or one of another process
        marked itself present (``heartbeat``; ``reader_seen_at`` differs from ``created`` once one did)
        recently: within two beats and ``READER_GRACE_SECONDS`` (a mark written on another host's clock). A
        store outage counts as someone (cancelling on a guess could stop another client's generation;
        auto-cancel still applies)."""
        if self.attachments.count(session_id):
            return True
        try:
            record = await self.store.get(session_id)
        except StoreUnavailable:
            return True
        if record is None or record.reader_seen_at == record.created:
            return False
        beat = reader_heartbeat_seconds(self.settings.cancel_after_disconnect_seconds)
        return time.time() - record.reader_seen_at < 2 * beat + READER_GRACE_SECONDS

    async def heartbeat(self, session_id: str) -> None:
        """A client is attached here to a session run elsewhere (auto-cancel across processes)."""
        with contextlib.suppress(StoreUnavailable):
            now = time.time()
            await self.store.update(session_id, now=now, reader_seen_at=now)

    # ---- TTL ------------------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        ttl = self.settings.sessions_ttl_seconds
        interval = min(max(ttl / 4.0, 1.0), 300.0)
        while True:
            await asyncio.sleep(interval)
            try:
                deleted = await self.store.delete_expired(time.time(), ttl)
            except StoreUnavailable:
                continue
            if deleted:
                log.info("deleted %d expired sessions", deleted)

    async def _adopt_forever(self) -> None:
        every = self.settings.orphan_sweep_seconds
        while True:
            await asyncio.sleep(every * random.uniform(0.75, 1.0))  # jitter: replicas do not sweep in step
            try:
                await self.adopt_orphans()
            except StoreUnavailable:
                continue
            except Exception:  # never die: the next sweep retries
                log.exception("orphan sweep failed")

    async def adopt_orphans(self) -> int:
        """Claim and run here the unfinished sessions whose lease lapsed more than ``ORPHAN_SWEEP_SECONDS``
        ago (at most ``ORPHAN_SWEEP_LIMIT``): their process died or handed them over and no reader came
        back. Each re-attaches to its model replica at the stored model seq, then completes, or ends with a
        visible ``generation_lost`` error. Returns how many were adopted. Raises StoreUnavailable."""
        s = self.settings
        now = time.time()
        records = await self.store.orphans(now - s.orphan_sweep_seconds, s.orphan_sweep_limit)
        adopted = 0
        for record in records:
            if self._closing:
                break
            if self.runs_locally(record.id) or record.id in self._opening:
                continue
            await self.ensure_runner(record)
            adopted += self.runs_locally(record.id)
        if adopted:
            log.info("adopted %d orphaned sessions", adopted)
        return adopted


def _new_record(
    new: NewSession, url: str, request_id: str, model: str, runner_id: str, settings: ApiSettings
) -> SessionRecord:
    now = time.time()
    meta = {
        "chunk_id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(now),
        "model": model,
        "include_usage": new.include_usage,
        "stream": new.stream,
    }
    if new.sampling.n > 1:
        meta["n"] = new.sampling.n  # the runner's role and finish chunks per choice
    if new.tool_names:
        meta["tools"] = new.tool_names
        if not new.parallel_tool_calls:
            meta["parallel_tool_calls"] = False
    return SessionRecord(
        id=new.session_id,
        owner=new.owner,
        status="queued",
        created=now,
        updated=now,
        model_url=url,
        model_request_id=request_id,
        runner_id=runner_id,
        lease_until=now + settings.runner_lease_seconds,
        reader_seen_at=now,
        meta=meta,
    )
