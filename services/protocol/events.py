"""Events of one generation's stream, each with its sequence number (0, 1, 2, ... with no gaps).

A stream is zero or more ``Delta`` events followed by exactly one ``Finished`` event.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length", "cancelled", "error"]


class Usage(BaseModel):
    """Token counts of a request; ``cached_tokens``: prompt tokens whose KV came from the prefix cache
    (the OpenAI API's ``usage.prompt_tokens_details.cached_tokens``)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(default=0, ge=0)


class ErrorInfo(BaseModel):
    code: str
    message: str


class TopLogprob(BaseModel):
    """One candidate token: its text (special tokens by name), its natural-log probability (-9999.0 for a
    token that could not be drawn) and its UTF-8 bytes (None for a special token, which has no text)."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    """A generated token with the most likely candidates of the same distribution, most likely first."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class DeltaLogprobs(BaseModel):
    """The logprobs of the tokens a delta accounts for, in generation order: those generated while the
    model was reasoning (``</think>`` included) and those of the answer."""

    reasoning: list[TokenLogprob] = Field(default_factory=list)
    content: list[TokenLogprob] = Field(default_factory=list)


class Delta(BaseModel):
    """New text since the previous event. ``reasoning`` is text before ``</think>``, ``content`` after it;
    the model service splits on the token, so one delta may carry both (the tail of the thinking and
    the head of the answer). ``tokens`` is how many generated tokens this delta accounts for; ``logprobs``
    (requests with ``top_logprobs`` set) holds one entry per such token, so a delta may carry logprobs
    and no text (e.g. the end-of-sequence token).

    ``index`` is the choice (0..n-1) the delta belongs to. With ``n`` > 1 each choice ends with a delta
    that carries its own ``finish_reason`` (its last text and tokens may ride on it); ``Finished`` then
    follows once every choice has ended. With ``n`` = 1 no delta carries a ``finish_reason``."""

    type: Literal["delta"] = "delta"
    seq: int
    index: int = Field(default=0, ge=0)
    finish_reason: FinishReason | None = None
    reasoning: str = ""
    content: str = ""
    tokens: int = 0
    logprobs: DeltaLogprobs | None = None


class Finished(BaseModel):
    """The end of the whole request. With ``n`` > 1: ``usage.completion_tokens`` counts every choice's
    tokens, and ``finish_reason`` is the first of ``error``, ``cancelled``, ``length``, ``stop`` that any
    choice ended with (an ``error`` of one choice ends every choice: the request fails as a whole)."""

    type: Literal["finished"] = "finished"
    seq: int
    finish_reason: FinishReason
    usage: Usage
    error: ErrorInfo | None = None


Event = Annotated[Delta | Finished, Field(discriminator="type")]
