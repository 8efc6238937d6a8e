"""The ``n`` choices of one request: how each one ends and when the request itself ends. Torch-free.

Every engine runs a request with ``n`` > 1 as ``n`` rows (one prefill, then independent sampling). Each
row ends on its own; ``ChoiceGroup.end`` turns that end into the outputs the sink gets:

- ``n`` = 1: the request's ``FinalOutput`` at once (exactly what a single row always produced);
- ``n`` > 1: a ``TokenOutput`` of that choice carrying its ``finish_reason`` (and its last unreported
  tokens, logprobs), and, once the last choice ended, the request's one ``FinalOutput``: completion tokens
  summed over the choices, the reason the first of ``error``, ``cancelled``, ``length``, ``stop`` any choice
  ended with, and the first error message.

An ``error`` of one choice fails the request as a whole (the caller ends the other rows with the same
error: ``wants_siblings_failed``): the public stream carries one error event for the whole request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.model.engine.base import FinalOutput, Output, TokenLogprobs, TokenOutput

_SEVERITY = ("error", "cancelled", "length", "stop")


@dataclass(slots=True)
class ChoiceGroup:
    """The bookkeeping of one request's choices (touched by the engine thread only)."""

    request_id: str
    n: int
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    reasons: dict[int, str] = field(default_factory=dict)  # choice index -> its finish reason
    error: str | None = None
    error_code: str = "internal"  # see ``FinalOutput.error_code``

    @property
    def done(self) -> bool:
        """Every choice has ended (the request's ``FinalOutput`` went out)."""
        return len(self.reasons) == self.n

    def end(
        self,
        index: int,
        reason: str,
        generated: int,
        error: str | None = None,
        tail: TokenOutput | None = None,
        error_code: str = "internal",
    ) -> list[tuple[str, Output]]:
        """Outputs for the end of choice ``index`` after ``generated`` tokens (``reason`` one of stop,
        length, cancelled, error). ``tail``: the choice's last unreported tokens/text, folded into its
        ending output (n > 1) or emitted before the ``FinalOutput`` (n = 1). Raises ``ValueError`` for a
        choice that ended already."""
        if index in self.reasons:
            raise ValueError(f"choice {index} of {self.request_id} ended already")
        self.reasons[index] = reason
        self.completion_tokens += generated
        if error is not None and self.error is None:
            self.error, self.error_code = error, error_code
        out: list[tuple[str, Output]] = []
        if self.n == 1:
            if tail is not None:
                out.append((self.request_id, tail))
        else:
            last = tail or TokenOutput("", "", 0)
            last.index, last.finish_reason = index, reason
            out.append((self.request_id, last))
        if self.done:
            out.append((self.request_id, self.final()))
        return out

    def final(self) -> FinalOutput:
        """The request's ``FinalOutput`` (see the module doc for its reason)."""
        seen = set(self.reasons.values())
        reason = next((r for r in _SEVERITY if r in seen), "error")
        counts = (self.prompt_tokens, self.completion_tokens)
        return FinalOutput(reason, *counts, self.error, self.cached_tokens, self.error_code)


def tail_output(
    reasoning: str, content: str, tokens: int, logprobs: TokenLogprobs | None, index: int
) -> TokenOutput | None:
    """A choice's last output before it ends, or None when it has nothing left (no text, tokens or
    logprobs)."""
    if not reasoning and not content and not tokens and logprobs is None:
        return None
    return TokenOutput(reasoning, content, tokens, logprobs, index=index)
