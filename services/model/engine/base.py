"""The small Engine protocol that the internal HTTP API talks to.

Whatever runs the model (the HF step-level batching scheduler, or the deterministic fake for fast tests)
implements this. The engine never sees HTTP; the routes never see tensors.

Threading: ``prepare`` is awaited on the event loop and does its CPU work (media decoding, chat template,
processor) in a worker thread. ``submit``/``cancel``/``stats`` are cheap and thread-safe. The engine's own
thread drives the model and reports outputs through the ``OutputSink`` given at ``start``, once per
scheduler step with every row's output of that step (one hop to the event loop per step, not per token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from services.protocol.generate import GenerateRequest, SamplingParams


@dataclass(slots=True)
class TokenOutput:
    """Text produced for one request in one step (either field may be empty, e.g. a held-back partial
    UTF-8 character or a possible stop-string prefix). ``tokens`` counts generated tokens it covers."""

    reasoning: str
    content: str
    tokens: int


@dataclass(slots=True)
class FinalOutput:
    """The last output of a request: always exactly one per submitted request."""

    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Output = TokenOutput | FinalOutput
OutputSink = Callable[[Sequence[tuple[str, Output]]], None]
"""Called from the engine thread with ``[(request_id, output), ...]`` for one step."""


@dataclass(slots=True)
class Prepared:
    """A validated request, ready for the scheduler: tokenized prompt, media tensors, resolved sampling."""

    request_id: str
    sampling: SamplingParams  # defaults resolved: max_tokens, temperature, top_p, top_k set
    prompt_tokens: int
    inputs: Any = None  # engine-specific (processor output for hf, prompt text for fake)


@dataclass(slots=True)
class EngineStats:
    running: int
    queued: int


class Engine(Protocol):
    model_id: str
    max_batch_size: int

    def start(self, sink: OutputSink) -> None:
        """Start the engine thread (after weights are loaded)."""

    async def prepare(self, request: GenerateRequest) -> Prepared:
        """Decode media, render the chat template, tokenize, check the context length.

        Raises ``InvalidRequest`` / ``InvalidMedia`` / ``PromptTooLong`` from services.protocol.errors.
        """

    def submit(self, prepared: Prepared) -> None:
        """Queue for generation. Raises ``Overloaded`` at once when the queue is full,
        ``NotReady`` once shutdown began."""

    def cancel(self, request_id: str) -> bool:
        """Stop the request within one decode step (or drop it from the queue); its ``FinalOutput``
        with ``finish_reason="cancelled"`` follows through the sink. False when not queued or running."""

    def stats(self) -> EngineStats: ...

    def shutdown(self, grace_seconds: float) -> None:
        """Stop admitting; let running requests finish for up to ``grace_seconds``, then cancel the rest
        (each still gets its FinalOutput); then stop the thread. Blocking; call off the event loop."""
