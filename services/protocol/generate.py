"""Requests the api service sends to the model service."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1


class SamplingParams(BaseModel):
    """Per-request sampling. ``None`` means "the model service's default" (env, then generation config).

    The ranges are the public API's (services/api/openai_schemas.py), checked again here so that the model
    service never trusts a caller: ``seed`` a signed 64-bit integer, ``top_k`` (0 = off) at most 2^31 - 1
    (clamped to the vocabulary by the engine), ``max_tokens`` at most 2^31 - 1 (checked against the
    context)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: list[str] = Field(default_factory=list, max_length=4)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ImagePart(BaseModel):
    """An image the api service already fetched/decoded from its URL; ``data`` is base64 of the file bytes."""

    type: Literal["image"] = "image"
    data: str


class VideoPart(BaseModel):
    """A video file (any container PyAV reads); ``data`` is base64 of the file bytes."""

    type: Literal["video"] = "video"
    data: str


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class GenerateRequest(BaseModel):
    """Body of ``POST /internal/v1/generate``. ``request_id`` is chosen by the caller and is unique."""

    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    messages: list[Message] = Field(min_length=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
