"""The SessionStore protocol: sessions and their SSE events, durable across processes.

Implementations: ``sqlite.py`` (default, ``SESSIONS_DB_PATH``), ``postgres.py`` (``DATABASE_URL``, psycopg 3
pool, LISTEN/NOTIFY), ``memory.py`` (``PERSIST_SESSIONS=0``). One contract test suite runs against all three.

Events are the exact SSE ``data:`` payloads (already-encoded JSON strings), written in index order with no
gaps. The runner batches appends (one call per flush, many events, one ``AppendBatch``), so a chunk is never
one round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

FINAL_STATUSES = frozenset({"completed", "cancelled", "failed"})
STATUSES = frozenset({"queued", "running"}) | FINAL_STATUSES


@dataclass(slots=True)
class SessionRecord:
    id: str
    owner: str  # sha256 hex of the creating API key ("" when the service is open)
    status: str = "queued"
    created: float = 0.0
    updated: float = 0.0
    last_index: int = -1  # index of the last stored event; -1 when none
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model_url: str | None = None  # the model replica that runs this session's generation
    model_request_id: str | None = None
    model_seq: int = -1  # last model-service event seq folded into the stored events (for re-attach)
    runner_id: str | None = None  # process currently running the generation
    lease_until: float = 0.0  # runner lease; a resume on another process takes over after it lapses
    reader_seen_at: float = 0.0  # last time any client was attached (auto-cancel across processes)
    meta: dict[str, Any] = field(default_factory=dict)  # chunk id, created, model, include_usage, ...


@dataclass(slots=True)
class StoredEvent:
    index: int
    data: str


@dataclass(frozen=True, slots=True)
class AppendBatch:
    """One atomic write of ``SessionStore.append``: stored events plus the session fields they advance.

    ``events`` are consecutive (each ``index`` one more than the previous; the first must follow the
    session's ``last_index``), possibly empty (then only the session fields change). ``model_seq`` is the
    last model-service event seq that these events cover (re-attach point; -1 when none). ``now`` becomes
    the session's ``updated`` (seconds since the epoch). ``status``, ``finish_reason`` and ``usage``
    (token counts: prompt_tokens, completion_tokens, total_tokens, ...) are written only when not None;
    ``status`` must be one of ``STATUSES`` (ValueError otherwise, raised by the store). ``runner_id``
    fences the write: when given, the store refuses it (AppendConflict) unless that runner holds the
    session; None writes unfenced (a reservation's end). ``events`` is copied into a tuple: a caller that
    keeps changing its own list afterwards (the runner's retry buffer) cannot change a batch in flight."""

    events: Sequence[StoredEvent]
    model_seq: int
    now: float
    status: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    runner_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", tuple(self.events))


class SessionExists(Exception):
    pass


class StoreUnavailable(Exception):
    """The database cannot be reached (api: 503 with Retry-After)."""


class AppendConflict(Exception):
    """append() found the session missing or its last_index not just before the first new event: another
    runner advanced it (the caller lost its lease) or the batch is not consecutive. Nothing was stored."""


class SessionStore(Protocol):
    async def open(self) -> None:
        """Connect and create/migrate the schema."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreUnavailable when the database is not reachable or does not take writes (readiness);
        writes nothing."""

    async def create(self, record: SessionRecord) -> None:
        """Insert a new session; raise SessionExists when the id is taken."""

    async def get(self, session_id: str) -> SessionRecord | None: ...

    async def append(self, session_id: str, batch: AppendBatch) -> None:
        """Atomically store ``batch.events`` (consecutive, starting at last_index + 1) and advance the
        session: last_index, model_seq, updated (= ``batch.now``), and optionally status/finish_reason/usage.
        Then wake waiters. An empty batch only updates the session. Raises AppendConflict (storing nothing)
        when the session is missing or the batch does not continue it exactly, or (fencing) when
        ``batch.runner_id`` is given and the session's runner is another one: a runner that lost its lease
        can never write after its successor; ValueError for an unknown status."""

    async def update(self, session_id: str, *, now: float, **fields: Any) -> None:
        """Set plain fields of the session (status, model_url, model_request_id, reader_seen_at, ...).
        ``updated`` becomes ``now`` unless only bookkeeping fields change (reader_seen_at, runner_id,
        lease_until): a reader's heartbeat must not restart the TTL of a finished session. An unknown
        session is a no-op; an unknown or append-only field (last_index) raises ValueError."""

    async def read(self, session_id: str, after: int, limit: int = 1000) -> list[StoredEvent]:
        """Stored events with index > after, in order."""

    async def wait(self, session_id: str, after: int, timeout: float) -> None:  # noqa: ASYNC109
        """Return when an event with index > after may exist or the session changed, or at timeout.
        Cross-process: Postgres uses LISTEN/NOTIFY; SQLite polls its file at a short interval."""

    async def claim(
        self,
        session_id: str,
        runner_id: str,
        lease_seconds: float,
        now: float,
        *,
        takeover_from: str | None = None,
    ) -> bool:
        """Take or renew the runner lease (until ``now + lease_seconds``, seconds since the epoch): succeeds
        when the session is not final and the lease is held by ``runner_id`` already, has lapsed, or is held
        by ``takeover_from`` (a runner the caller knows is dead: compare-and-swap on the holder). Atomic
        across processes."""

    async def release(self, session_id: str, runner_id: str) -> bool:
        """Give the lease up (runner_id None, lease_until 0) only when ``runner_id`` still holds it
        (compare-and-swap): a runner that lost its lease without noticing never clears its successor's.
        True when released; False when another runner (or none) holds it or the session is missing."""

    async def orphans(self, lapsed_before: float, limit: int) -> list[SessionRecord]:
        """Unfinished sessions (queued or running) whose lease ended before ``lapsed_before`` (seconds
        since the epoch; a released lease ends at 0), longest lapsed first, at most ``limit``: nobody runs
        them, and no reader may come to take them over (the sweeper adopts them)."""

    async def delete_expired(self, now: float, ttl_seconds: float) -> int:
        """Delete final sessions (and their events) whose ``updated`` is older than ttl. Returns count."""
