"""Internal ``Message`` list -> processor inputs (token ids, mm token types, pixel tensors).

CPU work (media decoding, chat template, image/video processing): the engine runs it in a worker thread.

The processor's ``apply_chat_template`` renders and tokenizes the conversation; its media steps
(``_process_images`` / ``_process_videos``: run the image or video processor on all items at once, then
the prompt text of each item's placeholder) are replaced, on a per-call copy of the processor, by the same
steps one item at a time through the processed-media cache (``media_cache.py``): an item whose raw bytes
and parameters were seen before (in an earlier request, or earlier in this one) is neither decoded nor
processed again; each place it takes still counts against the request's pixel budget. The processor's
own per-item results concatenate to exactly what one call on all items gives
(``tests/model/test_media_cache.py``). The conversation given to the template holds one-pixel stand-ins
for the media (the template only writes their pad tokens; the processor only checks there is one per pad
token). Should a transformers release stop routing media through those two steps, the stand-ins would be
processed silently: ``check_media_routing`` (at load) and a check after each render raise
``MediaRoutingError`` instead.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jinja2 import TemplateError
from transformers.image_utils import make_flat_list_of_images
from transformers.video_utils import make_batched_videos

from services.model.multimodal.budget import (
    PixelBand,
    processor_band,
    request_band,
    resize_frames,
    resize_image,
)
from services.model.multimodal.images import decode_image
from services.model.multimodal.limits import MediaLimits, check_media_counts, check_media_options
from services.model.multimodal.media_cache import MediaCache, ProcessedMedia, media_key
from services.model.multimodal.video import (
    SAMPLE_FPS,
    DecodedVideo,
    check_room,
    decode_video,
    frame_list_video,
)
from services.protocol.errors import InvalidMedia, InvalidRequest
from services.protocol.generate import ImagePart, MediaOptions, Message, TextPart, Tool, VideoPart

__all__ = [
    "MediaLimits",
    "MediaRoutingError",
    "PromptInputs",
    "build_inputs",
    "check_media_routing",
    "prepare_prompt",
]

log = logging.getLogger(__name__)

# What the template and the processor's input checks see in place of an image (H, W, 3) or a video
# (T, H, W, 3): the real pixels go through the per-item steps.
_IMAGE_STAND_IN = np.zeros((1, 1, 3), dtype=np.uint8)
_VIDEO_STAND_IN = np.zeros((1, 1, 1, 3), dtype=np.uint8)
_PIXEL_KEYS = {"image": "pixel_values", "video": "pixel_values_videos"}  # the digests' keys, by kind


class MediaRoutingError(RuntimeError):
    """The processor did not hand a conversation's images or videos to ``_process_images`` /
    ``_process_videos`` (once, with all of that kind's items): the per-item path could not run, and the
    one-pixel stand-ins would have been processed instead. A transformers other than the pinned one."""


class _Reached(Exception):
    """Raised by ``check_media_routing``'s hook: the processor routed the item through it."""


@dataclass(slots=True)
class _Item:
    """One image or video of the conversation: cached already (``done``), or decoded and resized
    (``media``: a PIL image or (T, H, W, 3) uint8 frames, with a video's ``metadata``) for the processor;
    ``key``: its cache key (None: no cache); ``pixels``: its decoded pixels (counted against the request's
    budget); ``checked``: a video's pixels as its decoder checked them against the budget's room
    (``DecodedVideo.checked_pixels``)."""

    key: bytes | None
    pixels: int
    checked: int = 0
    done: ProcessedMedia | None = None
    media: Any = None
    metadata: Any = None


@dataclass(slots=True)
class _Conversation:
    """One request's conversation as ``prepare_prompt`` builds it: ``messages`` for the chat template
    (media replaced by stand-ins), the request's images and videos in order (``_Item``s; an item sent
    twice is the same ``_Item`` twice), what bounds and shapes them (``limits``, the processor's ``band``,
    the request's ``options``), the processed-media ``cache`` and the pixels decoded so far."""

    messages: list[dict[str, Any]]
    limits: MediaLimits
    band: PixelBand  # the processor's own pixel band (per-request budgets narrow it per item)
    options: MediaOptions | None = None
    cache: MediaCache | None = None
    images: list[_Item] = field(default_factory=list)
    videos: list[_Item] = field(default_factory=list)
    pixels: int = 0  # decoded so far, all media of the request
    in_hook: bool = False  # a per-item hook (``_process``) is running; an error escaping it leaves it set
    seen: dict[bytes, _Item] = field(default_factory=dict)  # this request's items by cache key

    def count(self, pixels: int, limit: int) -> None:
        """Add one item's decoded ``pixels`` (width x height, times frames for a video) to the request's.

        Raises:
            InvalidMedia: the request's media now have more than ``limit`` (MAX_REQUEST_PIXELS) pixels.
        """
        self.pixels += pixels
        if self.pixels > limit:
            raise InvalidMedia(f"the request's media have more than {limit} decoded pixels in all")

    def lookup(self, kind: str, parameters: tuple, data: list[str]) -> tuple[_Item, bool]:
        """(the item, whether it is known): the same item earlier in this request (decoded, or cached;
        one ``_Item`` stands for both places, processed once), the cache's entry (``done``), or a new
        item to decode (``media`` unset; not known). Without a cache, every item is new."""
        if self.cache is None or not self.cache.max_bytes:
            return _Item(key=None, pixels=0), False
        key = media_key(kind, (parameters, self.limits, self.band), data)
        item = self.seen.get(key)
        if item is not None:
            return item, True
        done = self.cache.get(key)
        if done is None:
            item = _Item(key=key, pixels=0)
        else:
            item = _Item(key=key, pixels=done.pixels, checked=done.checked_pixels, done=done)
        self.seen[key] = item
        return item, done is not None


@dataclass(frozen=True, slots=True)
class PromptInputs:
    """``inputs``: what ``build_inputs`` returns; ``digests``: the media items' pixel digests by pixel key
    (``pixel_values`` / ``pixel_values_videos``, in order; None where not computed), for
    ``prefix.prompt_key``."""

    inputs: Any
    digests: dict[str, list[bytes | None]]


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
    return prepare_prompt(processor, messages, limits, tools, options).inputs


def prepare_prompt(
    processor: Any,
    messages: list[Message],
    limits: MediaLimits,
    tools: list[Tool] | None = None,
    options: MediaOptions | None = None,
    cache: MediaCache | None = None,
) -> PromptInputs:
    """``build_inputs`` through the processed-media ``cache`` (None or a 0-byte cache: none), with the
    items' pixel digests (computed for the items the cache takes, else None). The same errors as
    ``build_inputs``, and ``MediaRoutingError`` (a RuntimeError: a 500, not the client's fault) when the
    processor did not route the media through the per-item hooks (another transformers version)."""
    check_media_options(options, limits)
    conv = _to_conversation(messages, limits, processor_band(processor), options, cache)
    view = copy.copy(processor)  # a shallow copy: the tokenizer and sub-processors are shared
    digests: dict[str, list[bytes | None]] = {}
    # The hooks name the shared processor, not the view: a view -> hook -> view cycle would keep the
    # decoded media (held by ``conv``) alive until the garbage collector's next full pass.
    view._process_images = lambda images, **kw: _process(processor, conv, "image", images, kw, digests)
    view._process_videos = lambda videos, **kw: _process(processor, conv, "video", videos, kw, digests)
    processor_kwargs: dict[str, Any] = {}
    if conv.videos:
        processor_kwargs.update(
            # Frames are sampled already; each item's metadata (fps, indices) gives Qwen3-VL its timestamps.
            do_sample_frames=False,
            # The reference (qwen-vl-utils) per-frame pixel budget; also silences a transformers warning.
            cap_pixels_per_frame=True,
        )
    inputs = _render(view, conv, tools, processor_kwargs, digests)
    _check_routed(conv, digests)
    return PromptInputs(inputs, digests)


def _check_routed(conv: _Conversation, digests: dict) -> None:
    """Raises ``MediaRoutingError`` when a kind of media the conversation has never reached ``_process``
    (the processor handled the stand-ins itself)."""
    for kind, items in (("image", conv.images), ("video", conv.videos)):
        if items and _PIXEL_KEYS[kind] not in digests:
            raise _unrouted(kind, f"did not route its {kind}s")


def check_media_routing(processor: Any) -> None:
    """At load: that ``processor.apply_chat_template`` hands a conversation's images and videos to
    ``_process_images`` / ``_process_videos``, which ``prepare_prompt`` replaces with its per-item path
    (a template render per kind, about a millisecond; no media are processed).

    Raises:
        MediaRoutingError: a kind of media does not reach its hook (naming the transformers needed).
    """
    for kind, stand_in in (("image", _IMAGE_STAND_IN), ("video", _VIDEO_STAND_IN)):
        view = copy.copy(processor)

        def reached(media: Any, **kwargs: Any) -> Any:
            raise _Reached

        setattr(view, f"_process_{kind}s", reached)
        conversation = [{"role": "user", "content": [{"type": kind, kind: stand_in}]}]
        try:
            view.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except _Reached:
            continue
        except Exception as exc:
            raise _unrouted(kind, f"failed before it routed its {kind}s") from exc
        raise _unrouted(kind, f"did not route its {kind}s")


def _unrouted(kind: str, what: str) -> MediaRoutingError:
    import transformers

    return MediaRoutingError(
        f"the processor {what} (ProcessorMixin._process_{kind}s, one call with all of a request's {kind}s): "
        "the per-item media path of services/model/multimodal/prompt.py needs a transformers whose "
        "processors route media so, as the pinned transformers==5.24.0 (services/model/requirements.txt) "
        f"does; this is transformers {transformers.__version__}"
    )


def _render(
    view: Any, conv: _Conversation, tools: list[Tool] | None, processor_kwargs: dict, digests: dict
) -> Any:
    """``view.apply_chat_template`` on the conversation with its hooks in place: the ``BatchFeature``.

    Raises:
        InvalidRequest: the chat template raised (its message, for users), or the processor refused an
            input (logged; a generic message).
        MediaRoutingError: the processor refused the stand-ins of media it did not route to the hooks.
    """
    try:
        return view.apply_chat_template(
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
        if not conv.in_hook:  # raised outside the per-item path: did the processor bypass it?
            _check_routed(conv, digests)
        # the processor rejects an input; its text names internals (shapes, class names): logged, not sent
        log.info("the processor refused a prompt: %s", str(exc)[:500])
        raise InvalidRequest(
            "the prompt could not be processed (an image or video the processor refuses)"
        ) from None


def _process(
    processor: Any, conv: _Conversation, kind: str, stand_ins: Any, kwargs: dict[str, Any], digests: dict
) -> tuple[dict[str, Any], list[str]]:
    """The processor's ``_process_images``/``_process_videos`` for ``conv``'s items of ``kind``, one at a
    time: (the items' tensors concatenated in order, each item's placeholder text). ``stand_ins``: what
    the processor hands the hook (the conversation's stand-ins, one per item); ``kwargs``: its merged
    keyword arguments for that modality. Each item's decoded media are let go as soon as it is processed.

    Raises:
        MediaRoutingError: the processor handed not all of the items at once, or called the hook twice.
    """
    items = conv.images if kind == "image" else conv.videos
    given = len(make_flat_list_of_images(stand_ins) if kind == "image" else make_batched_videos(stand_ins))
    if given != len(items) or _PIXEL_KEYS[kind] in digests:
        raise _unrouted(kind, f"routed {given} of {len(items)} {kind}s, or in more than one call")
    conv.in_hook = True
    done: list[ProcessedMedia] = []
    for item in items:  # an item sent twice is one _Item: processed at its first place
        if item.done is None:
            item.done = _run(processor, item, kind, kwargs, conv.cache)
        done.append(item.done)
    conv.in_hook = False
    digests[_PIXEL_KEYS[kind]] = [d.digest or None for d in done]
    keys = done[0].tensors.keys()
    if len(done) == 1:  # shared with the cache, not copied (see media_cache.py)
        data = dict(done[0].tensors)
    else:
        data = {k: torch.cat([d.tensors[k] for d in done]) for k in keys}
    return data, [d.placeholder for d in done]


def _run(
    processor: Any, item: _Item, kind: str, kwargs: dict[str, Any], cache: MediaCache | None
) -> ProcessedMedia:
    """Process one decoded item alone (its ``media`` are dropped then); kept in ``cache`` when the item
    has a key."""
    from services.model.engine.prefix import media_digest

    kwargs = {**kwargs, "return_tensors": "pt"}
    media, item.media = item.media, None  # the item lets go of its decoded pixels; they die with this call
    if kind == "image":
        out = processor.image_processor([media], **kwargs)
        placeholder = processor.replace_image_token(out, 0, **kwargs)
        pixels, grids = out["pixel_values"], out["image_grid_thw"]
    else:
        kwargs["video_metadata"] = [item.metadata]
        out = processor.video_processor([media], **kwargs)
        placeholder = processor.replace_video_token(out, 0, **kwargs)
        pixels, grids = out["pixel_values_videos"], out["video_grid_thw"]
    tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    digest = media_digest(grids[0], pixels) if item.key is not None else b""
    processed = ProcessedMedia(tensors, placeholder, digest, item.pixels, checked_pixels=item.checked)
    if cache is not None and item.key is not None:
        cache.put(item.key, processed)
    return processed


def _to_conversation(
    messages: list[Message],
    limits: MediaLimits,
    band: PixelBand,
    options: MediaOptions | None,
    cache: MediaCache | None,
) -> _Conversation:
    check_media_counts(messages, limits)
    conv = _Conversation(messages=[], limits=limits, band=band, options=options, cache=cache)
    for i, message in enumerate(messages):
        if isinstance(message.content, str):
            content: Any = message.content
        else:
            content = [_located_part(p, conv, i, j) for j, p in enumerate(message.content)]
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


def _located_part(part: TextPart | ImagePart | VideoPart, conv: _Conversation, i: int, j: int) -> dict:
    """:func:`_part`, its ``InvalidMedia`` naming the part first: ``messages[i].content[j]: <reason>`` (the
    api keeps the client's message and part indexes, so this is the public path; ``InvalidMedia.param``)."""
    try:
        return _part(part, conv)
    except InvalidMedia as exc:
        raise InvalidMedia(f"messages[{i}].content[{j}]: {exc.message}") from None


def _part(part: TextPart | ImagePart | VideoPart, conv: _Conversation) -> dict:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        conv.images.append(_image(part, conv))
        return {"type": "image", "image": _IMAGE_STAND_IN}
    if isinstance(part, VideoPart):
        conv.videos.append(_video(part, conv))
        return {"type": "video", "video": _VIDEO_STAND_IN}
    raise InvalidMedia(f"unsupported content part {type(part).__name__}")


def _image(part: ImagePart, conv: _Conversation) -> _Item:
    """A known image (cached, or earlier in the request), or the image decoded and resized to its band;
    its pixels counted either way."""
    limits = conv.limits
    band = request_band(conv.band, conv.options, part.detail == "low", limits)
    item, known = conv.lookup("image", (band,), [part.data])
    if known:
        conv.count(item.pixels, limits.max_request_pixels)
        return item
    image = decode_image(part.data, limits.max_image_pixels, limits.max_media_bytes)
    item.pixels = image.width * image.height
    conv.count(item.pixels, limits.max_request_pixels)
    item.media = resize_image(image, band)
    return item


def _video(part: VideoPart, conv: _Conversation) -> _Item:
    """A known video (cached, or earlier in the request), or a video file (sampled at
    ``mm_processor_kwargs.fps``, default 2 per second) or a list of frames (taken at the part's ``fps``,
    else the request's, else 2 per second) decoded and resized to its band; at most ``max_frames`` (the
    request's, within MAX_VIDEO_FRAMES) frames. Its pixels are counted against the request's budget
    either way; ``InvalidMedia`` past it."""
    limits, options = conv.limits, conv.options
    max_frames = limits.max_video_frames
    if options is not None and options.max_frames is not None:
        max_frames = min(max_frames, options.max_frames)
    fps = options.fps if options is not None and options.fps is not None else None
    sample_fps = (part.fps or fps or SAMPLE_FPS) if part.frames else (fps or SAMPLE_FPS)
    band = request_band(conv.band, options, False, limits)
    kind = "frames" if part.frames else "video"
    item, known = conv.lookup(kind, (max_frames, sample_fps, band), part.frames or [part.data])
    room = limits.max_request_pixels - conv.pixels  # checked before the frames are decoded
    if known:  # refused exactly as decoding it afresh would be, with this room
        check_room(item.checked, room)
        conv.count(item.pixels, limits.max_request_pixels)
        return item
    video = _decode_video(part, limits, max_frames, sample_fps, room)
    frames, height, width = video.frames.shape[:3]
    item.pixels, item.checked = frames * height * width, video.checked_pixels
    conv.count(item.pixels, limits.max_request_pixels)
    item.media, item.metadata = resize_frames(video.frames, band), video.metadata
    return item


def _decode_video(
    part: VideoPart, limits: MediaLimits, max_frames: int, sample_fps: float, room: int
) -> DecodedVideo:
    """Decode a video part: its frame list (each a base64 image, taken ``sample_fps`` per second) or its
    file (sampled about ``sample_fps`` frames per second); at most ``max_frames`` frames, each within
    ``limits``' image pixels and media bytes, all together within ``room`` pixels (what is left of the
    request's budget). Returns (T, H, W, 3) uint8 frames with their metadata and the pixels checked.

    Raises:
        InvalidMedia: undecodable, a frame too large, or the frames over ``room``.
    """
    if part.frames:

        def decode(data: str) -> np.ndarray:
            return np.asarray(decode_image(data, limits.max_image_pixels, limits.max_media_bytes))

        return frame_list_video(part.frames, sample_fps, max_frames, decode, room)
    return decode_video(
        part.data,
        max_frames,
        limits.max_image_pixels,
        limits.max_media_bytes,
        sample_fps=sample_fps,
        pixel_room=room,
    )
