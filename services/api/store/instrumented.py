"""A SessionStore wrapper that times every call into ``api_store_latency_seconds{op}``.

``wait`` is a long poll whose duration says nothing about the database, so it is not timed.
"""

from __future__ import annotations

from typing import Any

from services.api.metrics import ApiMetrics
from services.api.store.base import AppendBatch, SessionRecord, SessionStore, StoredEvent


class InstrumentedStore:
    def __init__(self, inner: SessionStore, metrics: ApiMetrics) -> None:
        self._inner = inner
        self._m = metrics

    async def open(self) -> None:
        await self._inner.open()

    async def close(self) -> None:
        await self._inner.close()

    async def ping(self) -> None:
        async with self._m.store_op("ping"):
            await self._inner.ping()

    async def create(self, record: SessionRecord) -> None:
        async with self._m.store_op("create"):
            await self._inner.create(record)

    async def get(self, session_id: str) -> SessionRecord | None:
        async with self._m.store_op("get"):
            return await self._inner.get(session_id)

    async def append(self, session_id: str, batch: AppendBatch) -> None:
        async with self._m.store_op("append"):
            await self._inner.append(session_id, batch)
        self._m.events_written.inc(len(batch.events))

    async def update(self, session_id: str, *, now: float, **fields: Any) -> None:
        async with self._m.store_op("update"):
            await self._inner.update(session_id, now=now, **fields)

    async def read(self, session_id: str, after: int, limit: int = 1000) -> list[StoredEvent]:
        async with self._m.store_op("read"):
            return await self._inner.read(session_id, after, limit)

    async def wait(self, session_id: str, after: int, timeout: float) -> None:  # noqa: ASYNC109 (protocol)
        await self._inner.wait(session_id, after, timeout)

    async def claim(
        self,
        session_id: str,
        runner_id: str,
        lease_seconds: float,
        now: float,
        *,
        takeover_from: str | None = None,
    ) -> bool:
        async with self._m.store_op("claim"):
            return await self._inner.claim(
                session_id, runner_id, lease_seconds, now, takeover_from=takeover_from
            )

    async def release(self, session_id: str, runner_id: str) -> bool:
        async with self._m.store_op("release"):
            return await self._inner.release(session_id, runner_id)

    async def orphans(self, lapsed_before: float, limit: int) -> list[SessionRecord]:
        async with self._m.store_op("orphans"):
            return await self._inner.orphans(lapsed_before, limit)

    async def delete_expired(self, now: float, ttl_seconds: float) -> int:
        async with self._m.store_op("delete_expired"):
            return await self._inner.delete_expired(now, ttl_seconds)
