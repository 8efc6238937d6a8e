"""Per-item and per-request media limits, and the count check that runs before any media is decoded.

Torch-free (the fake engine applies the same counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.protocol.errors import InvalidMedia
from services.protocol.generate import ImagePart, Message, VideoPart


@dataclass(frozen=True, slots=True)
class MediaLimits:
    max_video_frames: int
    max_image_pixels: int  # per image, and per video frame
    max_media_bytes: int  # per media item, decoded from base64
    max_images: int = 16  # per request
    max_videos: int = 2  # per request
    max_request_pixels: int = 128 * 1024 * 1024  # all decoded images and video frames of a request

    @classmethod
    def from_settings(cls, settings: Any) -> MediaLimits:
        return cls(
            max_video_frames=settings.max_video_frames,
            max_image_pixels=settings.max_image_pixels,
            max_media_bytes=settings.max_media_bytes,
            max_images=settings.max_images_per_request,
            max_videos=settings.max_videos_per_request,
            max_request_pixels=settings.max_request_pixels,
        )


def check_media_counts(messages: list[Message], limits: MediaLimits) -> None:
    """Refuse a request with too many images or videos before decoding any of them."""
    parts = [p for m in messages if not isinstance(m.content, str) for p in m.content]
    images = sum(isinstance(p, ImagePart) for p in parts)
    videos = sum(isinstance(p, VideoPart) for p in parts)
    if images > limits.max_images:
        raise InvalidMedia(f"the request has {images} images; at most {limits.max_images} are allowed")
    if videos > limits.max_videos:
        raise InvalidMedia(f"the request has {videos} videos; at most {limits.max_videos} are allowed")
