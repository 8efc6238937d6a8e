"""One admission rule: the fake, the in-thread HF engine and the process engine queue, refuse, cancel, drain
and detect duplicates alike, through the public Engine protocol only (``admit``/``cancel``/``stats``/
``shutdown``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.model.engine.base import Engine, FinalOutput
from services.model.settings import ModelSettings
from services.protocol.errors import Conflict, InvalidMedia, NotReady, Overloaded
from services.protocol.generate import GenerateRequest, ImagePart, Message, TextPart
from tests.model.engine_support import Recorder, request, tiny_engine

KINDS = ["fake", "hf", "process"]
LONG = 4000  # tokens: far longer than any assertion below waits (the fake engine's context is 4096)


def _make(kind: str, model_dir: Path, **limits: int) -> Engine:
    if kind == "fake":
        from services.model.engine.fake import FakeEngine

        settings = ModelSettings(engine="fake", fake_step_seconds=0.005, **limits)  # type: ignore[arg-type]
        return FakeEngine(settings)
    if kind == "hf":
        from services.model.engine.hf import HFEngine

        shared = tiny_engine(model_dir)
        return HFEngine(shared.loaded, shared.settings.model_copy(update=limits))
    from services.model.engine.process import ProcessEngine

    return ProcessEngine(
        ModelSettings(
            model_repo_id=str(model_dir), device_map="cpu", torch_dtype="float32", torch_threads=1, **limits
        )  # type: ignore[arg-type]
    )


@pytest.fixture
def make(tiny_model_dir: Path) -> Iterator[Callable[..., tuple[Engine, Recorder]]]:
    built: list[Engine] = []

    def build(kind: str, **limits: int) -> tuple[Engine, Recorder]:
        engine = _make(kind, tiny_model_dir, **limits)
        rec = Recorder()
        engine.start(rec)
        built.append(engine)
        return engine, rec

    yield build
    for engine in built:
        engine.shutdown(0)


def admit(engine: Engine, req: GenerateRequest) -> Any:
    return asyncio.run(engine.admit(req))


def long(rid: str) -> GenerateRequest:
    # "[[fake:tokens=N]]" makes the fake as long as max_tokens; the tiny model ignores it.
    return request(rid, f"Tell a long story [[fake:tokens={LONG}]]", max_tokens=LONG, temperature=0)


def bad_media(rid: str) -> GenerateRequest:
    parts = [ImagePart(data="%%not base64%%"), TextPart(text="look")]
    return GenerateRequest(request_id=rid, messages=[Message(role="user", content=parts)])


def finished(rec: Recorder, rid: str) -> FinalOutput:
    rec.wait([rid])
    final = rec.final(rid)
    assert final is not None
    return final


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_capacity_and_duplicates(kind: str, make: Callable[..., tuple[Engine, Recorder]]) -> None:
    engine, rec = make(kind, max_batch_size=1, max_queue=1)
    admit(engine, long("a"))
    admit(engine, long("b"))
    with pytest.raises(Overloaded):  # running + queued = max_batch_size + max_queue
        admit(engine, request("c", "hi", max_tokens=2))
    with pytest.raises(Conflict):  # a duplicate id: the conflict, not the capacity
        admit(engine, long("a"))
    with pytest.raises(Overloaded):  # capacity is checked before any prepare work
        admit(engine, bad_media("c"))
    rec.wait_tokens("a", 1)
    stats = engine.stats()
    assert (stats.running, stats.queued) == (1, 1)
    assert engine.cancel("a")
    assert finished(rec, "a").finish_reason == "cancelled"
    admit(engine, request("c", "hi", max_tokens=2))  # room again once "a" ended
    assert engine.cancel("b") and engine.cancel("c")
    assert {finished(rec, r).finish_reason for r in ("b", "c")} <= {"cancelled", "length", "stop"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_refused_requests_hold_nothing(kind: str, make: Callable[..., tuple[Engine, Recorder]]) -> None:
    engine, rec = make(kind, max_batch_size=1, max_queue=1)
    for i in range(3):  # more refusals than capacity: each one released its place
        with pytest.raises(InvalidMedia):
            admit(engine, bad_media(f"bad-{i}"))
    stats = engine.stats()
    assert (stats.running, stats.queued) == (0, 0)
    admit(engine, request("ok-1", "hi", max_tokens=2))
    admit(engine, request("ok-2", "hi", max_tokens=2))
    assert finished(rec, "ok-2").finish_reason in {"length", "stop"}
    assert not any(rid.startswith("bad-") for call in rec.calls for rid, _ in call)  # never reported


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_cancel_queued_running_unknown_and_twice(
    kind: str, make: Callable[..., tuple[Engine, Recorder]]
) -> None:
    engine, rec = make(kind, max_batch_size=1, max_queue=2)
    admit(engine, long("run"))
    admit(engine, long("wait"))
    rec.wait_tokens("run", 2)
    assert engine.stats().queued == 1
    assert engine.cancel("wait") and not engine.cancel("wait")  # once: a second cancel is False
    assert engine.cancel("run") and not engine.cancel("run")
    assert not engine.cancel("unknown")
    queued, running = finished(rec, "wait"), finished(rec, "run")
    assert (queued.finish_reason, queued.completion_tokens) == ("cancelled", 0)
    assert running.finish_reason == "cancelled" and running.completion_tokens >= 2
    assert not engine.cancel("run")  # finished
    stats = engine.stats()
    assert (stats.running, stats.queued) == (0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_cancel_while_admitting(kind: str, make: Callable[..., tuple[Engine, Recorder]]) -> None:
    """A request cancelled while it is prepared is counted, then dropped as it reaches the queue."""
    engine, rec = make(kind)

    async def admit_and_cancel() -> tuple[bool, Any]:
        task = asyncio.create_task(engine.admit(long("early")))
        await asyncio.sleep(0)  # admit counted it and went off to prepare
        cancelled = engine.cancel("early")
        return cancelled, await task

    cancelled, admitted = asyncio.run(admit_and_cancel())
    assert cancelled and admitted.request_id == "early"
    assert finished(rec, "early").finish_reason == "cancelled"


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_drain_finishes_slot_holders_and_cancels_the_rest(
    kind: str, make: Callable[..., tuple[Engine, Recorder]]
) -> None:
    engine, rec = make(kind, max_batch_size=1, max_queue=2)
    # "short" holds the one batch slot and cannot end before shutdown begins (seconds of tokens)
    admit(engine, request("short", "hi [[fake:tokens=600]]", max_tokens=600, temperature=0))
    rec.wait_tokens("short", 1)
    admit(engine, long("waiting"))  # no batch slot at the next step
    engine.shutdown(60)
    assert finished(rec, "short").finish_reason == "length"
    final = finished(rec, "waiting")
    assert (final.finish_reason, final.completion_tokens) == ("cancelled", 0)
    with pytest.raises(NotReady):
        admit(engine, request("late", "hi"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_drain_cancels_what_outlives_the_grace(
    kind: str, make: Callable[..., tuple[Engine, Recorder]]
) -> None:
    engine, rec = make(kind, max_batch_size=2)
    admit(engine, long("endless"))
    rec.wait_tokens("endless", 1)
    engine.shutdown(0.2)
    final = finished(rec, "endless")
    assert final.finish_reason == "cancelled" and final.completion_tokens >= 1
