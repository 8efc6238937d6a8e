"""Engine steps during a level: how many, their mean wall time and rows (where a throughput gap comes from).

tok/s = rows per step / seconds per step, so a target that is slower than the raw engine is slower because
its engine ran fewer rows per step (requests spent time outside the batch: the hops between client and
engine) or longer steps (the engine shared the CPU with the stack's other processes), or both. The raw
engine counts its own steps (``StepTally``, an ``EngineObserver``); the model service exports the same
counts as ``model_step_duration_seconds`` and ``model_batch_size`` (``model_steps``).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import httpx

_SERIES = re.compile(
    r"^(model_step_duration_seconds_count|model_step_duration_seconds_sum|model_batch_size_sum)"
    r" ([0-9.e+-]+)$",
    re.M,
)


@dataclass(frozen=True, slots=True)
class StepTotals:
    """Running totals since the engine started: ``steps``, their wall ``seconds``, the ``rows`` they ran."""

    steps: int = 0
    seconds: float = 0.0
    rows: int = 0

    def minus(self, before: StepTotals) -> StepTotals:
        return StepTotals(self.steps - before.steps, self.seconds - before.seconds, self.rows - before.rows)

    @property
    def step_ms(self) -> float | None:
        """Mean wall time of one step, in milliseconds (None without steps)."""
        return 1000.0 * self.seconds / self.steps if self.steps else None

    @property
    def rows_per_step(self) -> float | None:
        return self.rows / self.steps if self.steps else None


class StepTally:
    """An ``EngineObserver`` that only counts steps (called from the engine's thread: a lock, no I/O)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = StepTotals()

    def on_step(self, batch_size: int, seconds: float, prefill_tokens: int, prefills: int = 0) -> None:
        with self._lock:
            t = self._totals
            self._totals = StepTotals(t.steps + 1, t.seconds + seconds, t.rows + batch_size)

    def on_first_token(self, request_id: str, seconds: float) -> None:
        """Not counted."""

    def on_finish(self, request_id: str, finish_reason: str, completion_tokens: int) -> None:
        """Not counted."""

    def on_memory(self, rows: object) -> None:
        """Not counted."""

    def totals(self) -> StepTotals:
        with self._lock:
            return self._totals


def model_steps(model_url: str, timeout: float = 10.0) -> StepTotals:
    """The model service's step totals from its ``/metrics`` (raises ``httpx.HTTPError``)."""
    return parse_steps(httpx.get(f"{model_url}/metrics", timeout=timeout).raise_for_status().text)


def parse_steps(page: str) -> StepTotals:
    """Step totals from a Prometheus text page of the model service (zeros where the series are absent)."""
    found = {name: float(value) for name, value in _SERIES.findall(page)}
    return StepTotals(
        steps=int(found.get("model_step_duration_seconds_count", 0)),
        seconds=found.get("model_step_duration_seconds_sum", 0.0),
        rows=int(found.get("model_batch_size_sum", 0)),
    )
