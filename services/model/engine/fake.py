"""A deterministic engine without torch, for fast tests of both services.

It keeps the real engine's contract: a bounded queue (``Overloaded`` at once), up to ``max_batch_size`` rows
advanced together each step with ONE sink call per step, one token per row per step, ``max_tokens`` ->
"length", stop strings -> "stop" (text cut before the match, possible prefixes held back), cancel within a
step, ``shutdown(grace)``, usage counts and one ``FinalOutput`` per request; a row whose own step raises
fails alone ("error"), the others go on.

Prompt "tokens" are the words of the rendered messages (each image counts 64, each video 128). The output is
derived from the prompt text and the seed only: some reasoning words, ``</think>`` (one token, no text), then
answer words, then end of sequence ("stop"). Stop strings apply to the answer only, as in the real engine.
Directives anywhere in the prompt, for tests:

- ``[[fake:tokens=N]]``  N text tokens (``</think>`` included) before the end-of-sequence token, instead
                         of 14-44; completion_tokens is then N + 1 (EOS counts, as with the real model)
- ``[[fake:error]]``     fail with finish_reason "error" after three tokens
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from services.model.engine.base import EngineStats, FinalOutput, Output, OutputSink, Prepared, TokenOutput
from services.model.multimodal.limits import MediaLimits, check_media_counts
from services.model.settings import ModelSettings
from services.protocol.errors import Conflict, InvalidMedia, NotReady, Overloaded, PromptTooLong
from services.protocol.generate import GenerateRequest, ImagePart, Message, SamplingParams, TextPart

log = logging.getLogger(__name__)

THINK_END = "</think>"
IMAGE_TOKENS = 64
VIDEO_TOKENS = 128
ERROR_AFTER_TOKENS = 3
_WORDS = (
    "the cat sits on a warm mat while light falls through an open window and the room stays quiet",
    "a small dog waits by the door for someone to come home with bread and milk after the rain stops",
)
_VOCAB = " ".join(_WORDS).split()
_TOKENS_DIRECTIVE = re.compile(r"\[\[fake:tokens=(\d+)\]\]")


class StepObserver(Protocol):
    """The scheduler's metrics hooks (see engine/scheduler.py), called from the engine thread."""

    def on_step(self, batch_size: int, seconds: float, prefill_tokens: int) -> None: ...
    def on_first_token(self, request_id: str, seconds: float) -> None: ...
    def on_finish(self, request_id: str, finish_reason: str, completion_tokens: int) -> None: ...


@dataclass(slots=True)
class FakeInputs:
    text: str
    fail: bool
    length: int


@dataclass(slots=True)
class _Row:
    prepared: Prepared
    submitted_at: float
    words: Iterator[str]
    stops: list[str]
    text: str = ""  # everything generated so far, the </think> marker included
    emitted: int = 0  # how much of ``text`` went out already
    generated: int = 0
    unreported: int = 0  # tokens not yet accounted for in a TokenOutput
    done: bool = False

    @property
    def request_id(self) -> str:
        return self.prepared.request_id


