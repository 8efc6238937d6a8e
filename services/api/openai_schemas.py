"""Public OpenAI Chat Completions request models (what clients send) and the response/status shapes.

Unknown extra fields are ignored (clients send many); parameters we cannot honour are rejected by
``unsupported_params`` with a message naming them, never silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)

from services.api.settings import SESSION_ID_PATTERN


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class MediaUrl(_Lenient):
    url: str = Field(min_length=1)
    detail: str | None = None


class ContentPart(_Lenient):
    """One part of a message's content. Media parts accept the OpenAI shape
    (``{"type":"image_url","image_url":{"url":...}}``) and the seed aliases ``input_image``/``input_video``,
    whose URL may sit under ``image_url``/``video_url``/``input_image``/``input_video``/``url`` as a string
    or an object with ``url``."""

    type: Literal["text", "input_text", "image_url", "input_image", "video_url", "input_video"]
    text: str | None = None
    image_url: MediaUrl | str | None = None
    video_url: MediaUrl | str | None = None
    input_image: MediaUrl | str | None = None
    input_video: MediaUrl | str | None = None
    url: str | None = None

    @property
    def kind(self) -> Literal["text", "image", "video"]:
        if self.type in ("text", "input_text"):
            return "text"
        return "image" if self.type in ("image_url", "input_image") else "video"

    def media_url(self) -> str | None:
        for value in (self.image_url, self.video_url, self.input_image, self.input_video, self.url):
            if isinstance(value, MediaUrl):
                return value.url
            if isinstance(value, str) and value:
                return value
        return None

    @model_validator(mode="after")
    def _has_payload(self) -> ContentPart:
        if self.kind == "text" and self.text is None:
            raise ValueError("a text part needs `text`")
        if self.kind != "text" and self.media_url() is None:
            raise ValueError(f"a {self.type} part needs a URL")
        return self


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs `content`")
        return self


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    n: int | None = None
    stream: StrictBool = False  # "yes" or 1 is a client bug worth a 400, not a guess
    stream_options: StreamOptions | None = None
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)

    # accepted only so they can be refused by name (see unsupported_params)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    web_search_options: Any = None

    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream(cls, value: object) -> object:
        return False if value is None else value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        # as the OpenAI API answers; `stream` is declared first, so it is validated already
        if value is not None and not info.data.get("stream"):
            raise ValueError("`stream_options` is only allowed when `stream` is true")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_limit(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop strings")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def unsupported_params(req: ChatCompletionRequest) -> str | None:
    """The first parameter the server cannot honour, or None."""
    if req.n not in (None, 1):
        return "n"
    if req.tools:
        return "tools"
    if req.tool_choice not in (None, "none"):
        return "tool_choice"
    if req.functions:
        return "functions"
    if req.function_call not in (None, "none"):
        return "function_call"
    if req.logprobs:
        return "logprobs"
    if req.top_logprobs:
        return "top_logprobs"
    if req.response_format and req.response_format.get("type", "text") != "text":
        return "response_format"
    return _unsupported_outputs(req)


def _unsupported_outputs(req: ChatCompletionRequest) -> str | None:
    """Token biasing, audio output and web search change what the model returns: refused, not ignored."""
    if req.logit_bias:
        return "logit_bias"
    if req.audio is not None or (req.modalities and set(req.modalities) != {"text"}):
        return "audio" if req.audio is not None else "modalities"
    if req.web_search_options is not None:
        return "web_search_options"
    return None


SessionStatusName = Literal["queued", "running", "completed", "cancelled", "failed"]


class SessionStatus(BaseModel):
    id: str
    status: SessionStatusName
    created: int
    updated: int
    last_index: int
    finish_reason: str | None
    usage: dict[str, int] | None


class CancelResponse(BaseModel):
    ok: bool = True
    session_id: str
    status: SessionStatusName


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "self-hosted"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
