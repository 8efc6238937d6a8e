"""Internal ``Message`` list -> processor inputs (token ids, mm token types, pixel tensors).

CPU work (media decoding, chat template, image/video processing): the engine runs it in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.model.multimodal.images import decode_image
from services.model.multimodal.video import DecodedVideo, decode_video
from services.protocol.errors import InvalidMedia, InvalidRequest
from services.protocol.generate import ImagePart, Message, TextPart, VideoPart


@dataclass(frozen=True, slots=True)
class MediaLimits:
    max_video_frames: int
    max_image_pixels: int  # per image, and per video frame
    max_media_bytes: int  # per media item, decoded from base64

    @classmethod
    def from_settings(cls, settings: Any) -> MediaLimits:
        return cls(
            max_video_frames=settings.max_video_frames,
            max_image_pixels=settings.max_image_pixels,
            max_media_bytes=settings.max_media_bytes,
        )


@dataclass(slots=True)
class _Conversation:
    messages: list[dict[str, Any]]
    videos: list[DecodedVideo]


def build_inputs(processor: Any, messages: list[Message], limits: MediaLimits) -> Any:
    """Render the chat template with the generation prompt and run the processor.

    Returns a ``transformers.BatchFeature`` with ``input_ids`` (1, L), ``attention_mask``,
    ``mm_token_type_ids`` and, when present, ``pixel_values``/``image_grid_thw`` and
    ``pixel_values_videos``/``video_grid_thw``. Raises ``InvalidMedia`` for bad media and
    ``InvalidRequest`` when the processor rejects the input.
    """
    conv = _to_conversation(messages, limits)
    processor_kwargs: dict[str, Any] = {}
    if conv.videos:
        processor_kwargs.update(
            # Frames are sampled already; the metadata (fps, indices) gives Qwen3-VL its timestamps.
            video_metadata=[v.metadata for v in conv.videos],
            do_sample_frames=False,
            # The reference (qwen-vl-utils) per-frame pixel budget; also silences a transformers warning.
            cap_pixels_per_frame=True,
        )
    try:
        return processor.apply_chat_template(
            conv.messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            # Control tokens typed by users (<|im_start|>, <|image_pad|>, ...) are encoded as plain text.
            sanitize_control_tokens=True,
            processor_kwargs=processor_kwargs,
        )
    except ValueError as exc:  # the processor's way of rejecting an input it cannot handle
        raise InvalidRequest(f"the prompt could not be processed: {str(exc)[:300]}") from None


def _to_conversation(messages: list[Message], limits: MediaLimits) -> _Conversation:
    conv = _Conversation(messages=[], videos=[])
    for message in messages:
        if isinstance(message.content, str):
            conv.messages.append({"role": message.role, "content": message.content})
            continue
        parts = [_part(p, limits, conv.videos) for p in message.content]
        conv.messages.append({"role": message.role, "content": parts})
    return conv


def _part(part: TextPart | ImagePart | VideoPart, limits: MediaLimits, videos: list[DecodedVideo]) -> dict:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        image = decode_image(part.data, limits.max_image_pixels, limits.max_media_bytes)
        return {"type": "image", "image": image}
    if isinstance(part, VideoPart):
        video = decode_video(
            part.data, limits.max_video_frames, limits.max_image_pixels, limits.max_media_bytes
        )
        videos.append(video)
        return {"type": "video", "video": video.frames}
    raise InvalidMedia(f"unsupported content part {type(part).__name__}")
