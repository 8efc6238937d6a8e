"""Per-request bounds on the media the api fetches, applied before and while fetching (pure but for the
fetch it wraps).

- ``count_media``: images and videos of a request counted before anything is fetched (the model service's
  ``MAX_IMAGES_PER_REQUEST`` / ``MAX_VIDEOS_PER_REQUEST``, read from the same variables).
- ``thin_frames``: a video given as a list of frames keeps every k-th frame, k the smallest step that
  leaves at most ``MAX_VIDEO_FRAMES`` (or the request's smaller ``max_frames``); the rate becomes fps / k,
  so every kept frame keeps its timestamp (index / fps). Only the kept frames are fetched.
- ``MediaBudget``: one request's fetches, at most ``concurrency`` at a time and ``max_bytes`` in all
  (each fetch is capped at what is left, so an oversized one stops early).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from services.api.media import FetchLimits, MediaKind, MediaTooLarge

# (url, kind, limits) -> the media's bytes: ``resolve_media`` with its client bound
LimitedFetcher = Callable[[str, MediaKind, FetchLimits], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class MediaPlan:
    """A request's media bounds: frames fetched per frame-list video, images and videos per request, the
    frame rate a frame list without its own is taken at (the request's ``mm_processor_kwargs.fps``, else
    the model's default of 2 per second)."""

    max_frames: int = 32
    max_images: int = 16
    max_videos: int = 2
    default_fps: float = 2.0


class MediaCountError(ValueError):
    """Too many images or videos; ``param`` names the message whose item passed the limit."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def count_media(kinds: Sequence[tuple[int, str]], plan: MediaPlan) -> None:
    """Refuse more images or videos than ``plan`` allows; ``kinds`` is (message index, ``"image"`` /
    ``"video"``) of each media part, in order.

    Raises:
        MediaCountError: naming ``messages[i]`` of the first item over the limit.
    """
    seen = {"image": 0, "video": 0}
    limits = {"image": plan.max_images, "video": plan.max_videos}
    for index, kind in kinds:
        if kind not in seen:
            continue
        seen[kind] += 1
        if seen[kind] > limits[kind]:
            raise MediaCountError(
                f"the request has more than {limits[kind]} {kind}s (the service's limit per request)",
                f"messages[{index}]",
            )


def thin_frames(urls: Sequence[str], fps: float, max_frames: int) -> tuple[list[tuple[int, str]], float]:
    """(original index, url) of the frames to fetch and their rate: every k-th frame from the first, k
    the smallest step leaving at most ``max_frames``; the rate ``fps / k`` keeps each frame's time."""
    step = max(1, math.ceil(len(urls) / max(1, max_frames)))
    return [(i, urls[i]) for i in range(0, len(urls), step)], fps / step


class MediaBudget:
    """One request's fetches: at most ``concurrency`` at once, ``max_bytes`` in all. ``fetch`` is
    ``resolve_media``'s shape: (url, kind, limits) -> bytes; each call gets ``limits`` with its size
    limit lowered to what is left of the budget."""

    def __init__(self, fetch: LimitedFetcher, limits: FetchLimits, max_bytes: int, concurrency: int) -> None:
        self._fetch = fetch
        self._limits = limits
        self._left = max_bytes
        self.max_bytes = max_bytes
        self._slots = asyncio.Semaphore(concurrency)
        self.fetched = 0  # bytes so far
        self.peak = 0  # most fetches in flight at once (tests)
        self._running = 0

    async def __call__(self, url: str, kind: MediaKind) -> bytes:
        """The media's bytes.

        Raises:
            MediaTooLarge: the request's media would pass ``max_bytes`` in all.
            MediaError: whatever the wrapped fetch raises.
        """
        async with self._slots:
            own = self._limits.max_bytes(kind)
            if self._left <= 0:
                raise self._over()
            capped = self._left < own
            limits = replace(self._limits, max_image_bytes=self._left, max_video_bytes=self._left)
            self._running += 1
            self.peak = max(self.peak, self._running)
            try:
                data = await self._fetch(url, kind, limits if capped else self._limits)
            except MediaTooLarge:
                if capped:
                    raise self._over() from None
                raise
            finally:
                self._running -= 1
            self._left -= len(data)
            self.fetched += len(data)
            if self._left < 0:
                raise self._over()
            return data

    def _over(self) -> MediaTooLarge:
        return MediaTooLarge(f"the request's media are larger than {self.max_bytes} bytes in all")
