"""The registry's event log readers: wake-ups and the least time between two writes (STREAM_INTERVAL_MS)."""

from __future__ import annotations

import asyncio
import threading

from services.model.engine.base import FinalOutput, TokenOutput
from services.model.generations import GenerationRegistry
from services.model.metrics import ModelMetrics
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
