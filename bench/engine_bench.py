"""(a) The raw engine: the project's ``HFEngine`` (processor + step-level batching scheduler) in-process.

No HTTP: each request is prepared (chat template, image processing) and submitted exactly as the model
service does it, and its outputs come back through the engine's sink, hopped onto the event loop once per
scheduler step. This is the ceiling the full stack is compared against.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import RequestRecord, next_id
from bench.steps import StepTally, StepTotals
from bench.workload import Workload


@dataclass(slots=True)
class _Pending:
    record: RequestRecord
    done: asyncio.Future[None]


class EngineClient:
    """Sends workload requests to an in-process engine and records what a client would see."""

    def __init__(self, engine: Any, workload: Workload, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._workload = workload
        self._loop = loop
        self._pending: dict[str, _Pending] = {}

    def sink(self, outputs: Sequence[tuple[str, Any]]) -> None:
        """Engine thread -> event loop, once per step (as the model service's registry does)."""
        now = time.perf_counter()
        self._loop.call_soon_threadsafe(self._dispatch, list(outputs), now)

    def _dispatch(self, outputs: list[tuple[str, Any]], now: float) -> None:
        from services.model.engine.base import FinalOutput

        for request_id, out in outputs:
            pending = self._pending.get(request_id)
            if pending is None:
                continue
            rec = pending.record
            if isinstance(out, FinalOutput):
                rec.end = now
                rec.completion_tokens = out.completion_tokens
                rec.prompt_tokens = out.prompt_tokens
                if out.finish_reason not in ("stop", "length"):
                    rec.error = f"{out.finish_reason}: {out.error}"
                del self._pending[request_id]
                pending.done.set_result(None)
            elif out.reasoning or out.content:
                rec.chunks += 1
                if rec.first_token is None:
                    rec.first_token = now

    async def send(self, index: int) -> RequestRecord:
        rec = RequestRecord(start=time.perf_counter())
        request_id = next_id("raw")
        try:
            prepared = await self._engine.prepare(
                self._workload.generate_request(self._workload.request(index), request_id)
            )
            pending = _Pending(rec, self._loop.create_future())
            self._pending[request_id] = pending
            self._engine.submit(prepared)
            await pending.done
        except Exception as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
            rec.end = time.perf_counter()
            self._pending.pop(request_id, None)
        return rec


def load_engine(model_dir: Path, torch_threads: int | None = None, observer: Any = None) -> Any:
    """The HF engine exactly as ``services.model`` builds it (ENGINE=hf, the same settings defaults);
    ``observer``: an ``EngineObserver`` (the model service passes its metrics)."""
    from services.model.engine.hf import HFEngine
    from services.model.loading import load_model_and_processor
    from services.model.settings import ModelSettings

    settings = ModelSettings(model_repo_id=str(model_dir), torch_threads=torch_threads or 0)
    return HFEngine(load_model_and_processor(settings), settings, observer)


class RawEngine:
    """The in-process engine as a benchmark target: ``start``, ``send`` (one request), ``stop``."""

    def __init__(self, model_dir: Path, workload: Workload, torch_threads: int | None = None) -> None:
        self._model_dir = model_dir
        self._workload = workload
        self._torch_threads = torch_threads
        self._engine: Any = None
        self._client: EngineClient | None = None
        self._tally = StepTally()

    async def start(self) -> None:
        self._engine = await asyncio.to_thread(load_engine, self._model_dir, self._torch_threads, self._tally)
        self._client = EngineClient(self._engine, self._workload, asyncio.get_running_loop())
        self._engine.start(self._client.sink)

    async def send(self, index: int) -> RequestRecord:
        assert self._client is not None, "start() first"
        return await self._client.send(index)

    def steps(self) -> StepTotals:
        """The engine's step totals so far (see ``bench.steps``)."""
        return self._tally.totals()

    async def stop(self) -> None:
        if self._engine is not None:
            await asyncio.to_thread(self._engine.shutdown, 5.0)
            self._engine = None