class FakeEngine:
    """The Engine protocol with a word generator instead of a model."""

    def __init__(
        self,
        settings: ModelSettings,
        observer: StepObserver | None = None,
        step_seconds: float | None = None,
    ) -> None:
        self.model_id = settings.model_repo_id
        self.max_batch_size = settings.max_batch_size
        self._settings = settings
        self._observer = observer
        self._step_seconds = settings.fake_step_seconds if step_seconds is None else step_seconds
        self._cond = threading.Condition()
        self._queue: deque[Prepared] = deque()
        self._running_ids: set[str] = set()  # guarded by _cond; the rows themselves belong to the thread
        self._submitted_at: dict[str, float] = {}  # queued request -> submit time
        self._to_cancel: set[str] = set()
        self._admitting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sink: OutputSink | None = None

    # --- Engine protocol ----------------------------------------------------------------------------
    def start(self, sink: OutputSink) -> None:
        self._sink = sink
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
        self._thread.start()

    async def prepare(self, request: GenerateRequest) -> Prepared:
        await asyncio.sleep(0)  # a real engine does this in a worker thread; keep the await point
        check_media_counts(request.messages, MediaLimits.from_settings(self._settings))
        text, media_tokens = _render(request.messages)
        prompt_tokens = len(text.split()) + media_tokens
        sampling = self._resolve_sampling(request.sampling, prompt_tokens)
        match = _TOKENS_DIRECTIVE.search(text)
        length = int(match.group(1)) if match else _natural_length(text, sampling.seed)
        inputs = FakeInputs(text=text, fail="[[fake:error]]" in text, length=max(1, length))
        return Prepared(request.request_id, sampling, prompt_tokens, inputs)

    def submit(self, prepared: Prepared) -> None:
        with self._cond:
            if not self._admitting:
                raise NotReady("shutting down")
            rid = prepared.request_id
            if rid in self._running_ids or rid in self._submitted_at:
                raise Conflict(f"request {rid!r} is already queued or running")
            in_flight = len(self._queue) + len(self._running_ids)
            if in_flight >= self.max_batch_size + self._settings.max_queue:
                raise Overloaded(f"queue full ({self._settings.max_queue} waiting)")
            self._queue.append(prepared)
            self._submitted_at[rid] = time.monotonic()
            self._cond.notify_all()

    def cancel(self, request_id: str) -> bool:
        with self._cond:
            known = request_id in self._running_ids or request_id in self._submitted_at
            if not known or request_id in self._to_cancel:
                return False
            self._to_cancel.add(request_id)
            self._cond.notify_all()
            return True

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(running=len(self._running_ids), queued=len(self._queue))

    def shutdown(self, grace_seconds: float) -> None:
        deadline = time.monotonic() + grace_seconds
        with self._cond:
            self._admitting = False
            while (self._queue or self._running_ids) and self._thread is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._to_cancel.update(p.request_id for p in self._queue)
            self._to_cancel.update(self._running_ids)
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

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
    def _loop(self) -> None:
        rows: list[_Row] = []
        while True:
            with self._cond:
                while not (self._queue or rows or self._to_cancel or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self._queue or rows or self._to_cancel):
                    return
                started = time.monotonic()
                outputs = self._take_cancelled(rows)
                prefill = self._admit(rows)
            batch = len(rows)
            try:
                self._step(rows, outputs)
            except Exception as exc:  # a fault outside any one row (an observer): every row gets its error
                log.exception("fake engine step failed")
                for row in [r for r in rows if not r.done]:
                    row.done = True
                    outputs.append((row.request_id, _final(row, "error", str(exc))))
            self._retire(rows)
            self._report(outputs, started, batch, prefill)
            self._pace(started)

    def _take_cancelled(self, rows: list[_Row]) -> list[tuple[str, Output]]:
        """Called with the lock held: drop cancelled rows and queued requests."""
        out: list[tuple[str, Output]] = []
        if not self._to_cancel:
            return out
        for row in [r for r in rows if r.request_id in self._to_cancel]:
            rows.remove(row)
            out.extend(_finish(row, "cancelled"))
            self._running_ids.discard(row.request_id)
        for prepared in [p for p in self._queue if p.request_id in self._to_cancel]:
            self._queue.remove(prepared)
            self._submitted_at.pop(prepared.request_id, None)
            out.append((prepared.request_id, FinalOutput("cancelled", prepared.prompt_tokens, 0)))
        self._to_cancel.clear()
        self._cond.notify_all()  # shutdown() waits for rows to leave
        return out

    def _admit(self, rows: list[_Row]) -> int:
        """Called with the lock held: move queued requests into free batch slots. Returns prefill tokens."""
        prefill = 0
        while self._queue and len(rows) < self.max_batch_size:
            prepared = self._queue.popleft()
            rows.append(_new_row(prepared, self._submitted_at.pop(prepared.request_id)))
            self._running_ids.add(prepared.request_id)
            prefill += prepared.prompt_tokens
        return prefill

    def _step(self, rows: list[_Row], outputs: list[tuple[str, Output]]) -> None:
        """One token for every row, appended to ``outputs`` as they come (so that a later fault cannot lose
        them); a row whose own step raises fails alone (as in the real engine)."""
        for row in rows:
            first = row.generated == 0
            try:
                outputs.extend(_advance(row))
            except Exception as exc:
                log.exception("fake engine step of %s failed", row.request_id)
                row.done = True
                outputs.append((row.request_id, _final(row, "error", f"generation failed: {exc}")))
                continue
            if first and self._observer is not None:
                self._observer.on_first_token(row.request_id, time.monotonic() - row.submitted_at)

    def _retire(self, rows: list[_Row]) -> None:
        rows[:] = [r for r in rows if not r.done]
        with self._cond:
            self._running_ids.intersection_update(r.request_id for r in rows)
            self._cond.notify_all()  # shutdown() waits for rows to leave

    def _report(self, outputs: list[tuple[str, Output]], started: float, batch: int, prefill: int) -> None:
        if outputs and self._sink is not None:
            self._sink(outputs)
        if self._observer is None:
            return
        if batch:
            self._observer.on_step(batch, time.monotonic() - started, prefill)
        for request_id, out in outputs:
            if isinstance(out, FinalOutput):
                self._observer.on_finish(request_id, out.finish_reason, out.completion_tokens)

    def _pace(self, started: float) -> None:
        left = self._step_seconds - (time.monotonic() - started)
        if left > 0:
            with self._cond:
                # shutdown wakes us; cancel need not (it is handled at the next step anyway)
                if not self._stopping:
                    self._cond.wait(left)


# --- rows: generation, stop strings, outputs -----------------------------------------------------------
def _new_row(prepared: Prepared, submitted_at: float) -> _Row:
    inputs: FakeInputs = prepared.inputs
    words = _words(inputs.text, prepared.sampling.seed, inputs.length)
    stops = [s for s in prepared.sampling.stop if s]
    return _Row(prepared=prepared, submitted_at=submitted_at, words=words, stops=stops)


