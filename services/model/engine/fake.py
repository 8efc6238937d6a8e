"""A deterministic engine without torch, for fast tests of both services: the admission core plus a fake step.

Queue, capacity, cancel, drain and the duplicate rule are the real engine's (``admission.py``); the step
advances up to ``max_batch_size`` rows together, one token per row per step, with ONE sink call per step;
``max_tokens`` -> "length", stop strings -> "stop" (text cut before the match, possible prefixes held back),
usage counts and one ``FinalOutput`` per request; a row whose own step raises fails alone ("error"), the
others go on. The text itself comes from ``fake_text.py`` (prompt words, seed, test directives).
A request with ``n`` > 1 starts once its ``n`` rows fit the batch, "prefilled" once (``on_step``'s
``prefills``), and runs as ``n`` rows (choice i's words from ``choice_seed(seed, i)``) whose ends become
choice ends and one ``FinalOutput`` (``choices.ChoiceGroup``), as in the real engine.
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
    TokenOutput,
)
from services.model.engine.choices import ChoiceGroup
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
        self.admission.reserve(request.request_id, request.sampling.n)
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
        prefill, prefills = self._admit()
        batch = sum(not r.done for r in self._rows)
        try:
            self._advance_rows(outputs)
        except Exception as exc:  # a fault outside any one row (an observer): every row gets its error
            log.exception("fake engine step failed")
            for row in [r for r in self._rows if not r.done]:
                row.done = True
                outputs.extend(_ended(row, [(row.request_id, fake_text.final(row, "error", str(exc)))]))
        self._retire(outputs)
        if self._observer is not None and batch:
            self._observer.on_step(batch, time.perf_counter() - started, prefill, prefills=prefills)
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
                out.extend(_ended(row, fake_text.finish(row, "cancelled")))
        return out

    def _admit(self) -> tuple[int, int]:
        """Queued requests into free batch slots (all ``n`` rows of one at once); returns their prefill
        tokens and how many requests were "prefilled"."""
        prefill = prefills = 0
        while (nxt := self.admission.peek()) is not None:
            if len(self._rows) + nxt.rows > self.max_batch_size:
                break  # its n rows wait for free slots
            popped = self.admission.pop()
            assert popped is not None and popped[0] is nxt  # only this thread takes from the queue
            prepared, queued_at = popped
            group = ChoiceGroup(prepared.request_id, prepared.rows, prepared.prompt_tokens)
            for index in range(prepared.rows):
                row = fake_text.new_row(prepared, queued_at, index)
                row.group = group
                self._rows.append(row)
            prefill += prepared.prompt_tokens
            prefills += 1
        return prefill, prefills

    def _advance_rows(self, outputs: list[tuple[str, Output]]) -> None:
        """One token for every row, appended to ``outputs`` as they come (so that a later fault cannot lose
        them); a row whose own step raises fails alone (as in the real engine)."""
        for row in [r for r in self._rows if not r.done]:
            first = row.generated == 0
            try:
                outputs.extend(_ended(row, fake_text.advance(row)))
            except Exception as exc:
                log.exception("fake engine step of %s failed", row.request_id)
                row.done = True
                failed = [(row.request_id, fake_text.final(row, "error", f"generation failed: {exc}"))]
                outputs.extend(_ended(row, failed))
            if row.done and row.group is not None and row.group.reasons.get(row.index) == "error":
                outputs.extend(self._fail_siblings(row))
            if first and row.index == 0 and self._observer is not None:
                self._observer.on_first_token(row.request_id, time.perf_counter() - row.submitted_at)

    def _fail_siblings(self, row: fake_text.FakeRow) -> list[tuple[str, Output]]:
        """One choice failed: the request fails as a whole (its other running choices end with "error")."""
        out: list[tuple[str, Output]] = []
        for other in self._rows:
            if other.request_id == row.request_id and not other.done:
                other.done = True
                failed = [(other.request_id, fake_text.final(other, "error", "another choice failed"))]
                out.extend(_ended(other, failed))
        return out

    def _retire(self, outputs: list[tuple[str, Output]]) -> None:
        """Forget the requests that end in this step (before the sink sees them end)."""
        self._rows = [r for r in self._rows if not r.done]
        for request_id, out in outputs:
            if isinstance(out, FinalOutput):
                self.admission.finish(request_id)
                if self._observer is not None:
                    self._observer.on_finish(request_id, out.finish_reason, out.completion_tokens)


def _ended(row: fake_text.FakeRow, outputs: list[tuple[str, Output]]) -> list[tuple[str, Output]]:
    """A row's outputs as its request's: text tagged with the row's choice index, and its row-level
    ``FinalOutput`` (if it ended) turned into its choice's end (``ChoiceGroup.end``: for ``n`` = 1 the
    request's ``FinalOutput`` itself)."""
    out: list[tuple[str, Output]] = []
    for request_id, output in outputs:
        if isinstance(output, TokenOutput):
            output.index = row.index
            out.append((request_id, output))
        elif row.group is None:
            out.append((request_id, output))
        else:
            end = row.group.end(row.index, output.finish_reason, output.completion_tokens, output.error)
            out.extend(end)
    return out
