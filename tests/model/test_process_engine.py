"""ProcessEngine: the HF engine in a child process behaves like the in-thread one behind the same protocol."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.model.engine.base import Engine, FinalOutput, TokenOutput
from services.model.engine.hf import HFEngine
from services.model.engine.process import ProcessEngine
from services.model.metrics import ModelMetrics
from services.model.settings import ModelSettings
from services.protocol.errors import Conflict, InvalidMedia, NotReady, Overloaded, PromptTooLong
from services.protocol.generate import GenerateRequest, ImagePart, Message, TextPart
from tests.model.engine_support import Recorder, request, tiny_engine

pytestmark = pytest.mark.slow


def _settings(model_dir: Path, **overrides: object) -> ModelSettings:
    return ModelSettings(
        model_repo_id=str(model_dir), device_map="cpu", torch_dtype="float32", torch_threads=1, **overrides
    )


@pytest.fixture(scope="module")
def started(tiny_model_dir: Path) -> Iterator[tuple[ProcessEngine, Recorder]]:
    engine = ProcessEngine(_settings(tiny_model_dir, max_batch_size=2, max_queue=1), observer=ModelMetrics())
    rec = Recorder()
    engine.start(rec)
    yield engine, rec
    engine.shutdown(1.0)


def _greedy_requests(tag: str) -> list[GenerateRequest]:
    return [
        request(f"{tag}-text", "Say something", max_tokens=12, temperature=0),
        request(f"{tag}-image", "What is this?", image=5, max_tokens=10, temperature=0),
        request(f"{tag}-stop", "Count", max_tokens=16, temperature=0, stop=["e"]),
    ]


def _run_one_at_a_time(engine: Engine, rec: Recorder, reqs: list[GenerateRequest]) -> list[object]:
    results: list[object] = []
    for r in reqs:
        admitted = asyncio.run(engine.admit(r))
        rec.wait([r.request_id])
        final = rec.final(r.request_id)
        assert final is not None
        results.append((admitted.prompt_tokens, rec.text(r.request_id), final))
    return results


def test_tokens_equal_the_in_thread_engine(
    started: tuple[ProcessEngine, Recorder], tiny_model_dir: Path
) -> None:
    engine, rec = started
    _: Engine = engine  # structural check
    shared = tiny_engine(tiny_model_dir)
    local = HFEngine(shared.loaded, shared.settings.model_copy(update={"max_batch_size": 2}))
    local_rec = Recorder()
    local.start(local_rec)
    try:
        expected = _run_one_at_a_time(local, local_rec, _greedy_requests("g"))
    finally:
        local.shutdown(5)
    received, steps_before, calls_before = (
        dict(engine.received),
        _count(engine.observer, "step_duration"),
        len(rec.calls),
    )
    got = _run_one_at_a_time(engine, rec, _greedy_requests("g"))
    assert got == expected
    # one parent sink call per child step, with the same outputs as the in-thread engine's sink calls
    assert [c for c in rec.calls if c[0][0].startswith("g-")] == local_rec.calls
    # one pipe message per step: the step's outputs, timing, first tokens and occupancy travel together
    reports = engine.received["StepReport"] - received.get("StepReport", 0)
    steps = _count(engine.observer, "step_duration") - steps_before
    assert len(rec.calls) - calls_before <= reports <= steps
    assert engine.received["Admitted"] - received.get("Admitted", 0) == 3
    assert set(engine.received) <= {"StepReport", "Admitted"}
    assert engine.stats().running == 0 and engine.stats().queued == 0
    # the child's memory reaches the parent's metrics (this process's torch is not the child's)
    metrics = engine.observer
    assert isinstance(metrics, ModelMetrics)
    assert metrics.engine_process_memory["cpu", "rss"] > 50_000_000
    assert _count(metrics, "step_duration") > 0  # on_step forwarded
    # the child's media cache reaches them too: the image request processed its image (a miss)
    assert metrics.media_cache_misses._value.get() >= 1
    assert metrics.media_cache_entries._value.get() >= 1


def _count(metrics: object, histogram: str) -> float:
    assert isinstance(metrics, ModelMetrics)
    family = getattr(metrics, histogram).collect()[0]
    return next(x.value for x in family.samples if x.name.endswith("_count"))


def test_prepare_errors_are_typed(started: tuple[ProcessEngine, Recorder]) -> None:
    engine, _ = started
    parts = [ImagePart(data=base64.b64encode(b"not an image").decode()), TextPart(text="look")]
    bad = GenerateRequest(request_id="bad", messages=[Message(role="user", content=parts)])
    with pytest.raises(InvalidMedia):
        asyncio.run(engine.admit(bad))
    with pytest.raises(PromptTooLong):
        asyncio.run(engine.admit(request("long", "hi", max_tokens=10_000_000)))
    assert engine.stats().running == engine.stats().queued == 0  # refused: nothing held


def test_cancel_overloaded_and_conflict(started: tuple[ProcessEngine, Recorder]) -> None:
    engine, rec = started
    ids = ["c-0", "c-1", "c-2"]
    for rid in ids:
        asyncio.run(engine.admit(request(rid, "Tell a long story", max_tokens=60000)))
    extra = request("c-extra", "hi", max_tokens=4)
    with pytest.raises(Overloaded):  # 2 running + 1 queued = max_batch_size + max_queue
        asyncio.run(engine.admit(extra))
    with pytest.raises(Conflict):
        asyncio.run(engine.admit(request("c-0", "Tell a long story", max_tokens=60000)))
    stats = engine.stats()
    assert stats.running + stats.queued == 3
    rec.wait_tokens("c-0", 2)
    assert all(engine.cancel(rid) for rid in ids)
    rec.wait(ids)
    for rid in ids:
        final = rec.final(rid)
        assert final is not None and final.finish_reason == "cancelled"
    assert engine.cancel("c-0") is False and engine.stats().running == 0
    asyncio.run(engine.admit(extra))  # room again
    rec.wait(["c-extra"])


def test_shutdown_ends_every_request_and_the_child(tiny_model_dir: Path) -> None:
    engine = ProcessEngine(_settings(tiny_model_dir, max_batch_size=2, max_queue=2))
    rec = Recorder()
    engine.start(rec)
    ids = [f"s-{i}" for i in range(4)]  # 2 running, 2 queued
    for rid in ids:
        asyncio.run(engine.admit(request(rid, "Tell a long story", max_tokens=500)))
    rec.wait_tokens("s-0", 1)
    engine.shutdown(0.2)
    assert not engine.is_alive()
    for rid in ids:
        final = rec.final(rid)
        assert isinstance(final, FinalOutput) and final.finish_reason in {"cancelled", "length", "stop"}
    assert any(isinstance(o, TokenOutput) for o in rec.outputs("s-0"))
    with pytest.raises(NotReady):
        asyncio.run(engine.admit(request("late", "hi")))


def test_a_dead_engine_process_fails_its_requests_and_reports_why(tiny_model_dir: Path) -> None:
    engine = ProcessEngine(_settings(tiny_model_dir))
    rec = Recorder()
    engine.start(rec)
    asyncio.run(engine.admit(request("d-0", "Tell a long story", max_tokens=60000)))
    rec.wait_tokens("d-0", 1)
    assert engine.failure is None
    assert engine.pid is not None
    os.kill(engine.pid, signal.SIGKILL)  # an OOM kill, say
    rec.wait(["d-0"])
    final = rec.final("d-0")
    assert isinstance(final, FinalOutput) and final.finish_reason == "error"
    assert engine.failure is not None and "exited" in engine.failure  # the service's /ready turns 503 on it
    with pytest.raises(NotReady):
        asyncio.run(engine.admit(request("late", "hi")))
    engine.shutdown(0.2)
