"""Public OpenAI Chat Completions request models (what clients send) and the response/status shapes.

Unknown extra fields are ignored (clients send many); parameters we cannot honour are rejected by
``unsupported_params`` with a message naming them, never silently dropped. Every number has a range and every
string and list a bound (the OpenAI API reference's where it states one), so a value can never reach a
place where it overflows: ``seed`` is a signed 64-bit integer as in the OpenAI reference, ``top_k`` at most
2^31 - 1 (the engine clamps it to the vocabulary), ``max_tokens`` at most 2^31 - 1 (the model service checks
it against the context).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from services.api.settings import SESSION_ID_PATTERN
from services.protocol.generate import (
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    MAX_ARGUMENTS_CHARS,
    MAX_DESCRIPTION_CHARS,
    MAX_FPS,
    MAX_FRAME_ITEMS,
    MAX_ID_CHARS,
    MAX_STOP_CHARS,
    MAX_TOP_LOGPROBS,
)
from services.protocol.generate import TOOL_NAME_PATTERN as NAME_PATTERN  # function and schema names

MAX_MODEL_CHARS = 256
MAX_URL_CHARS = 64 * 1024 * 1024  # a data URL is bounded by MAX_REQUEST_BYTES anyway
PART_TYPES = ("text", "input_text", "image_url", "input_image", "video_url", "input_video", "video")
MAX_TOOLS = 128  # the OpenAI reference's limit
MAX_SCHEMA_CHARS = 64 * 1024  # one JSON schema (a tool's parameters, a response format), serialized
# reasoning_effort -> reasoning token budget (None: no limit); ``minimal`` closes the thinking at once
REASONING_BUDGETS: dict[str, int | None] = {"minimal": 0, "low": 512, "medium": 2048, "high": None}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class MediaUrl(_Lenient):
    url: str = Field(min_length=1, max_length=MAX_URL_CHARS)
    # images: "low" -> the small pixel budget (LOW_DETAIL_IMAGE_TOKENS); "high"/"auto" -> the default
    detail: Literal["low", "high", "auto"] | None = None


def _url_object(value: object) -> object:
    """A media field given as a bare URL string is the same as ``{"url": ...}``."""
    return {"url": value} if isinstance(value, str) else value


class ContentPart(_Lenient):
    """One part of a message's content. Media parts accept the OpenAI shape
    (``{"type":"image_url","image_url":{"url":...}}``) and the seed aliases ``input_image``/``input_video``,
    whose URL may sit under ``image_url``/``video_url``/``input_image``/``input_video``/``url`` as a string
    or an object with ``url``."""

    type: Literal["text", "input_text", "image_url", "input_image", "video_url", "input_video", "video"]
    text: str | None = None
    image_url: MediaUrl | None = None
    video_url: MediaUrl | None = None
    input_image: MediaUrl | None = None
    input_video: MediaUrl | None = None
    url: str | None = Field(default=None, max_length=MAX_URL_CHARS)
    # ``{"type": "video", "video": [url, ...]}`` (Qwen's examples): a video given as its frames, taken
    # ``fps`` per second (else ``mm_processor_kwargs.fps``, else 2); one URL is a video file
    video: list[Annotated[str, Field(min_length=1, max_length=MAX_URL_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_FRAME_ITEMS
    )
    fps: StrictFloat | None = Field(default=None, gt=0.0, le=MAX_FPS)

    @field_validator("video", mode="before")
    @classmethod
    def _one_video_url(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("type", mode="before")
    @classmethod
    def _known_type(cls, value: object) -> object:
        if value not in PART_TYPES:
            shown = repr(value)[:64] if isinstance(value, str) else type(value).__name__
            raise PydanticCustomError(
                "unsupported_content_part",
                "unsupported content part type {shown}; this server accepts {supported}",
                {"shown": shown, "supported": ", ".join(PART_TYPES)},
            )
        return value

    @field_validator("image_url", "video_url", "input_image", "input_video", mode="before")
    @classmethod
    def _bare_url(cls, value: object) -> object:
        return _url_object(value)

    @property
    def kind(self) -> Literal["text", "image", "video"]:
        if self.type in ("text", "input_text"):
            return "text"
        return "image" if self.type in ("image_url", "input_image") else "video"

    def detail(self) -> Literal["low", "high", "auto"] | None:
        """An image's ``detail`` (None when not given)."""
        for name in ("image_url", "input_image"):
            value = getattr(self, name)
            if value is not None:
                return value.detail
        return None

    def media_url(self) -> str | None:
        found = self.media_source()
        return found[1] if found else None

    def frame_urls(self) -> list[str] | None:
        """A ``video`` part given as a list of 2 or more frames: their URLs; None otherwise."""
        return self.video if self.video is not None and len(self.video) > 1 else None

    def media_source(self) -> tuple[str, str] | None:
        """(the URL's place within the part, e.g. ``image_url.url``; the URL), or None."""
        if self.video is not None:
            return "video[0]", self.video[0]
        for name in ("image_url", "video_url", "input_image", "input_video"):
            value = getattr(self, name)
            if value is not None:
                return f"{name}.url", value.url
        return ("url", self.url) if self.url else None

    @model_validator(mode="after")
    def _has_payload(self) -> ContentPart:
        if self.type == "video" and self.video is None:
            raise ValueError("a video part needs `video` (a URL or a list of frame URLs)")
        if self.fps is not None and self.frame_urls() is None:
            raise ValueError(
                "`fps` is the rate of a list of frames; sample a video file with mm_processor_kwargs.fps"
            )
        if self.kind == "text" and self.text is None:
            raise ValueError("a text part needs `text`")
        if self.kind != "text" and self.media_url() is None:
            raise ValueError(f"a {self.type} part needs a URL")
        return self


