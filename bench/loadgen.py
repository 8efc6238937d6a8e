"""Closed-loop load: ``concurrency`` streams, each sending its next request as soon as the last one ends.

Every level is bounded twice: by a request count and by a wall-clock limit (requests still running at the
limit are cancelled and counted as errors).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it; times are ``time.perf_counter()`` seconds."""

    start: float
    end: float = 0.0
    first_token: float | None = None
    completion_tokens: int = 0  # from the server's usage (or the engine's final output)
    prompt_tokens: int = 0
    chunks: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.completion_tokens > 0

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def itl(self) -> float | None:
        """Mean inter-token latency after the first token (chunks coalesce tokens, so per request)."""
        if self.first_token is None or self.completion_tokens < 2:
            return None
        return (self.end - self.first_token) / (self.completion_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(slots=True)
class LevelResult:
    target: str
    concurrency: int
    requests: int
    ok: int
    errors: int
    wall_s: float
    completion_tokens: int
    tok_s: float
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    e2e_p50: float | None
    e2e_p99: float | None
    error_samples: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process tree in this level
    tok_s_runs: list[float] = field(default_factory=list)  # every run of this level (see --repeats)
    engine_step_ms: float | None = None  # the engine's mean step wall time in this level (bench/steps.py)
    engine_rows: float | None = None  # the engine's mean rows per step in this level

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_records(cls, target: str, concurrency: int, records: Sequence[RequestRecord]) -> LevelResult:
        good = [r for r in records if r.ok]
        bad = [r for r in records if not r.ok]
        wall = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
        tokens = sum(r.completion_tokens for r in good)
        ttft = [t for r in good if (t := r.ttft) is not None]
        itl = [t for r in good if (t := r.itl) is not None]
        e2e = [r.e2e for r in good]
        return cls(
            target=target,
            concurrency=concurrency,
            requests=len(records),
            ok=len(good),
            errors=len(bad),
            wall_s=wall,
            completion_tokens=tokens,
            tok_s=tokens / wall if wall > 0 else 0.0,
            ttft_p50=percentile(ttft, 50),
            ttft_p99=percentile(ttft, 99),
            itl_p50=percentile(itl, 50),
            itl_p99=percentile(itl, 99),
            e2e_p50=percentile(e2e, 50),
            e2e_p99=percentile(e2e, 99),
            error_samples=sorted({(r.error or "no tokens")[:200] for r in bad})[:3],
        )


Send = Callable[[int], Awaitable[RequestRecord]]


async def closed_loop(send: Send, concurrency: int, count: int, time_limit: float) -> list[RequestRecord]:
    """Run ``count`` requests (indices 0..count-1) over ``concurrency`` streams within ``time_limit``."""
    indices = iter(range(count))
    records: list[RequestRecord] = []
    deadline = time.perf_counter() + time_limit

    async def stream() -> None:
        for index in indices:  # a shared iterator: each index goes to exactly one stream
            if time.perf_counter() >= deadline:
                return
            records.append(await send(index))

    tasks = [asyncio.create_task(stream()) for _ in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()) + 1.0)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    now = time.perf_counter()
    for _ in pending:  # one stream cut at the limit: its request in flight is an error
        records.append(RequestRecord(start=now, end=now, error=f"level time limit {time_limit:.0f}s reached"))
    return records


async def warm_up(send: Send, count: int, concurrency: int = 2) -> None:
    """Requests whose numbers are thrown away (first-call costs: lazy imports, allocator, connections)."""
    await closed_loop(send, min(concurrency, count), count, time_limit=120.0)


def level_sizes(concurrency: int, quick: bool, cap: int) -> int:
    """Requests per level: two per stream, at least 16, at most ``cap``; ``--quick``: one per stream."""
    if quick:
        return max(2, concurrency)
    return min(cap, max(16, 2 * concurrency))


_ids = itertools.count()


def next_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"
