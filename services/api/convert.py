"""OpenAI chat request -> the internal request's parts: messages (media fetched, embedded) and sampling."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any

from services.api.errors import BadRequest
from services.api.media import MediaError, MediaKind
from services.api.media_budget import MediaCountError, MediaPlan, count_media, thin_frames
from services.api.openai_schemas import ChatCompletionRequest, ChatMessage, ContentPart, NamedToolChoice
from services.api.settings import ApiSettings
from services.protocol.generate import (
    FunctionCall,
    FunctionDef,
    ImagePart,
    MediaOptions,
    Message,
    Part,
    ResponseFormat,
    SamplingParams,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
    VideoPart,
)

MediaFetcher = Callable[[str, MediaKind], Awaitable[bytes]]
DEFAULT_FRAME_LIST_FPS = 2.0  # the model service's rate of a frame list given without one (Qwen's default)
_OFFLOAD_BYTES = 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def to_sampling(req: ChatCompletionRequest) -> SamplingParams:
    return SamplingParams(
        max_tokens=req.effective_max_tokens(),
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.effective_top_k(),
        seed=req.seed,
        stop=req.stop_list(),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty,
        max_reasoning_tokens=req.reasoning_budget(),
        top_logprobs=req.logprob_candidates(),
        n=req.n or 1,
    )


def to_structure(req: ChatCompletionRequest) -> dict[str, Any]:
    """The ``GenerateRequest`` fields for tools, tool choice and the response format."""
    mode = req.tool_mode()
    named = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
    tools = [
        Tool(
            function=FunctionDef(
                name=t.function.name, description=t.function.description, parameters=t.function.parameters
            )
        )
        for t in req.tools or ()
    ]
    rf = req.response_format
    response_format = None
    if rf is not None and rf.type != "text":
        schema = rf.json_schema.schema_ if rf.json_schema is not None else None
        response_format = ResponseFormat(type=rf.type, json_schema=schema or None)
        if rf.type == "json_schema" and response_format.json_schema is None:
            response_format = ResponseFormat(type="json_object")  # no schema: any JSON object
    return {
        "tools": tools,
        "tool_choice": ToolChoice(mode=mode, name=named),  # type: ignore[arg-type]
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "response_format": response_format,
    }


async def to_messages(
    messages: list[ChatMessage], fetch: MediaFetcher, plan: MediaPlan | None = None
) -> list[Message]:
    """Convert every message; the media are counted first (``plan``: 400 naming the message over the
    limit), then fetched concurrently (``fetch`` bounds how many at once and their bytes); a frame-list
    video fetches only the frames ``thin_frames`` keeps."""
    plan = plan or MediaPlan()
    kinds = [(i, p.kind) for i, m in enumerate(messages) if isinstance(m.content, list) for p in m.content]
    try:
        count_media(kinds, plan)
    except MediaCountError as exc:
        raise BadRequest(exc.message, param=exc.param, code="too_many_media") from None
    converted = await asyncio.gather(
        *(_message(m, i, fetch, plan) for i, m in enumerate(messages)), return_exceptions=True
    )
    for item in converted:
        if isinstance(item, BaseException):
            raise item
    return [m for m in converted if isinstance(m, Message)]


async def _message(message: ChatMessage, index: int, fetch: MediaFetcher, plan: MediaPlan) -> Message:
    role = "system" if message.role == "developer" else message.role
    calls = [
        ToolCall(id=c.id, function=FunctionCall(name=c.function.name, arguments=c.function.arguments))
        for c in message.tool_calls or ()
    ] or None
    extra: dict[str, Any] = {"tool_calls": calls, "tool_call_id": message.tool_call_id}
    if message.content is None or isinstance(message.content, str):
        return Message(role=role, content=message.content or "", **extra)
    parts = await asyncio.gather(*(_part(p, index, j, fetch, plan) for j, p in enumerate(message.content)))
    return Message(role=role, content=list(parts), **extra)


async def _part(part: ContentPart, index: int, j: int, fetch: MediaFetcher, plan: MediaPlan) -> Part:
    if part.kind == "text":
        return TextPart(text=part.text or "")
    frames = part.frame_urls()
    if frames is not None:  # a video given as its frames: the kept ones fetched as images
        where = f"messages[{index}].content[{j}].video"
        kept, fps = thin_frames(frames, part.fps or plan.default_fps, plan.max_frames)
        encoded = await asyncio.gather(*(_fetched(u, "image", f"{where}[{k}]", fetch) for k, u in kept))
        # every k-th frame at fps / k: each kept frame keeps its time; the part's own rate when not thinned
        return VideoPart(frames=list(encoded), fps=part.fps if len(kept) == len(frames) else fps)
    source = part.media_source()
    assert source is not None  # ContentPart validation guarantees it
    where, url = source
    encoded_one = await _fetched(url, part.kind, f"messages[{index}].content[{j}].{where}", fetch)
    if part.kind == "image":
        return ImagePart(data=encoded_one, detail=part.detail())
    return VideoPart(data=encoded_one)


async def _fetched(url: str, kind: MediaKind, param: str, fetch: MediaFetcher) -> str:
    """The media at ``url`` as base64; a fetch or decode failure is a 400 naming ``param``."""
    try:
        data = await fetch(url, kind)
    except MediaError as exc:
        raise BadRequest(exc.message, param=param, code="invalid_media") from None
    if len(data) > _OFFLOAD_BYTES:  # large media: encode off the event loop
        return await asyncio.to_thread(_b64, data)
    return _b64(data)


def media_plan(req: ChatCompletionRequest, settings: ApiSettings) -> MediaPlan:
    """The request's media bounds: the service's counts, its frame cap lowered by the request's
    ``mm_processor_kwargs.max_frames``, and its ``fps`` as the rate of frame lists without their own."""
    kwargs = req.mm_processor_kwargs
    frames = settings.max_video_frames
    if kwargs is not None and kwargs.max_frames is not None:
        frames = min(frames, kwargs.max_frames)
    fps = kwargs.fps if kwargs is not None and kwargs.fps is not None else DEFAULT_FRAME_LIST_FPS
    return MediaPlan(
        max_frames=frames,
        max_images=settings.max_images_per_request,
        max_videos=settings.max_videos_per_request,
        default_fps=fps,
    )


def to_media(req: ChatCompletionRequest) -> MediaOptions | None:
    """The request's ``mm_processor_kwargs`` as the internal media options (None when not given)."""
    kwargs = req.mm_processor_kwargs
    return None if kwargs is None else MediaOptions(**kwargs.model_dump())
