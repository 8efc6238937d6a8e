"""Events of one generation's stream, each with its sequence number (0, 1, 2, ... with no gaps).

A stream is zero or more ``Delta`` events followed by exactly one ``Finished`` event.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length", "cancelled", "error"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class ErrorInfo(BaseModel):
    code: str
    message: str


class Delta(BaseModel):
    """New text since the previous event. ``reasoning`` is text before ``</think>``, ``content`` after it;
    the model service splits on the token, so one delta may carry both (the tail of the thinking and
    the head of the answer). ``tokens`` is how many generated tokens this delta accounts for."""

    type: Literal["delta"] = "delta"
    seq: int
    reasoning: str = ""
    content: str = ""
    tokens: int = 0


class Finished(BaseModel):
    type: Literal["finished"] = "finished"
    seq: int
    finish_reason: FinishReason
    usage: Usage
    error: ErrorInfo | None = None


Event = Annotated[Delta | Finished, Field(discriminator="type")]
