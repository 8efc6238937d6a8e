"""The typed messages between ``ProcessEngine`` (parent) and its engine process (child), one pipe.

parent -> child (``ToChild``):
    ``Admit(request)``        count, prepare and queue a request: answered by ``Admitted`` or ``Refused``
    ``Cancel(request_id)``    stop it (its FinalOutput comes with a ``StepReport``)
    ``Shutdown(grace)``       drain: answered by ``Drained`` once every request has its FinalOutput

child -> parent (``ToParent``):
    ``Ready(model_id)`` or ``LoadFailed(type_name, message)``, once at start
    ``Admitted(request_id, prompt_tokens)`` / ``Refused(request_id, type_name, message)``, once per Admit
    ``StepReport``            ONE per scheduler step with outputs: all rows' outputs (packed), the step
                              timings since the last report, first tokens, the child's running/queued
                              count and, at most once a second, its memory
    ``Drained()``

Nothing but these classes crosses the pipe (pickled). Outputs travel packed as plain tuples with a kind tag
(``pack_outputs``/``StepReport.outputs``): a tuple pickles ~6x faster than a dataclass per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.model.engine.base import (
    Admitted,
    FinalOutput,
    KVCacheStats,
    MediaCacheStats,
    MemoryRows,
    Output,
    TokenLogprobs,
    TokenOutput,
)
from services.protocol.generate import GenerateRequest

__all__ = ["Admitted"]  # re-exported: the same value is the child's answer and admit's result

_TOKEN, _FINAL = 0, 1
PackedOutput = tuple[str, int, str | int, str | int, int, str | None, TokenLogprobs | int | None, int | str]
"""``(request_id, 0, reasoning, content, tokens, finish_reason, logprobs, index)`` (the choice's index
and, n > 1 only, its finish reason) or
``(request_id, 1, finish_reason, prompt_tokens, completion_tokens, error, cached_tokens, error_code)``."""


# ---- parent -> child --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Admit:
    request: GenerateRequest


@dataclass(frozen=True, slots=True)
class Cancel:
    request_id: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    grace_seconds: float


ToChild = Admit | Cancel | Shutdown


# ---- child -> parent --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready:
    model_id: str


@dataclass(frozen=True, slots=True)
class LoadFailed:
    type_name: str
    message: str


@dataclass(frozen=True, slots=True)
class Refused:
    """An Admit that failed: the typed error (``services.protocol.errors``) by name, and its message."""

    request_id: str
    type_name: str
    message: str


@dataclass(frozen=True, slots=True)
class StepTiming:
    """One step's ``EngineObserver.on_step`` arguments: rows, wall seconds, prefill budget units,
    prompts prefilled."""

    batch_size: int
    seconds: float
    prefill_tokens: int
    prefills: int = 0


@dataclass(slots=True)
class StepReport:
    """Everything one scheduler step tells the parent, in one message."""

    packed: list[PackedOutput] = field(default_factory=list)
    timings: list[StepTiming] = field(default_factory=list)  # steps since the last report (usually one)
    first_tokens: list[tuple[str, float]] = field(default_factory=list)  # (request_id, seconds)
    running: int = 0
    queued: int = 0
    memory: MemoryRows | None = None
    kv_cache: KVCacheStats | None = None  # the latest, when it changed since the last report
    media_cache: MediaCacheStats | None = None  # the latest, when it changed since the last report

    def outputs(self) -> list[tuple[str, Output]]:
        """The step's outputs as the sink takes them, in their order."""
        return [_unpack(p) for p in self.packed]


@dataclass(frozen=True, slots=True)
class Drained:
    pass


ToParent = Ready | LoadFailed | Admitted | Refused | StepReport | Drained


def pack_outputs(outputs: Sequence[tuple[str, Output]]) -> list[PackedOutput]:
    """The sink's ``[(request_id, output), ...]`` as plain tuples (see ``PackedOutput``)."""
    packed: list[PackedOutput] = []
    for rid, out in outputs:
        if isinstance(out, TokenOutput):
            text = (out.reasoning, out.content, out.tokens)
            packed.append((rid, _TOKEN, *text, out.finish_reason, out.logprobs, out.index))
        else:
            packed.append(
                (
                    rid,
                    _FINAL,
                    out.finish_reason,
                    out.prompt_tokens,
                    out.completion_tokens,
                    out.error,
                    out.cached_tokens,
                    out.error_code,
                )
            )
    return packed


def _unpack(p: PackedOutput) -> tuple[str, Output]:
    rid, kind, a, b, n, reason, logprobs, index = p
    if kind == _TOKEN:
        return rid, TokenOutput(str(a), str(b), n, logprobs, index, reason)
    final = FinalOutput(str(a), int(b), n, reason, int(logprobs or 0), str(index))  # type: ignore[arg-type]
    return rid, final
