"""n > 1 on the real scheduler with the tiny checkpoint: one prefill forked into n rows that decode exactly as
the prompt alone would (greedy, text and image, whole and chunked prefill), seeded choices reproducible and
different at temperature 1, choice 0 equal to the n = 1 request, cancel of every choice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.model.engine.base import FinalOutput, TokenOutput
from tests.model.engine_support import (
    Recorder,
    RecordingScheduler,
    drain,
    prepare,
    reference_tokens,
    request,
    scheduler_for,
    tiny_engine,
)

pytestmark = pytest.mark.integration


class Prefills:
    """An observer counting prefills (the metric's source) and first tokens."""

    def __init__(self) -> None:
        self.prefills = 0
        self.first: list[str] = []
        self.finished: dict[str, tuple[str, int]] = {}

    def on_step(self, batch_size: int, seconds: float, prefill_tokens: int, prefills: int = 0) -> None:
        self.prefills += prefills

    def on_first_token(self, request_id: str, seconds: float) -> None:
        self.first.append(request_id)

    def on_finish(self, request_id: str, finish_reason: str, completion_tokens: int) -> None:
        self.finished[request_id] = (finish_reason, completion_tokens)

    def on_memory(self, rows: dict) -> None:
        pass


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    return tiny_engine(tiny_model_dir)


def run(engine: Any, reqs: list, observer: Any = None, **config: Any) -> tuple[RecordingScheduler, Recorder]:
    """A fresh scheduler (its own prefix cache), every request submitted, driven until idle."""
    base = scheduler_for(engine, observer=observer, **config)
    sched = RecordingScheduler(engine.loaded.model, engine.table, base._config, observer)
    rec = Recorder()
    sched.bind(rec)
    for req in reqs:
        sched.submit(prepare(engine, req))
    drain(sched)
    return sched, rec


def ends(rec: Recorder, request_id: str) -> dict[int, str]:
    return {
        o.index: o.finish_reason
        for o in rec.outputs(request_id)
        if isinstance(o, TokenOutput) and o.finish_reason is not None
    }


def test_seeded_choices_reproducible_distinct_and_prefilled_once(engine: Any) -> None:
    sampling = {"seed": 1234, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_tokens": 12}
    runs = []
    for _ in range(2):
        obs = Prefills()
        sched, rec = run(engine, [request("r", "tell me a story", n=3, **sampling)], observer=obs)
        runs.append(sched.by_choice)
        assert obs.prefills == 1  # one prompt, one prefill, three rows
        assert obs.first == ["r"]
        final = rec.final("r")
        assert isinstance(final, FinalOutput)
        assert final.completion_tokens == sum(len(sched.by_choice[("r", i)]) for i in range(3))
        assert obs.finished["r"] == (final.finish_reason, final.completion_tokens)
        assert set(ends(rec, "r")) == {0, 1, 2}
    assert runs[0] == runs[1]
    choices = [tuple(runs[0][("r", i)]) for i in range(3)]
    assert len(set(choices)) == 3, choices
    alone, _ = run(engine, [request("one", "tell me a story", **sampling)])
    assert alone.by_choice[("one", 0)] == runs[0][("r", 0)]  # choice 0 keeps the request's seed


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_greedy_choices_equal_the_prompt_alone(engine: Any, chunked: bool) -> None:
    """Each forked row decodes as the prompt alone under ``generate`` (its cache and mrope delta were
    copied right), next to another request that pads the batch."""
    image = request("img", "what is in the picture", image=3, n=2, max_tokens=8, temperature=0)
    longer = "a much longer prompt that makes the batch pad its rows"
    other = request("other", longer, max_tokens=8, temperature=0)
    config = {"max_step_tokens": 40} if chunked else {}
    sched, rec = run(engine, [other, image], **config)
    want = reference_tokens(engine, prepare(engine, image))
    assert sched.by_choice[("img", 0)] == want
    assert sched.by_choice[("img", 1)] == want
    assert sched.by_choice[("other", 0)] == reference_tokens(engine, prepare(engine, other))
    assert rec.final("img").completion_tokens == 2 * len(want)  # type: ignore[union-attr]


def test_cancel_stops_every_choice(engine: Any) -> None:
    sched = scheduler_for(engine)
    rec = Recorder()
    sched.bind(rec)
    sched.submit(prepare(engine, request("c", "go on", n=3, max_tokens=10_000, temperature=1.0)))
    sched.step_once()
    sched.step_once()
    assert sched.cancel("c")
    drain(sched)
    final = rec.final("c")
    assert isinstance(final, FinalOutput) and final.finish_reason == "cancelled"
    assert ends(rec, "c") == {0: "cancelled", 1: "cancelled", 2: "cancelled"}
    assert sched.stats().running == 0 and sched.stats().queued == 0


def test_each_choice_has_its_own_grammar_matcher(engine: Any) -> None:
    """A JSON schema with n = 3 at temperature 1: every choice's answer validates on its own (one shared,
    stateful matcher would reject the second choice's tokens and fail the request)."""
    import json

    import jsonschema

    from services.protocol.generate import ResponseFormat
    from tests.model.test_structured import SCHEMA

    fmt = ResponseFormat(type="json_schema", json_schema=SCHEMA)
    req = request(
        "j", "describe a thing", n=3, max_tokens=120, temperature=1.0, seed=3, max_reasoning_tokens=2
    )
    prepared = prepare(engine, req.model_copy(update={"response_format": fmt}))
    assert isinstance(prepared.grammar, list) and len({id(m) for m in prepared.grammar}) == 3
    sched = scheduler_for(engine)
    rec = Recorder()
    sched.bind(rec)
    sched.submit(prepared)
    drain(sched)
    final = rec.final("j")
    assert isinstance(final, FinalOutput) and final.finish_reason == "stop", final
    answers = [""] * 3
    for out in rec.outputs("j"):
        if isinstance(out, TokenOutput):
            answers[out.index] += out.content
    for answer in answers:
        jsonschema.validate(json.loads(answer), SCHEMA)
