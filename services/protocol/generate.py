"""Requests the api service sends to the model service."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # the OpenAI reference's function name rule
MAX_DESCRIPTION_CHARS = 8192  # a tool's description
MAX_ARGUMENTS_CHARS = 1024 * 1024  # a history tool call's arguments (JSON text)
MAX_ID_CHARS = 256  # a history tool call's id and a tool turn's ``tool_call_id``


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_TOP_LOGPROBS = 20  # the OpenAI reference's bound
MAX_STOP_CHARS = 1000  # one stop string
MAX_FPS = 60.0  # frames per second a request may ask a video to be sampled at (or say its frames were taken)
MAX_FRAME_ITEMS = 1024  # images in one frame-list video (then sampled down to the frame cap)
MAX_CHOICES = 128  # ``n`` as any caller may send it; each service has its own, lower, configured cap
_GOLDEN_64 = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, odd: i * it mod 2^64 spreads consecutive i apart


def _unicode(text: str) -> str:
    """Refuse text that is not valid Unicode (a lone UTF-16 surrogate): the tokenizer cannot encode it."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text contains an unpaired UTF-16 surrogate") from None
    return text


# Text as the model service accepts it from any caller (the api checks the same before sending).
UnicodeText = Annotated[str, AfterValidator(_unicode)]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS), AfterValidator(_unicode)]


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
    stop: list[StopString] = Field(default_factory=list, max_length=4)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    # tokens of reasoning before the server closes the thinking block itself (0: at once; None: no limit)
    max_reasoning_tokens: int | None = Field(default=None, ge=0, le=INT32_MAX)
    # per generated token, its log-probability and the ``top_logprobs`` most likely alternatives
    # (see ``events.TokenLogprob``); None: no logprobs for this request (nothing computed for its row)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # choices generated from one prefill of the prompt, each sampled on its own (``choice_seed``); the
    # request counts as ``n`` rows against the engine's queue and batch limits
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)


def choice_seed(seed: int | None, index: int) -> int | None:
    """The sampling seed of choice ``index`` (0-based) of a request seeded with ``seed``.

    Choice 0 keeps the request's seed (so choice 0 of an ``n``-request is what the same request with
    ``n=1`` generates); choice i > 0 uses ``(seed + i * 0x9E3779B97F4A7C15) mod 2^64``, read back as a
    signed 64-bit integer (the range of ``SamplingParams.seed``). ``None`` (unseeded) stays None: such
    choices draw from fresh randomness and differ anyway."""
    if seed is None or index == 0:
        return seed
    mixed = (seed + index * _GOLDEN_64) % 2**64
    return mixed - 2**64 if mixed > INT64_MAX else mixed


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: UnicodeText


class ImagePart(BaseModel):
    """An image the api service already fetched/decoded from its URL; ``data`` is base64 of the file bytes.
    ``detail`` ``low``: the small pixel budget (LOW_DETAIL_IMAGE_TOKENS); ``high``/``auto``/None: the
    request's or the service's."""

    type: Literal["image"] = "image"
    data: str
    detail: Literal["low", "high", "auto"] | None = None


class VideoPart(BaseModel):
    """A video: a file (any container PyAV reads; ``data`` is base64 of its bytes), or its frames as
    images (``frames``, base64 of each image file, in order) taken ``fps`` per second (None: the
    request's ``media.fps``, else 2), which sets their timestamps. Exactly one of ``data``/``frames``."""

    type: Literal["video"] = "video"
    data: str = ""
    frames: list[str] = Field(default_factory=list, max_length=MAX_FRAME_ITEMS)
    fps: float | None = Field(default=None, gt=0.0, le=MAX_FPS)

    @model_validator(mode="after")
    def _one_source(self) -> VideoPart:
        if bool(self.data) == bool(self.frames):
            raise ValueError("a video is either a file (`data`) or a list of frames (`frames`)")
        return self


class MediaOptions(BaseModel):
    """Per-request media budgets (the public ``mm_processor_kwargs``), each None for the service default
    and checked against the service's caps by the model service: ``fps`` frames per second sampled
    from a video file (the rate of a frame list without its own), ``max_frames`` frames per video,
    ``min_pixels``/``max_pixels`` per image and per video frame."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    fps: float | None = Field(default=None, gt=0.0, le=MAX_FPS)
    max_frames: int | None = Field(default=None, ge=1, le=INT32_MAX)
    min_pixels: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_pixels: int | None = Field(default=None, ge=1, le=INT32_MAX)


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionDef(BaseModel):
    """A function the model may call: ``parameters`` is a JSON schema (object) or None (no arguments);
    ``description`` at most ``MAX_DESCRIPTION_CHARS`` characters."""

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: Annotated[UnicodeText, Field(max_length=MAX_DESCRIPTION_CHARS)] | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionCall(BaseModel):
    """A history call's function: a tool name and its arguments (JSON text as the client sent it back,
    at most ``MAX_ARGUMENTS_CHARS`` characters)."""

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    arguments: UnicodeText = Field(max_length=MAX_ARGUMENTS_CHARS)


class ToolCall(BaseModel):
    """A call the assistant made in an earlier turn (history)."""

    id: UnicodeText = Field(default="", max_length=MAX_ID_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolChoice(BaseModel):
    """``none``: tools are listed but never called; ``auto``: the model decides; ``required``: at least
    one call (grammar-forced); ``function``: a call of ``name`` (grammar-forced)."""

    mode: Literal["none", "auto", "required", "function"] = "auto"
    name: str | None = Field(default=None, pattern=TOOL_NAME_PATTERN)


class ResponseFormat(BaseModel):
    """``json_object``: any JSON object; ``json_schema``: JSON matching ``json_schema`` (forced by a
    grammar over the answer, after the reasoning)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: UnicodeText | list[Part]
    tool_calls: list[ToolCall] | None = None  # assistant turns of the history
    tool_call_id: Annotated[UnicodeText, Field(max_length=MAX_ID_CHARS)] | None = None  # tool turns


class GenerateRequest(BaseModel):
    """Body of ``POST /internal/v1/generate``. ``request_id`` is chosen by the caller and is unique."""

    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    messages: list[Message] = Field(min_length=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    tools: list[Tool] = Field(default_factory=list)
    tool_choice: ToolChoice = Field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    media: MediaOptions | None = None

    def structured(self) -> bool:
        """True when the answer is grammar-constrained (a JSON response format or a forced tool call)."""
        rf = self.response_format
        forced = bool(self.tools) and self.tool_choice.mode in ("required", "function")
        return forced or (rf is not None and rf.type != "text")
