"""Per-item and per-request media limits, the count check that runs before any media is decoded, and the
processor's visual-token caps.

Torch-free (the fake engine applies the same counts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from services.protocol.errors import InvalidMedia, InvalidValue
from services.protocol.generate import ImagePart, MediaOptions, Message, VideoPart

PIXELS_PER_TOKEN = 32 * 32  # one Qwen3-VL visual token: a 2 x 2 merge of 16 x 16 patches


@dataclass(frozen=True, slots=True)
class MediaLimits:
    max_video_frames: int
    max_image_pixels: int  # per image, and per video frame
    max_media_bytes: int  # per media item, decoded from base64
    max_images: int = 16  # per request
    max_videos: int = 2  # per request
    max_request_pixels: int = 128 * 1024 * 1024  # all decoded images and video frames of a request
    max_image_tokens: int = 16384  # per image (MAX_IMAGE_TOKENS): the cap of mm_processor_kwargs pixels
    low_detail_image_tokens: int = 64  # per image sent with detail "low"

    @classmethod
    def from_settings(cls, settings: Any) -> MediaLimits:
        return cls(
            max_video_frames=settings.max_video_frames,
            max_image_pixels=settings.max_image_pixels,
            max_media_bytes=settings.max_media_bytes,
            max_images=settings.max_images_per_request,
            max_videos=settings.max_videos_per_request,
            max_request_pixels=settings.max_request_pixels,
            max_image_tokens=settings.max_image_tokens,
            low_detail_image_tokens=min(settings.low_detail_image_tokens, settings.max_image_tokens),
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


def check_media_options(options: MediaOptions | None, limits: MediaLimits) -> None:
    """Refuse per-request budgets over the service's caps: ``max_frames`` over MAX_VIDEO_FRAMES,
    ``min_pixels``/``max_pixels`` over MAX_IMAGE_TOKENS visual tokens of 32 x 32 pixels, ``min_pixels``
    over ``max_pixels``. Raises ``InvalidValue`` whose message starts with the public parameter."""
    if options is None:
        return
    name = "mm_processor_kwargs"
    if options.max_frames is not None and options.max_frames > limits.max_video_frames:
        cap = limits.max_video_frames
        raise InvalidValue(f"{name}.max_frames: at most {cap} frames per video on this server")
    cap = limits.max_image_tokens * PIXELS_PER_TOKEN
    for field in ("min_pixels", "max_pixels"):
        value = getattr(options, field)
        if value is not None and value > cap:
            raise InvalidValue(f"{name}.{field}: at most {cap} pixels ({limits.max_image_tokens} tokens)")
    low, high = options.min_pixels, options.max_pixels
    if low is not None and high is not None and low > high:
        raise InvalidValue(f"{name}.min_pixels: greater than max_pixels")


def cap_visual_tokens(processor: Any, image_tokens: int, frame_tokens: int) -> tuple[int, int]:
    """Lower the processor's resize budgets so that one image has at most ``image_tokens`` visual tokens
    (MAX_IMAGE_TOKENS) and one video temporal patch (2 frames) at most ``frame_tokens``
    (MAX_VIDEO_FRAME_TOKENS): larger media are downscaled (aspect kept), never refused. A visual token
    is one merged patch: (patch_size * merge_size)^2 pixels, 32 x 32 for Qwen3-VL. The checkpoint's own
    budgets are kept when they are lower. Returns the caps in force (image tokens, frame tokens)."""
    images = processor.image_processor
    factor = images.patch_size * images.merge_size
    longest = min(_edge(images.size, "longest_edge"), image_tokens * factor * factor)
    shortest = min(_edge(images.size, "shortest_edge"), longest)
    images.size = _with_edges(images.size, longest, shortest)
    videos = getattr(processor, "video_processor", None)
    frames = frame_tokens
    if videos is not None:
        frames = min(int(videos.max_video_tokens), frame_tokens)
        videos.max_video_tokens = frames
    return longest // (factor * factor), frames


def _edge(size: Any, name: str) -> int:
    return int(size[name] if isinstance(size, dict) else getattr(size, name))


def _with_edges(size: Any, longest: int, shortest: int) -> Any:
    if isinstance(size, dict):
        return {**size, "longest_edge": longest, "shortest_edge": shortest}
    return dataclasses.replace(size, longest_edge=longest, shortest_edge=shortest)  # transformers' SizeDict
