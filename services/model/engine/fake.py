"""A deterministic engine without torch, for fast tests of both services: the admission core plus a fake step.

Queue, capacity, cancel, drain and the duplicate rule are the real engine's (``admission.py``); the step
advances up to ``max_batch_size`` rows together, one token per row per step, with ONE sink call per step;
``max_tokens`` -> "length", stop strings -> "stop" (text cut before the match, possible prefixes held back),
usage counts and one ``FinalOutput`` per request; a row whose own step raises fails alone ("error"), the
others go on. The text itself comes from ``fake_text.py`` (prompt words, seed, test directives).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from services.model.engine import fake_text
from services.model.engine.admission import AdmissionQueue
from services.model.engine.base import (
    Admitted,
    EngineObserver,
    EngineStats,
    FinalOutput,
    Output,
    OutputSink,
    Prepared,
)
from services.model.engine.fake_structured import pieces, structured_answer
from services.model.multimodal.limits import MediaLimits, check_media_counts, check_media_options
from services.model.settings import ModelSettings
from services.protocol.errors import PromptTooLong
from services.protocol.generate import GenerateRequest, SamplingParams

log = logging.getLogger(__name__)


class FakeEngine:
    """The Engine protocol with a word generator instead of a model."""

    def __init__(
        self,
        settings: ModelSettings,
        observer: EngineObserver | None = None,
        step_seconds: float | None = None,
    ) -> None:
        """``step_seconds``: the least wall time of one step (default ``FAKE_STEP_SECONDS``)."""
        self.model_id = settings.model_repo_id
        self.max_batch_size = settings.max_batch_size
        self.failure: str | None = None  # an in-thread engine never dies on its own
        self._settings = settings
        self._observer = observer
        self._step_seconds = settings.fake_step_seconds if step_seconds is None else step_seconds
        self.admission: AdmissionQueue[Prepared] = AdmissionQueue(settings.max_batch_size, settings.max_queue)
        self._rows: list[fake_text.FakeRow] = []  # the engine thread's
        self._sink: OutputSink | None = None

    # --- Engine protocol ----------------------------------------------------------------------------
    def watch(self, on_exit: Callable[[str], None]) -> None:
        """Nothing to watch: the engine lives as long as this process."""

    def start(self, sink: OutputSink) -> None:
        self._sink = sink
        self.admission.start(self._step, "fake-engine")

    async def admit(self, request: GenerateRequest) -> Admitted:
        self.admission.reserve(request.request_id)
        try:
            prepared = await self.prepare(request)
            self.admission.enqueue(prepared)
        except BaseException:
            self.admission.release(request.request_id)
            raise
        return Admitted(request.request_id, prepared.prompt_tokens)

    async def prepare(self, request: GenerateRequest) -> Prepared:
        """Prepare only (tests): media counts and base64, the prompt's words, sampling defaults."""
        await asyncio.sleep(0)  # a real engine does this in a worker thread; keep the await point
        limits = MediaLimits.from_settings(self._settings)
        check_media_counts(request.messages, limits)
        check_media_options(request.media, limits)
        text, media_tokens = fake_text.render(request.messages)
        prompt_tokens = len(text.split()) + media_tokens
        sampling = self._resolve_sampling(request.sampling, prompt_tokens)
        inputs = fake_text.fake_inputs(text, sampling.seed)
        answer = structured_answer(request, text, random.Random(f"{sampling.seed}\x00{text}"))
        if answer is not None:
            inputs.answer = pieces(answer)
        inputs.reasoning_budget = sampling.max_reasoning_tokens
        return Prepared(request.request_id, sampling, prompt_tokens, inputs, grammar=answer)

    def submit(self, prepared: Prepared) -> None:
        """Queue a prepared request (tests): reserve and enqueue in one."""
        self.admission.submit(prepared)

    def cancel(self, request_id: str) -> bool:
        return self.admission.cancel(request_id)

    def stats(self) -> EngineStats:
        return self.admission.stats()

    def shutdown(self, grace_seconds: float) -> None:
        self.admission.shutdown(grace_seconds)

    # --- preparation helpers ------------------------------------------------------------------------
    def _resolve_sampling(self, sampling: SamplingParams, prompt_tokens: int) -> SamplingParams:
        context = self._settings.fake_context_tokens
        if prompt_tokens >= context:
            raise PromptTooLong(f"prompt has {prompt_tokens} tokens; the context holds {context}")
        max_tokens = sampling.max_tokens
        if max_tokens is None:
            max_tokens = min(self._settings.max_tokens, context - prompt_tokens)
        elif prompt_tokens + max_tokens > context:
            raise PromptTooLong(
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) "
                f"exceeds the context ({context} tokens)"
            )
        temperature = sampling.temperature
        if temperature is None:
            temperature = self._settings.temperature if self._settings.temperature is not None else 0.8
        return sampling.model_copy(
            update={
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": 0.95 if sampling.top_p is None else sampling.top_p,
                "top_k": 20 if sampling.top_k is None else sampling.top_k,
            }
        )

    # --- the engine thread --------------------------------------------------------------------------
    def _step(self) -> None:
        """Cancels, then queued requests into free slots, then one token for every row; one sink call."""
        started = time.perf_counter()
        outputs = self._take_cancelled()
        prefill = self._admit()
        batch = sum(not r.done for r in self._rows)
        try:
            self._advance_rows(outputs)
        except Exception as exc:  # a fault outside any one row (an observer): every row gets its error
            log.exception("fake engine step failed")
            for row in [r for r in self._rows if not r.done]:
                row.done = True
                outputs.append((row.request_id, fake_text.final(row, "error", str(exc))))
        self._retire(outputs)
        if self._observer is not None and batch:
            self._observer.on_step(batch, time.perf_counter() - started, prefill)
        if outputs and self._sink is not None:
            self._sink(outputs)
        self.admission.pause(self._step_seconds - (time.perf_counter() - started))

    def _take_cancelled(self) -> list[tuple[str, Output]]:
        dropped, cancels = self.admission.take_cancels()
        out: list[tuple[str, Output]] = [
            (p.request_id, FinalOutput("cancelled", p.prompt_tokens, 0)) for p in dropped
        ]
        for row in self._rows:
            if row.request_id in cancels and not row.done:
                out.extend(fake_text.finish(row, "cancelled"))
        return out

    def _admit(self) -> int:
        """Queued requests into free batch slots; returns their prefill tokens."""
        prefill = 0
        while len(self._rows) < self.max_batch_size and (popped := self.admission.pop()) is not None:
            prepared, queued_at = popped
            self._rows.append(fake_text.new_row(prepared, queued_at))
            prefill += prepared.prompt_tokens
        return prefill

    def _advance_rows(self, outputs: list[tuple[str, Output]]) -> None:
        """One token for every row, appended to ``outputs`` as they come (so that a later fault cannot lose
        them); a row whose own step raises fails alone (as in the real engine)."""
        for row in [r for r in self._rows if not r.done]:
            first = row.generated == 0
            try:
                outputs.extend(fake_text.advance(row))
            except Exception as exc:
                log.exception("fake engine step of %s failed", row.request_id)
                row.done = True
                outputs.append((row.request_id, fake_text.final(row, "error", f"generation failed: {exc}")))
                continue
            if first and self._observer is not None:
                self._observer.on_first_token(row.request_id, time.perf_counter() - row.submitted_at)

    def _retire(self, outputs: list[tuple[str, Output]]) -> None:
        """Forget the requests that end in this step (before the sink sees them end)."""
        self._rows = [r for r in self._rows if not r.done]
        for request_id, out in outputs:
            if isinstance(out, FinalOutput):
                self.admission.finish(request_id)
                if self._observer is not None:
                    self._observer.on_finish(request_id, out.finish_reason, out.completion_tokens)
