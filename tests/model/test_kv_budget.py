"""The KV memory budget on the tiny real model: a request whose own KV cannot fit is refused at prepare
(400), one that cannot fit next to the running rows waits and then runs, and the KV in use (running rows
plus kept prefixes) never exceeds the budget under 64 concurrent streams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.model.engine import batch as kv
from services.model.engine.hf import fit_kv_budget
from services.model.engine.kv_slots import SlotConfig
from services.protocol.errors import PromptTooLong
from services.protocol.generate import SamplingParams
from tests.model.engine_support import (
    Recorder,
    drain,
    prepare,
    reference_tokens,
    request,
    scheduler_for,
    tiny_engine,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    return tiny_engine(tiny_model_dir)


def test_fit_kv_budget_shortens_a_default_and_refuses_what_cannot_fit() -> None:
    s = SamplingParams(max_tokens=100)
    assert fit_kv_budget(s, True, 50, 0) is s  # no budget
    assert fit_kv_budget(s, True, 50, 1000) is s
    assert fit_kv_budget(s, True, 50, 120).max_tokens == 70  # a default is shortened to the room
    with pytest.raises(PromptTooLong, match="KV_CACHE_BYTES"):
        fit_kv_budget(s, False, 50, 120)  # asked for: refused, as a context overflow is
    with pytest.raises(PromptTooLong):
        fit_kv_budget(s, True, 130, 120)  # the prompt alone does not fit


def test_fit_kv_budget_sizes_slots_by_their_bucket() -> None:
    """KV_LAYOUT=slots: n rows alone take a bucket of slots (3 -> 4), each needing its prompt + max_tokens."""
    s = SamplingParams(max_tokens=100, n=3)
    slots = SlotConfig(max_slots=8)
    assert fit_kv_budget(s, False, 50, 450) is s  # concat: 3 x 150 fit
    with pytest.raises(PromptTooLong, match=r"3 choice\(s\), which occupy a bucket of 4 slot"):
        fit_kv_budget(s, False, 50, 450, slots)  # slots: 4 x 150 do not
    assert fit_kv_budget(s, False, 50, 600, slots) is s
    assert fit_kv_budget(s, True, 50, 450, slots).max_tokens == 450 // 4 - 50
    budgeted = SlotConfig(max_slots=8, budget_tokens=450)  # under a budget the slots fall back to the rows
    assert fit_kv_budget(s, False, 50, 450, budgeted) is s
    with pytest.raises(PromptTooLong, match=r"3 choice\(s\) needs"):
        fit_kv_budget(s, False, 50, 449, SlotConfig(max_slots=8, budget_tokens=449))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_slots_never_allocate_past_a_budget_that_prepare_accepted(engine: Any, n: int) -> None:
    """n > 1 under the smallest budget ``fit_kv_budget`` accepts for the slots layout (n rows, as concat: the
    buckets of 4 and 8 for n = 3, 5 do not fit it), nothing else running: the slot buffers plus the kept
    prefixes stay within the budget at every step."""
    p = prepare(engine, request(f"fork-{n}", "Tell me a story about cats", n=n, max_tokens=20, temperature=0))
    per_token = kv.bytes_per_token(engine.loaded.model)
    tokens = n * (p.prompt_tokens + (p.sampling.max_tokens or 0))
    config = SlotConfig(max_slots=8, budget_tokens=tokens)
    assert fit_kv_budget(p.sampling, False, p.prompt_tokens, tokens, config) is p.sampling
    with pytest.raises(PromptTooLong):
        fit_kv_budget(p.sampling, False, p.prompt_tokens, tokens - 1, SlotConfig(8, budget_tokens=tokens - 1))
    budget = per_token * tokens
    sched = scheduler_for(engine, kv_layout="slots", kv_cache_bytes=budget, max_batch_size=8)
    rec = Recorder()
    sched.bind(rec)
    sched.submit(p)
    peak = 0
    while sched.step_once():
        if sched._batch is not None:
            peak = max(peak, kv.nbytes(sched._batch) + sched.prefix.nbytes)
    assert 0 < peak <= budget
    assert rec.final(f"fork-{n}").finish_reason in ("stop", "length")  # type: ignore[union-attr]


def test_prepare_refuses_a_request_that_can_never_fit(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "kv_tokens", 40)
    with pytest.raises(PromptTooLong):
        prepare(engine, request("huge", "word " * 60, max_tokens=4))
    fitted = prepare(engine, request("fits", "hi", temperature=0))  # no max_tokens: shortened to fit
    assert fitted.prompt_tokens + (fitted.sampling.max_tokens or 0) == 40


@pytest.mark.parametrize("layout", ["concat", "slots"])
def test_a_request_that_does_not_fit_yet_waits_then_runs(engine: Any, layout: str) -> None:
    a = prepare(engine, request("wait-a", "Tell me a story about cats", max_tokens=12, temperature=0))
    b = prepare(engine, request("wait-b", "Count to ten, slowly and carefully", max_tokens=10, temperature=0))
    per_token = kv.bytes_per_token(engine.loaded.model)
    longest = max(p.prompt_tokens + (p.sampling.max_tokens or 0) for p in (a, b))
    budget = per_token * (2 * longest - 1)  # one row fits, two do not (slots: columns capped at the budget)
    sched = scheduler_for(engine, kv_cache_bytes=budget, prefix_cache=False, kv_layout=layout)
    rec = Recorder()
    sched.bind(rec)
    sched.submit(a)
    sched.submit(b)
    sched.step_once()
    assert sched.stats().running == 1  # b waits for a's KV
    drain(sched)
    assert sched.tokens["wait-a"] == reference_tokens(engine, a)
    assert sched.tokens["wait-b"] == reference_tokens(engine, b)
    assert rec.final("wait-b").finish_reason in ("stop", "length")  # type: ignore[union-attr]


def test_slots_run_as_many_rows_as_concat_when_the_bucket_does_not_fit(engine: Any) -> None:
    """9 rows under a budget that holds 9 of the longest but not the bucket of 16 (nor 12, a multiple of
    4): the slots fall back to 9 slots, so all 9 run at once as with concat (each reserving its rectangle
    of slots x columns), within the budget, decoding what ``generate`` alone does."""
    prepared = [
        prepare(engine, request(f"fit-{i}", f"Question {i}: about cats", max_tokens=16, temperature=0))
        for i in range(9)
    ]
    per_token = kv.bytes_per_token(engine.loaded.model)
    longest = max(p.prompt_tokens + (p.sampling.max_tokens or 0) for p in prepared)
    budget = per_token * (9 * longest + longest // 2)
    running: dict[str, int] = {}
    for layout in ("concat", "slots"):
        sched = scheduler_for(
            engine, kv_cache_bytes=budget, max_batch_size=16, prefix_cache=False, kv_layout=layout
        )
        sched.bind(Recorder())
        for p in prepared:
            sched.submit(p)
        peak = 0
        while sched.step_once():
            running[layout] = max(running.get(layout, 0), sched.stats().running)
            actual = kv.nbytes(sched._batch) if sched._batch is not None else 0
            peak = max(peak, actual, sched.kv_bytes()[0])
        assert 0 < peak <= budget, layout
        for p in prepared:
            assert sched.tokens[p.request_id] == reference_tokens(engine, p), (layout, p.request_id)
    assert running == {"concat": 9, "slots": 9}


class _KvWatch:
    """An observer that checks the KV in use after every step, in the engine thread."""

    def __init__(self) -> None:
        self.sched: Any = None
        self.peak = 0
        self.steps = 0
        self.max_rows = 0

    def on_step(self, batch_size: int, seconds: float, prefill_tokens: int, prefills: int = 0) -> None:
        sched = self.sched
        batch = sched._batch
        actual = (kv.nbytes(batch) if batch is not None else 0) + sched.prefix.nbytes
        reserved, prefix, _ = sched.kv_bytes()
        self.peak = max(self.peak, actual, reserved + prefix)
        self.steps += 1
        self.max_rows = max(self.max_rows, batch_size)

    def on_first_token(self, request_id: str, seconds: float) -> None: ...

    def on_finish(self, request_id: str, finish_reason: str, completion_tokens: int) -> None: ...


@pytest.mark.parametrize("layout", ["concat", "slots"])
def test_kv_in_use_never_exceeds_the_budget_under_64_streams(engine: Any, layout: str) -> None:
    prepared = [
        prepare(engine, request(f"load-{i}", f"Question {i}: " + "more " * (i % 7), max_tokens=6 + i % 5))
        for i in range(64)
    ]
    per_token = kv.bytes_per_token(engine.loaded.model)
    longest = max(p.prompt_tokens + (p.sampling.max_tokens or 0) for p in prepared)
    # about 20 of the 64 rows at once, with the kept prefixes (slots: 16, a bucket, whose 16 x C fit)
    budget = per_token * longest * 20
    watch = _KvWatch()
    sched = scheduler_for(
        engine, observer=watch, kv_cache_bytes=budget, max_batch_size=64, max_queue=64, kv_layout=layout
    )
    watch.sched = sched
    rec = Recorder()
    sched.start(rec)
    try:
        for p in prepared:
            sched.submit(p)
        rec.wait([p.request_id for p in prepared], timeout=60)
    finally:
        sched.shutdown(5)
    assert all(rec.final(p.request_id).finish_reason in ("stop", "length") for p in prepared)  # type: ignore[union-attr]
    assert 0 < watch.peak <= budget
    assert 1 < watch.max_rows < 64  # the budget, not the batch size, held rows back


@pytest.mark.parametrize("layout", ["concat", "slots"])
def test_the_rows_gauge_falls_to_zero_when_a_cancel_empties_the_batch(engine: Any, layout: str) -> None:
    """A step that only applies a cancel runs no forward: the KV stats must still be reported, or an idle
    replica shows the cancelled rows' reservation until the next request (and can trip the budget alert)."""
    from services.model.metrics import ModelMetrics

    metrics = ModelMetrics()
    sched = scheduler_for(engine, observer=metrics, kv_layout=layout)
    rec = Recorder()
    sched.bind(rec)

    def rows_gauge() -> float:
        value = metrics.registry.get_sample_value("model_kv_cache_bytes", {"kind": "rows"})
        assert value is not None
        return value

    sched.submit(prepare(engine, request("long", "Tell a long story", max_tokens=60000)))
    while not rec.outputs("long"):
        sched.step_once()
    assert rows_gauge() > 0
    assert sched.cancel("long")
    sched.step_once()
    assert rec.final("long").finish_reason == "cancelled"  # type: ignore[union-attr]
    assert rows_gauge() == 0