def _content_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "parts"
    return None


# A message's content is a string or a list of parts; the discriminator picks the one the input is, so a
# bad part is reported as that part's error, not as "not a string".
Content = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[ContentPart], Tag("parts")],
    Discriminator(
        _content_kind,
        custom_error_type="invalid_content",
        custom_error_message="content must be a string or a list of content parts",
    ),
]


def _bounded_schema(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON schema of at most MAX_SCHEMA_CHARS once serialized (compiling it costs time and memory)."""
    if value is not None and len(json.dumps(value, separators=(",", ":"))) > MAX_SCHEMA_CHARS:
        raise ValueError(f"the schema is larger than {MAX_SCHEMA_CHARS} characters")
    return value


class FunctionSpec(_Lenient):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _size = field_validator("parameters")(_bounded_schema)


class ToolSpec(_Lenient):
    """``{"type": "function", "function": {"name", "description", "parameters"}}`` (function tools only)."""

    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Lenient):
    name: str = Field(max_length=64)


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(_Lenient):
    name: str = Field(pattern=NAME_PATTERN)  # rendered into the prompt's JSON: the tool-name rule
    arguments: str = Field(max_length=MAX_ARGUMENTS_CHARS)


class ToolCallItem(_Lenient):
    """A call of an earlier assistant turn, sent back in the history."""

    id: str = Field(default="", max_length=MAX_ID_CHARS)
    type: Literal["function"] = "function"
    function: CalledFunction


class JsonSchemaSpec(_Lenient):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    _size = field_validator("schema_")(_bounded_schema)


class ResponseFormatSpec(_Lenient):
    """``text`` (default), ``json_object`` (any JSON object) or ``json_schema`` (``json_schema.schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormatSpec:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`json_schema` is required when `type` is json_schema")
        return self


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    tool_calls: list[ToolCallItem] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=MAX_ID_CHARS)

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs `content`")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has `tool_calls`")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs `tool_call_id`")
        return self


