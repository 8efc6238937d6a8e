"""One text, one image and one video request, through the api (OpenAI body) or the model service (internal
protocol), each checked for a clean finish with tokens. The media are made here: a 64x64 PNG and an
8-frame 64x64 MPEG-4 clip (PyAV), as base64."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx

from bench.gpu.model_http import generate_url, post_stream, stream_generate
from bench.gpu.report import MediaCheck
from bench.loadgen import RequestRecord, next_id

KINDS = ("text", "image", "video")
PROMPTS = {"text": "Name three colours.", "image": "What is in this picture?", "video": "What happens here?"}
MIME = {"image": "image/png", "video": "video/mp4"}


def sample_media() -> dict[str, str]:
    """``{"image": base64 PNG, "video": base64 MP4}``."""
    from tests.model.media import mp4_bytes, png_bytes

    return {
        "image": base64.b64encode(png_bytes(64, 64)).decode(),
        "video": base64.b64encode(mp4_bytes(frames=8, width=64, height=64, fps=4)).decode(),
    }


def openai_body(kind: str, model: str, media: dict[str, str], max_tokens: int) -> dict[str, Any]:
    """A streaming chat completion with usage; ``kind`` one of ``KINDS`` (media as data URLs)."""
    content: list[dict[str, Any]] = []
    if kind != "text":
        url = f"data:{MIME[kind]};base64,{media[kind]}"
        content.append({"type": f"{kind}_url", f"{kind}_url": {"url": url}})
    content.append({"type": "text", "text": PROMPTS[kind]})
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def internal_request(kind: str, media: dict[str, str], max_tokens: int) -> Any:
    """The same request in the internal protocol (a ``GenerateRequest``)."""
    from services.protocol.generate import (
        GenerateRequest,
        ImagePart,
        Message,
        SamplingParams,
        TextPart,
        VideoPart,
    )

    parts: list[Any] = []
    if kind == "image":
        parts.append(ImagePart(data=media["image"]))
    elif kind == "video":
        parts.append(VideoPart(data=media["video"]))
    parts.append(TextPart(text=PROMPTS[kind]))
    return GenerateRequest(
        request_id=next_id(f"check-{kind}"),
        messages=[Message(role="user", content=parts)],
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


async def stream_chat(client: httpx.AsyncClient, api_url: str, body: dict[str, Any]) -> RequestRecord:
    """POST ``body`` to the api's chat completions; the stream's record (errors in ``record.error``)."""
    return await post_stream(client, api_url.rstrip("/") + "/v1/chat/completions", body, _read_sse)


async def _read_sse(resp: httpx.Response, rec: RequestRecord) -> None:
    async for line in resp.aiter_lines():
        payload = line[5:].strip() if line.startswith("data:") else ""
        if not payload or payload == "[DONE]":
            continue
        chunk = json.loads(payload)
        if "error" in chunk:
            rec.error = json.dumps(chunk["error"])[:200]
            return
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if (delta.get("content") or delta.get("reasoning_content")) and rec.first_token is None:
                rec.first_token = time.perf_counter()
        usage = chunk.get("usage")
        if usage:
            rec.completion_tokens = int(usage.get("completion_tokens") or 0)
            rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)


def as_check(kind: str, via: str, rec: RequestRecord) -> MediaCheck:
    """A record as a report row: ok when it finished without error and produced tokens."""
    ok = rec.error is None and rec.completion_tokens > 0
    detail = rec.error or f"{rec.prompt_tokens} prompt tokens"
    return MediaCheck(kind, via, ok, rec.completion_tokens, rec.end - rec.start, detail)


async def check_all(
    client: httpx.AsyncClient, model_url: str, api_url: str, model: str, max_tokens: int
) -> list[MediaCheck]:
    """Every kind through the model service, then through the api (each only when its url is set)."""
    media = sample_media()
    checks: list[MediaCheck] = []
    for kind in KINDS:
        if model_url:
            rec = await stream_generate(
                client, generate_url(model_url), internal_request(kind, media, max_tokens)
            )
            checks.append(as_check(kind, "model service", rec))
        if api_url:
            rec = await stream_chat(client, api_url, openai_body(kind, model, media, max_tokens))
            checks.append(as_check(kind, "api", rec))
    return checks
