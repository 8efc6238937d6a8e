"""Internal ``Message`` list -> processor inputs (token ids, mm token types, pixel tensors).

CPU work (media decoding, chat template, image/video processing): the engine runs it in a worker thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from jinja2 import TemplateError

from services.model.multimodal.budget import (
    PixelBand,
    processor_band,
    request_band,
    resize_frames,
    resize_image,
)
from services.model.multimodal.images import decode_image
from services.model.multimodal.limits import MediaLimits, check_media_counts, check_media_options
from services.model.multimodal.video import SAMPLE_FPS, DecodedVideo, decode_video, frame_list_video
from services.protocol.errors import InvalidMedia, InvalidRequest
from services.protocol.generate import ImagePart, MediaOptions, Message, TextPart, Tool, VideoPart

__all__ = ["MediaLimits", "build_inputs"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Conversation:
    messages: list[dict[str, Any]]
    videos: list[DecodedVideo]
    limits: MediaLimits
    band: PixelBand  # the processor's own pixel band (per-request budgets narrow it per item)
    options: MediaOptions | None = None
    pixels: int = 0  # decoded so far, all media of the request

    def count(self, pixels: int, limit: int) -> None:
        self.pixels += pixels
        if self.pixels > limit:
            raise InvalidMedia(f"the request's media have more than {limit} decoded pixels in all")


def build_inputs(
    processor: Any,
    messages: list[Message],
    limits: MediaLimits,
    tools: list[Tool] | None = None,
    options: MediaOptions | None = None,
) -> Any:
    """Render the chat template with the generation prompt and run the processor. ``tools`` go to the
    template as ``tools=[{"type": "function", "function": {...}}]`` (what Qwen3 templates expect);
    ``options`` are the request's media budgets (``budget.py``; checked against ``limits``).

    Returns a ``transformers.BatchFeature`` with ``input_ids`` (1, L), ``attention_mask``,
    ``mm_token_type_ids`` and, when present, ``pixel_values``/``image_grid_thw`` and
    ``pixel_values_videos``/``video_grid_thw``. Raises ``InvalidMedia`` for bad media and
    ``InvalidRequest`` when the processor rejects the input.
    """
    check_media_options(options, limits)
    conv = _to_conversation(messages, limits, processor_band(processor), options)
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
            tools=[t.model_dump(exclude_none=True) for t in tools] if tools else None,
            # Control tokens typed by users (<|im_start|>, <|image_pad|>, ...) are encoded as plain text.
            sanitize_control_tokens=True,
            processor_kwargs=processor_kwargs,
        )
    except TemplateError as exc:
        # the checkpoint's chat template calls raise_exception (Qwen's does for a conversation without a user
        # message, for example): its text is written for users
        raise InvalidRequest(
            f"the conversation cannot be rendered by the model's chat template: {exc}"[:300]
        ) from None
    except ValueError as exc:
        # the processor rejects an input; its text names internals (shapes, class names): logged, not sent
        log.info("the processor refused a prompt: %s", str(exc)[:500])
        raise InvalidRequest(
            "the prompt could not be processed (an image or video the processor refuses)"
        ) from None


def _to_conversation(
    messages: list[Message], limits: MediaLimits, band: PixelBand, options: MediaOptions | None
) -> _Conversation:
    check_media_counts(messages, limits)
    conv = _Conversation(messages=[], videos=[], limits=limits, band=band, options=options)
    for message in messages:
        if isinstance(message.content, str):
            content: Any = message.content
        else:
            content = [_part(p, conv) for p in message.content]
        conv.messages.append({"role": message.role, "content": content, **_tool_fields(message)})
    return conv


def _tool_fields(message: Message) -> dict[str, Any]:
    """A history turn's calls (``tool_calls`` with ``function.arguments`` as the JSON text sent) or the
    id a tool result answers; nothing for other turns."""
    out: dict[str, Any] = {}
    if message.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _part(part: TextPart | ImagePart | VideoPart, conv: _Conversation) -> dict:
    limits = conv.limits
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        image = decode_image(part.data, limits.max_image_pixels, limits.max_media_bytes)
        conv.count(image.width * image.height, limits.max_request_pixels)
        band = request_band(conv.band, conv.options, part.detail == "low", limits)
        return {"type": "image", "image": resize_image(image, band)}
    if isinstance(part, VideoPart):
        video = _video(part, conv)
        frames, height, width = video.frames.shape[:3]
        conv.count(frames * height * width, limits.max_request_pixels)
        video.frames = resize_frames(video.frames, request_band(conv.band, conv.options, False, limits))
        conv.videos.append(video)
        return {"type": "video", "video": video.frames}
    raise InvalidMedia(f"unsupported content part {type(part).__name__}")


def _video(part: VideoPart, conv: _Conversation) -> DecodedVideo:
    """Decode a video file (sampled at ``mm_processor_kwargs.fps``, default 2 per second) or a list of
    frames (taken at the part's ``fps``, else the request's, else 2 per second)."""
    limits, options = conv.limits, conv.options
    max_frames = limits.max_video_frames
    if options is not None and options.max_frames is not None:
        max_frames = min(max_frames, options.max_frames)
    fps = options.fps if options is not None and options.fps is not None else None
    room = limits.max_request_pixels - conv.pixels  # checked before the frames are decoded
    if part.frames:

        def decode(data: str) -> np.ndarray:
            return np.asarray(decode_image(data, limits.max_image_pixels, limits.max_media_bytes))

        return frame_list_video(part.frames, part.fps or fps or SAMPLE_FPS, max_frames, decode, room)
    return decode_video(
        part.data,
        max_frames,
        limits.max_image_pixels,
        limits.max_media_bytes,
        sample_fps=fps or SAMPLE_FPS,
        pixel_room=room,
    )