def _advance(row: _Row) -> list[tuple[str, Output]]:
    """Generate one token: this step's outputs for the row, its FinalOutput last when it ends."""
    inputs: FakeInputs = row.prepared.inputs
    if inputs.fail and row.generated >= ERROR_AFTER_TOKENS:
        return _finish(row, "error", "fake engine failure")
    word = next(row.words, None)
    row.generated += 1
    row.unreported += 1
    if word is None:  # end of sequence: the EOS token counts, like the real model's <|im_end|>
        return _finish(row, "stop")
    row.text += word
    content_start = _content_start(row.text)
    cut = _first_stop(row.text, row.stops, content_start, row.emitted)
    if cut is not None:
        row.text = row.text[:cut]
        return _finish(row, "stop")
    if row.generated >= row.prepared.sampling.max_tokens:
        return _finish(row, "length")
    upto = len(row.text) - _held_back(row.text[content_start:], row.stops)
    if upto <= row.emitted and not row.unreported:
        return []
    return [(row.request_id, _output(row, upto))]


def _finish(row: _Row, reason: str, error: str | None = None) -> list[tuple[str, Output]]:
    """Flush held-back text (and unreported tokens), then the FinalOutput."""
    row.done = True
    out: list[tuple[str, Output]] = []
    if row.emitted < len(row.text) or row.unreported:
        out.append((row.request_id, _output(row, len(row.text))))
    out.append((row.request_id, _final(row, reason, error)))
    return out


def _output(row: _Row, upto: int) -> TokenOutput:
    """The text between what was emitted and ``upto``, split around the ``</think>`` marker."""
    start, row.emitted = row.emitted, max(row.emitted, upto)
    marker = row.text.find(THINK_END)
    if marker < 0:
        reasoning, content = row.text[start : row.emitted], ""
    else:
        reasoning = row.text[start : min(row.emitted, marker)]
        content = row.text[max(start, marker + len(THINK_END)) : row.emitted]
    tokens, row.unreported = row.unreported, 0
    return TokenOutput(reasoning=reasoning, content=content, tokens=tokens)


def _final(row: _Row, reason: str, error: str | None = None) -> FinalOutput:
    return FinalOutput(reason, row.prepared.prompt_tokens, row.generated, error)


def _content_start(text: str) -> int:
    """Where the answer begins (after ``</think>``); the end of the text while still reasoning."""
    marker = text.find(THINK_END)
    return len(text) if marker < 0 else marker + len(THINK_END)


def _first_stop(text: str, stops: list[str], content_start: int, emitted: int) -> int | None:
    """Earliest start of a stop string in the answer, searching only what could not match before.

    Like the real engine, stop strings apply to the answer only: reasoning routinely contains them."""
    best: int | None = None
    for stop in stops:
        idx = text.find(stop, max(content_start, emitted - len(stop) + 1))
        if idx >= 0 and (best is None or idx < best):
            best = idx
    return best


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


# --- prompt and output text ----------------------------------------------------------------------------
def _render(messages: list[Message]) -> tuple[str, int]:
    """The chat-template-like prompt text and the media token count; media must be valid base64."""
    lines: list[str] = []
    media_tokens = 0
    for message in messages:
        parts = [TextPart(text=message.content)] if isinstance(message.content, str) else message.content
        pieces: list[str] = []
        for part in parts:
            if isinstance(part, TextPart):
                pieces.append(part.text)
                continue
            _check_base64(part.data, part.type)
            is_image = isinstance(part, ImagePart)
            media_tokens += IMAGE_TOKENS if is_image else VIDEO_TOKENS
            pieces.append("<image>" if is_image else "<video>")
        lines.append(f"<|im_start|>{message.role}\n{' '.join(pieces)}<|im_end|>")
    lines.append("<|im_start|>assistant\n<think>\n")
    return "\n".join(lines), media_tokens


def _check_base64(data: str, kind: str) -> None:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidMedia(f"{kind} data is not valid base64") from exc
    if not raw:
        raise InvalidMedia(f"{kind} data is empty")


def _rng(text: str, seed: int | None) -> random.Random:
    # surrogatepass: a lone surrogate in a prompt (valid JSON) must not fail the row.
    digest = hashlib.blake2b(f"{seed}\x00{text}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _natural_length(text: str, seed: int | None) -> int:
    rng = _rng(text, seed)
    return rng.randint(8, 24) + 1 + rng.randint(5, 19)


def _words(text: str, seed: int | None, length: int) -> Iterator[str]:
    """``length`` tokens: reasoning words, ``</think>``, then answer words ending with a full stop."""
    rng = _rng(text, seed)
    thinking = max(0, (length - 1) // 2)
    for i in range(thinking):
        yield ("" if i == 0 else " ") + rng.choice(_VOCAB)
    if length > thinking:
        yield THINK_END
    answer = length - thinking - 1
    for i in range(answer):
        word = rng.choice(_VOCAB)
        if i == 0:
            yield "\n\n" + word.capitalize()
        else:
            yield " " + word + ("." if i == answer - 1 else "")
