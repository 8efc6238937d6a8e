"""OpenAI chat request -> the internal request's parts: messages (media fetched, embedded) and sampling."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable

from services.api.errors import BadRequest
from services.api.media import MediaError, MediaKind
from services.api.openai_schemas import ChatCompletionRequest, ChatMessage, ContentPart
from services.protocol.generate import ImagePart, Message, Part, SamplingParams, TextPart, VideoPart

MediaFetcher = Callable[[str, MediaKind], Awaitable[bytes]]
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
    )


async def to_messages(messages: list[ChatMessage], fetch: MediaFetcher) -> list[Message]:
    """Convert every message; all media of the request are fetched concurrently."""
    converted = await asyncio.gather(
        *(_message(m, i, fetch) for i, m in enumerate(messages)), return_exceptions=True
    )
    for item in converted:
        if isinstance(item, BaseException):
            raise item
    return [m for m in converted if isinstance(m, Message)]


async def _message(message: ChatMessage, index: int, fetch: MediaFetcher) -> Message:
    role = "system" if message.role == "developer" else message.role
    if message.content is None or isinstance(message.content, str):
        return Message(role=role, content=message.content or "")
    parts = await asyncio.gather(*(_part(p, index, j, fetch) for j, p in enumerate(message.content)))
    return Message(role=role, content=list(parts))


async def _part(part: ContentPart, index: int, j: int, fetch: MediaFetcher) -> Part:
    if part.kind == "text":
        return TextPart(text=part.text or "")
    source = part.media_source()
    assert source is not None  # ContentPart validation guarantees it
    where, url = source
    try:
        data = await fetch(url, part.kind)
    except MediaError as exc:
        param = f"messages[{index}].content[{j}].{where}"
        raise BadRequest(exc.message, param=param, code="invalid_media") from None
    if len(data) > _OFFLOAD_BYTES:  # large media: encode off the event loop
        encoded = await asyncio.to_thread(_b64, data)
    else:
        encoded = _b64(data)
    return ImagePart(data=encoded) if part.kind == "image" else VideoPart(data=encoded)
