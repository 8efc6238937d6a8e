"""The registry's event log readers: wake-ups and the least time between two writes (STREAM_INTERVAL_MS)."""

from __future__ import annotations

import asyncio
import threading
import tracemalloc

import pytest

from services.model.engine.base import FinalOutput, TokenOutput
from services.model.generations import GenerationRegistry
from services.model.metrics import ModelMetrics
from services.protocol.errors import NotFound
from services.protocol.events import Delta, Finished


async def _collect(registry: GenerationRegistry, request_id: str, interval: float) -> list[list[object]]:
    generation = registry.get(request_id)
    return [batch async for batch in generation.follow(-1, interval)]


def test_interval_batches_deltas_but_never_holds_back_the_first_or_the_finished() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        registry = GenerationRegistry(loop, ModelMetrics(), 60.0, stream_interval_seconds=10.0)
        registry.create("r", 3)
        reader = asyncio.create_task(_collect(registry, "r", registry.stream_interval))
        await asyncio.sleep(0)
        started = loop.time()
        registry._apply([("r", TokenOutput("a", "", 1))], 0.0)
        await asyncio.sleep(0.01)
        for text in "bcd":  # within the interval: held back, then written together
            registry._apply([("r", TokenOutput(text, "", 1))], 0.0)
            await asyncio.sleep(0.01)
        registry._apply([("r", TokenOutput("", "e", 1)), ("r", FinalOutput("stop", 3, 5))], 0.0)
        batches = await asyncio.wait_for(reader, 5.0)
        assert loop.time() - started < 5.0  # the Finished cut the 10 s interval short
        assert [[e.seq for e in b] for b in batches] == [[0], [1, 2, 3, 4, 5]]  # type: ignore[attr-defined]
        first = batches[0][0]
        assert isinstance(first, Delta) and first.reasoning == "a"
        assert isinstance(batches[-1][-1], Finished)

    asyncio.run(main())


def test_no_interval_writes_every_wake_up_and_late_readers_replay_at_once() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        registry = GenerationRegistry(loop, ModelMetrics(), 60.0)
        registry.create("r", 3)
        reader = asyncio.create_task(_collect(registry, "r", 0.0))
        await asyncio.sleep(0)
        for text in "ab":
            registry._apply([("r", TokenOutput(text, "", 1))], 0.0)
            await asyncio.sleep(0.001)
        registry._apply([("r", FinalOutput("length", 3, 2))], 0.0)
        batches = await asyncio.wait_for(reader, 5.0)
        assert [[e.seq for e in b] for b in batches] == [[0], [1], [2]]  # type: ignore[attr-defined]
        # A reader re-attaching after the end gets everything after its seq in one batch, interval or not.
        late = await asyncio.wait_for(registry.get("r").follow(0, 10.0).__anext__(), 1.0)
        assert [e.seq for e in late] == [1, 2]

    asyncio.run(main())


def test_wait_finished_times_out_and_leaves_no_waiter_behind() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        registry = GenerationRegistry(loop, ModelMetrics(), 60.0)
        generation = registry.create("r", 3)
        assert await generation.wait_finished(0.01) is None
        assert not generation._final_waiters
        waiting = asyncio.create_task(generation.wait_finished(5.0))
        await asyncio.sleep(0)
        registry._apply([("r", FinalOutput("cancelled", 3, 0))], 0.0)
        finished = await asyncio.wait_for(waiting, 1.0)
        assert finished is not None and finished.finish_reason == "cancelled"

    asyncio.run(main())


def test_engine_steps_queued_behind_a_pending_hop_are_applied_together_in_order() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        registry = GenerationRegistry(loop, ModelMetrics(), 60.0)
        registry.create("r", 3)
        scheduled = 0
        original = loop.call_soon_threadsafe

        def counting(*args: object) -> object:
            nonlocal scheduled
            scheduled += args[0] == registry._apply_pending
            return original(*args)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]

        def engine_thread() -> None:  # three steps before the loop gets to run the first hop
            for text in "abc":
                registry.sink([("r", TokenOutput(text, "", 1))])
            registry.sink([("r", FinalOutput("stop", 3, 3))])

        thread = threading.Thread(target=engine_thread)
        thread.start()
        thread.join()  # blocks the loop: no hop can run before the engine's last step
        finished = await registry.get("r").wait_finished(5.0)
        assert finished is not None and finished.seq == 3
        assert scheduled == 1
        events = registry.get("r").events
        assert [getattr(e, "reasoning", None) for e in events[:3]] == ["a", "b", "c"]

    asyncio.run(main())