class MmProcessorKwargs(BaseModel):
    """The media budgets of a request (vLLM's name), each bounded by the service's caps (checked by the
    model service: 400 naming the field): ``fps`` frames sampled per second of a video (the rate of a
    frame list without its own), ``max_frames`` per video, ``min_pixels``/``max_pixels`` per image and
    video frame. Unknown keys are refused: they would be silently ignored otherwise."""

    model_config = ConfigDict(extra="forbid")

    fps: StrictFloat | None = Field(default=None, gt=0.0, le=MAX_FPS)
    max_frames: StrictInt | None = Field(default=None, ge=1, le=INT32_MAX)
    min_pixels: StrictInt | None = Field(default=None, ge=1, le=INT32_MAX)
    max_pixels: StrictInt | None = Field(default=None, ge=1, le=INT32_MAX)


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str | None = Field(default=None, max_length=MAX_MODEL_CHARS)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    # extension; -1 (vLLM's spelling) and 0 mean "no top-k"
    top_k: StrictInt | None = Field(default=None, ge=-1, le=INT32_MAX)
    seed: StrictInt | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] | None = Field(default=None, max_length=4)
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: StrictFloat | None = Field(default=None, gt=0.0, le=10.0)
    n: StrictInt | None = Field(default=None, ge=1, le=INT32_MAX)
    stream: StrictBool = False  # "yes" or 1 is a client bug worth a 400, not a guess
    stream_options: StreamOptions | None = None
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)
    tools: list[ToolSpec] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormatSpec | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    # extension: reasoning tokens before the server closes the thinking block itself (0: at once)
    max_reasoning_tokens: StrictInt | None = Field(default=None, ge=0, le=INT32_MAX)
    # extension: per-request media budgets
    mm_processor_kwargs: MmProcessorKwargs | None = None

    # per-token log-probabilities: choices[].logprobs.content (answer tokens) and .reasoning_content
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    # accepted only so they can be refused by name (see unsupported_params)
    functions: list[Any] | None = None
    function_call: Any = None
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

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        # as the OpenAI API answers; `logprobs` is declared first, so it is validated already
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("`top_logprobs` is only allowed when `logprobs` is true")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    def logprob_candidates(self) -> int | None:
        """How many candidates per token when logprobs are asked for (``top_logprobs``, 0 by default);
        None when they are not."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def effective_top_k(self) -> int | None:
        return 0 if self.top_k == -1 else self.top_k

    def reasoning_budget(self) -> int | None:
        """``max_reasoning_tokens`` when given, else the budget of ``reasoning_effort``; None: no limit."""
        if self.max_reasoning_tokens is not None:
            return self.max_reasoning_tokens
        return REASONING_BUDGETS[self.reasoning_effort] if self.reasoning_effort else None

    def tool_mode(self) -> str:
        """``none`` / ``auto`` / ``required`` / ``function`` (a named function); ``none`` without tools."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "function"
        return self.tool_choice or "auto"

    def called_tools(self) -> list[str]:
        """Names of the tools the answer may call (what the tool-call parser accepts), in order."""
        if self.tool_mode() == "none":
            return []
        return [t.function.name for t in self.tools or ()]


def tool_error(req: ChatCompletionRequest) -> tuple[str, str] | None:
    """(message, param) when ``tools``, ``tool_choice`` and ``response_format`` do not fit together."""
    names = [t.function.name for t in req.tools or ()]
    for i, name in enumerate(names):
        if name in names[:i]:
            return f"duplicate function name {name!r}", f"tools[{i}].function.name"
    for i, tool in enumerate(req.tools or ()):
        params = tool.function.parameters
        if params is not None and params.get("type", "object") != "object":
            return "a function's parameters must be a JSON schema of type object", (
                f"tools[{i}].function.parameters"
            )
    if req.tool_choice not in (None, "none") and not req.tools:
        return "`tool_choice` is only allowed when `tools` are given", "tool_choice"
    if isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name not in names:
        return f"no function named {req.tool_choice.function.name!r} in `tools`", "tool_choice.function.name"
    forced = req.tool_mode() in ("required", "function")
    if forced and req.response_format is not None and req.response_format.type != "text":
        return "`response_format` cannot be combined with a forced `tool_choice`", "response_format"
    return None


def count_error(
    req: ChatCompletionRequest, max_messages: int, max_parts: int, max_n: int = 1
) -> tuple[str, str] | None:
    """(message, param) when the request has more messages, or a message more content parts, or more
    choices (``n``) than this server takes (MAX_MESSAGES, MAX_CONTENT_PARTS, MAX_N); None when within the
    bounds."""
    if req.n is not None and req.n > max_n:
        return f"at most {max_n} choices per request (`n`; got {req.n})", "n"
    if len(req.messages) > max_messages:
        return f"at most {max_messages} messages per request (got {len(req.messages)})", "messages"
    for i, message in enumerate(req.messages):
        if isinstance(message.content, list) and len(message.content) > max_parts:
            return f"at most {max_parts} content parts per message", f"messages[{i}].content"
    return None


def unsupported_params(req: ChatCompletionRequest) -> str | None:
    """The first parameter the server cannot honour, or None."""
    if req.functions:
        return "functions"
    if req.function_call not in (None, "none"):
        return "function_call"
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
    usage: dict[str, int | dict[str, int]] | None  # the OpenAI usage object (prompt_tokens_details nested)


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
