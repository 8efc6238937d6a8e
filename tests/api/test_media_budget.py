"""Per-request media bounds in the api: media counted before fetching, frame lists thinned before fetching
(timestamps kept), fetches at once and bytes in all bounded per request."""

from __future__ import annotations

import asyncio
import base64

import pytest

from services.api.convert import media_plan, to_messages
from services.api.errors import BadRequest
from services.api.media import FetchLimits, MediaKind
from services.api.media_budget import MediaBudget, MediaPlan, thin_frames
from services.api.openai_schemas import ChatCompletionRequest
from services.api.routes.common import validate
from services.api.settings import ApiSettings
from services.protocol.generate import VideoPart

pytestmark = pytest.mark.anyio


def req(content: list[dict], **body: object) -> ChatCompletionRequest:
    return validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": content}], **body})


def frames(n: int) -> list[str]:
    return [f"https://h/{i}.png" for i in range(n)]


class Recorder:
    """A fetch that records what it was asked (url, kind, size limit) and answers ``size`` bytes."""

    def __init__(self, size: int = 8) -> None:
        self.calls: list[tuple[str, MediaKind, int]] = []
        self.size = size

    async def __call__(self, url: str, kind: MediaKind, limits: FetchLimits) -> bytes:
        self.calls.append((url, kind, limits.max_bytes(kind)))
        for _ in range(3):
            await asyncio.sleep(0)  # yield to the other fetches (no waiting on time)
        return url.encode().ljust(self.size, b".")


def budget(fetch: Recorder, max_bytes: int = 10**9, concurrency: int = 4) -> MediaBudget:
    return MediaBudget(fetch, FetchLimits(), max_bytes, concurrency)


def test_thinning_keeps_every_kth_frame_and_each_frame_its_time() -> None:
    urls = frames(1024)
    kept, fps = thin_frames(urls, 2.0, 32)
    assert [i for i, _ in kept] == list(range(0, 1024, 32)) and fps == 2.0 / 32
    assert all(j / fps == i / 2.0 for j, (i, _) in enumerate(kept))  # same timestamp as in the full list
    assert thin_frames(frames(100), 30.0, 32) == ([(i, f"https://h/{i}.png") for i in range(0, 100, 4)], 7.5)
    assert thin_frames(frames(20), 30.0, 32)[1] == 30.0


async def test_a_frame_list_fetches_only_the_frames_the_model_can_use() -> None:
    fetch = Recorder()
    request = req([{"type": "video", "video": frames(1024), "fps": 4}])
    plan = media_plan(request, ApiSettings())
    assert plan.max_frames == 32
    (message,) = await to_messages(request.messages, budget(fetch), plan)
    (video,) = message.content
    assert isinstance(video, VideoPart)
    assert len(fetch.calls) == len(video.frames) == 32 and video.fps == 4 / 32
    assert base64.b64decode(video.frames[1]).startswith(b"https://h/32.png")
    small = req([{"type": "video", "video": frames(8)}], mm_processor_kwargs={"max_frames": 4})
    fetch = Recorder()
    (message,) = await to_messages(small.messages, budget(fetch), media_plan(small, ApiSettings()))
    (video,) = message.content
    assert isinstance(video, VideoPart)
    assert len(fetch.calls) == 4 and video.fps == 2.0 / 2  # the default rate, every 2nd frame


async def test_media_are_counted_before_anything_is_fetched() -> None:
    fetch = Recorder()
    video = {"type": "video_url", "video_url": {"url": "https://h/v.mp4"}}
    image = {"type": "image_url", "image_url": {"url": "https://h/i.png"}}
    request = req([image, video, video, video])
    with pytest.raises(BadRequest) as info:
        await to_messages(request.messages, budget(fetch), MediaPlan(max_videos=2))
    assert info.value.param == "messages[0]" and "more than 2 videos" in info.value.message
    with pytest.raises(BadRequest):
        await to_messages(req([image] * 3).messages, budget(fetch), MediaPlan(max_images=2))
    assert fetch.calls == []


async def test_fetches_of_one_request_are_bounded_in_number_at_once_and_in_bytes() -> None:
    fetch = Recorder(size=400)
    images = [{"type": "image_url", "image_url": {"url": f"https://h/{i}.png"}} for i in range(16)]
    limited = budget(fetch, concurrency=4)
    await to_messages(req(images).messages, limited, MediaPlan(max_images=16))
    assert len(fetch.calls) == 16 and limited.peak == 4
    fetch = Recorder(size=400)
    one_at_a_time = budget(fetch, max_bytes=1000, concurrency=1)
    with pytest.raises(BadRequest) as info:
        await to_messages(req(images[:3]).messages, one_at_a_time, MediaPlan())
    assert info.value.param == "messages[0].content[2].image_url.url"
    assert "larger than 1000 bytes in all" in info.value.message
    # each fetch may return at most what is left of the budget (an oversized one stops early)
    assert [limit for _, _, limit in fetch.calls] == [1000, 600, 200]