# --- finished logs: compact, exact on re-attach, bounded by bytes ------------------------------------------
def _run(registry: GenerationRegistry, rid: str, outputs: list[object]) -> None:
    registry.create(rid, 3)
    for out in outputs:
        registry._apply([(rid, out)], 0.0)  # type: ignore[list-item]


def test_a_compacted_log_gives_exactly_the_events_after_any_seq() -> None:
    async def main() -> None:
        registry = GenerationRegistry(asyncio.get_running_loop(), ModelMetrics(), 60.0)
        outputs: list[object] = [
            TokenOutput("think ", "", 1),
            TokenOutput("", "", 2),  # no text: its tokens travel with the next delta
            TokenOutput("h\u00e9", "", 1),
            TokenOutput("\U0001f600", "an", 1),  # the end of the reasoning and the start of the answer
            TokenOutput("", "swer", 1),
            TokenOutput("", "", 1),
            FinalOutput("length", 3, 7),
        ]
        registry.create("r", 3)
        reader = asyncio.create_task(_collect(registry, "r", 0.0))
        await asyncio.sleep(0)
        for out in outputs[:-1]:
            registry._apply([("r", out)], 0.0)  # type: ignore[list-item]
        live = list(registry.get("r").events)  # before Finished: the running list itself
        registry._apply([("r", outputs[-1])], 0.0)  # type: ignore[list-item]
        streamed = [e for batch in await asyncio.wait_for(reader, 5.0) for e in batch]
        generation = registry.get("r")
        assert generation._compact is not None and not generation._live  # compacted on Finished
        assert streamed[:-1] == live and streamed[-1] == generation.finished
        assert generation.count == len(streamed) == 5
        for after in range(-1, len(streamed)):  # a re-attach at every seq, the Finished one included
            assert generation.events_from(after + 1) == streamed[after + 1 :]
            replayed = [e async for batch in generation.follow(after, 10.0) for e in batch]
            assert replayed == streamed[after + 1 :]

    asyncio.run(main())


def _registry_allocations() -> int:
    """Bytes traced as allocated by the registry's and the protocol's code only: other threads a long test run
    leaves behind (engines, event loops) allocate meanwhile, and the process-wide total would count them."""
    only = [
        tracemalloc.Filter(True, "*services/model/generations.py"),
        tracemalloc.Filter(True, "*services/protocol/*"),
    ]
    return sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces(only).statistics("filename"))


def test_finished_logs_stay_under_the_byte_bound_oldest_evicted_first() -> None:
    async def main() -> None:
        metrics = ModelMetrics()
        bound = 128 * 1024
        registry = GenerationRegistry(asyncio.get_running_loop(), metrics, 600.0, retention_bytes=bound)
        tokens = [TokenOutput(" word", "", 1)] * 150 + [TokenOutput("", " answer", 1)] * 150
        tracemalloc.start()
        try:
            base = _registry_allocations()
            highest = 0
            for i in range(200):  # ~200 x 10 KiB compacted (~200 x 230 KiB as events): 16x the bound
                _run(registry, f"g{i}", [*tokens, FinalOutput("length", 3, 300)])
                highest = max(highest, registry.retained_bytes)
            held = _registry_allocations() - base
        finally:
            tracemalloc.stop()
        assert 0.9 * bound < highest <= bound
        assert held < bound * 1.25, held  # what is really allocated, not only what is accounted
        kept = len(registry)
        assert 5 < kept < 200
        assert all(f"g{i}" in registry._generations for i in range(200 - kept, 200))  # the newest kept
        with pytest.raises(NotFound):
            registry.get("g0")
        assert metrics.retained_bytes._value.get() == registry.retained_bytes

    asyncio.run(main())


def test_the_sweep_forgets_by_age_and_keeps_the_byte_count() -> None:
    async def main() -> None:
        now = [0.0]
        registry = GenerationRegistry(asyncio.get_running_loop(), ModelMetrics(), 10.0, clock=lambda: now[0])
        for i, at in enumerate((1.0, 2.0, 30.0)):
            registry.create(f"s{i}", 3)
            registry._apply([(f"s{i}", TokenOutput("x", "", 1)), (f"s{i}", FinalOutput("stop", 3, 1))], at)
        registry.create("running", 3)
        now[0] = 15.0
        assert registry.sweep() == 2
        assert sorted(registry._generations) == ["running", "s2"]
        assert registry.retained_bytes == registry.get("s2").compact()

    asyncio.run(main())
