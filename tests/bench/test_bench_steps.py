"""``bench/steps.py``: the engine step counts that the bench's level table shows beside tok/s."""

from __future__ import annotations

import pytest

from bench.steps import StepTally, StepTotals, parse_steps
from services.model.metrics import ModelMetrics


def test_the_tally_counts_steps_seconds_and_rows() -> None:
    tally = StepTally()
    before = tally.totals()
    tally.on_step(16, 0.004, prefill_tokens=0)
    tally.on_step(12, 0.006, prefill_tokens=300, prefills=2)
    level = tally.totals().minus(before)
    assert (level.steps, level.rows) == (2, 28)
    assert level.step_ms == pytest.approx(5.0)
    assert level.rows_per_step == pytest.approx(14.0)


def test_no_steps_give_no_means() -> None:
    assert StepTotals().step_ms is None and StepTotals().rows_per_step is None


def test_the_model_services_own_page_gives_the_same_totals() -> None:
    metrics = ModelMetrics()  # what the model service renders at /metrics
    assert parse_steps(metrics.render(None).decode()) == StepTotals()
    for rows, seconds in ((16, 0.004), (15, 0.005), (9, 0.0025)):
        metrics.on_step(rows, seconds)
    totals = parse_steps(metrics.render(None).decode())
    assert (totals.steps, totals.rows) == (3, 40)
    assert totals.seconds == pytest.approx(0.0115)
