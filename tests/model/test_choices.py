"""n > 1 in the engines' contract: one FinalOutput per request, each choice its own end, seeded choices that
are reproducible and differ, n rows against the queue and batch limits, cancel and failure of all choices."""

from __future__ import annotations

import asyncio

import pytest

from services.model.engine.base import FinalOutput, Output, TokenOutput
from services.model.engine.choices import ChoiceGroup
from services.model.engine.fake import FakeEngine
from services.model.engine.wire import StepReport, pack_outputs
from services.protocol.errors import InvalidValue, Overloaded
from services.protocol.generate import INT64_MAX, INT64_MIN, SamplingParams, choice_seed
from tests.model.test_fake_engine import Collector, make_engine, request, run, settings

__all__ = ["make_engine"]  # the fixture, used by name


def choice_texts(outputs: list[Output], n: int) -> list[tuple[str, str]]:
    """Each choice's (reasoning, content), by index."""
    texts = [("", "")] * n
    for out in outputs:
        if isinstance(out, TokenOutput):
            reasoning, content = texts[out.index]
            texts[out.index] = (reasoning + out.reasoning, content + out.content)
    return texts


def choice_ends(outputs: list[Output]) -> dict[int, str]:
    ends: dict[int, str] = {}
    for out in outputs:
        if isinstance(out, TokenOutput) and out.finish_reason is not None:
            assert out.index not in ends, "a choice ended twice"
            ends[out.index] = out.finish_reason
    return ends


def test_choice_seed_keeps_choice_zero_and_stays_in_range() -> None:
    assert choice_seed(None, 3) is None
    assert choice_seed(7, 0) == 7
    seeds = {choice_seed(7, i) for i in range(64)}
    assert len(seeds) == 64
    for seed in (INT64_MIN, -1, 0, INT64_MAX):
        for i in range(1, 9):
            derived = choice_seed(seed, i)
            assert derived is not None and INT64_MIN <= derived <= INT64_MAX
            SamplingParams(seed=derived)  # a valid seed for the protocol


def test_group_ends_each_choice_then_one_final() -> None:
    group = ChoiceGroup("r", 3, prompt_tokens=5)
    assert group.end(1, "length", 4) == [("r", TokenOutput("", "", 0, index=1, finish_reason="length"))]
    tail = TokenOutput("a", "", 2)
    out = group.end(0, "stop", 2, tail=tail)
    assert out == [("r", TokenOutput("a", "", 2, index=0, finish_reason="stop"))]
    out = group.end(2, "stop", 3)
    assert out[-1] == ("r", FinalOutput("length", 5, 9, None))
    with pytest.raises(ValueError):
        group.end(2, "stop", 0)
    single = ChoiceGroup("s", 1, prompt_tokens=5)
    assert single.end(0, "stop", 1, tail=tail) == [("s", tail), ("s", FinalOutput("stop", 5, 1, None))]


def test_wire_carries_index_and_choice_end() -> None:
    outputs: list[tuple[str, Output]] = [
        ("r", TokenOutput("a", "b", 2, None, 2, "length")),
        ("r", FinalOutput("length", 3, 7, None)),
    ]
    report = StepReport(packed=pack_outputs(outputs))
    assert report.outputs() == outputs


def test_seeded_choices_are_reproducible_and_differ(make_engine) -> None:
    engine, sink = make_engine()
    run(engine, request("a", seed=11, n=3))
    run(engine, request("b", seed=11, n=3))
    run(engine, request("one", seed=11))
    finals = {rid: sink.final(rid) for rid in ("a", "b", "one")}
    a, b = sink.outputs("a"), sink.outputs("b")
    assert choice_texts(a, 3) == choice_texts(b, 3)
    assert len(set(choice_texts(a, 3))) == 3
    assert choice_texts(a, 3)[0] == choice_texts(sink.outputs("one"), 1)[0]  # choice 0 keeps the seed
    assert choice_ends(a) == {0: "stop", 1: "stop", 2: "stop"}
    assert not choice_ends(sink.outputs("one"))  # n = 1: no choice-end outputs, as before
    tokens = sum(o.tokens for o in a if isinstance(o, TokenOutput))
    assert finals["a"].completion_tokens == tokens
    assert finals["a"].finish_reason == "stop"
    assert isinstance(a[-1], FinalOutput)  # the request's end comes after every choice's


def test_unseeded_choices_differ(make_engine) -> None:
    engine, sink = make_engine()
    run(engine, request("u", n=2))
    sink.final("u")
    first, second = choice_texts(sink.outputs("u"), 2)
    assert first != second


def test_n_counts_as_rows_against_batch_and_queue(make_engine) -> None:
    engine, _ = make_engine(max_batch_size=4, max_queue=2, fake_step_seconds=0.05)
    with pytest.raises(InvalidValue) as too_many:
        run(engine, request("wide", n=5))
    assert too_many.value.param == "n"
    run(engine, request("a", n=4, max_tokens=3000))
    with pytest.raises(Overloaded):
        run(engine, request("b", n=3))  # 4 + 3 > 4 + 2
    run(engine, request("c", n=2))
    stats = engine.stats()
    assert stats.running + stats.queued == 6


def test_a_wide_request_waits_for_its_slots(make_engine) -> None:
    engine, sink = make_engine(max_batch_size=4, fake_step_seconds=0.01)
    run(engine, request("long", max_tokens=3000, n=2))
    run(engine, request("wide", n=3))
    sink.wait_tokens("long", 5)
    assert not sink.outputs("wide")  # 2 + 3 > 4: it waits, it does not run short of a row
    engine.cancel("long")
    assert sink.final("long").finish_reason == "cancelled"
    assert sink.final("wide").finish_reason == "stop"


def test_cancel_stops_every_choice(make_engine) -> None:
    engine, sink = make_engine()
    run(engine, request("c", n=3, max_tokens=3000))
    sink.wait_tokens("c", 6)
    assert engine.cancel("c")
    final = sink.final("c")
    assert final.finish_reason == "cancelled"
    assert choice_ends(sink.outputs("c")) == {0: "cancelled", 1: "cancelled", 2: "cancelled"}


def test_a_failing_choice_fails_the_request(make_engine) -> None:
    engine, sink = make_engine()
    run(engine, request("f", "[[fake:error]] go", n=2))
    final = sink.final("f")
    assert final.finish_reason == "error" and final.error
    assert set(choice_ends(sink.outputs("f")).values()) == {"error"}


class _Observer:
    """Counts prefills (the metric's source), first tokens and finishes."""

    def __init__(self) -> None:
        self.prefills = 0
        self.first: list[str] = []
        self.finished: list[str] = []

    def on_step(self, batch_size: int, seconds: float, prefill_tokens: int, prefills: int = 0) -> None:
        self.prefills += prefills

    def on_first_token(self, request_id: str, seconds: float) -> None:
        self.first.append(request_id)

    def on_finish(self, request_id: str, finish_reason: str, completion_tokens: int) -> None:
        self.finished.append(request_id)

    def on_memory(self, rows: dict) -> None:
        pass


def test_prefilled_once_first_token_and_finish_once() -> None:
    observer = _Observer()
    engine = FakeEngine(settings(), observer=observer)
    sink = Collector()
    engine.start(sink)
    try:
        engine.submit(asyncio.run(engine.prepare(request("p", n=4))))
        sink.final("p")
    finally:
        engine.shutdown(0)
    assert observer.prefills == 1
    assert observer.first == ["p"] and observer.finished == ["p"]
