"""Base64 video bytes -> uniformly sampled RGB frames with their real timestamps, decoded with PyAV.

Everything stays in memory (PyAV reads a file-like object): no temp files. A first pass only demuxes
(cheap) to count frames and learn their presentation times and keyframes. The second decodes just what
the sampled frames need: it seeks to the keyframe before a sampled frame whenever that skips decoding,
and converts only the sampled frames. Memory is bounded by ``max_frames`` frames of at most
``MAX_DECODED_FRAME_PIXELS`` each (larger frames are scaled down while converting; the processor scales
far below that anyway), and by ``pixel_room`` (what is left of the request's pixel budget): checked
against frames x width x height before any frame is decoded (a file: from its header; a frame list: after
its first frame, to whose size all are resized), and again as each frame is kept.
"""

from __future__ import annotations

import bisect
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import av
import numpy as np
from av.container import InputContainer
from transformers.video_utils import VideoMetadata

from services.model.multimodal.images import MAX_ASPECT_RATIO, decode_base64
from services.protocol.errors import InvalidMedia

# Qwen3-VL's reference sampling: 2 frames per second, at least 4 frames (both capped by our limits).
SAMPLE_FPS = 2.0
MIN_FRAMES = 4
MAX_DECODED_FRAME_PIXELS = 1920 * 1080
DEFAULT_FPS = 24.0


@dataclass(slots=True)
class DecodedVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    metadata: VideoMetadata  # fps, total frames, sampled indices: Qwen3-VL's timestamps come from these
    timestamps: list[float]  # seconds of each sampled frame, from the stream's own clock
    # the largest pixel count checked against ``pixel_room`` while decoding (frames x height x width: a
    # file's header estimate or its frames as kept; a frame list's picked frames at the first one's size)
    checked_pixels: int = 0


@dataclass(slots=True)
class _Probe:
    total: int
    fps: float
    duration: float
    pts: list[int] | None  # presentation times of all frames, sorted; None when some are unknown
    keyframes: list[int]  # presentation times of keyframes, sorted
    pixels: int = 0  # width x height from the stream's header (0: unknown)


@dataclass(slots=True)
class _Picked:
    frames: list[np.ndarray] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    room: int | None = None  # pixels the kept frames may have in all (None: no bound)
    pixels: int = 0  # kept so far


def decode_video(
    data: str,
    max_frames: int,
    max_pixels: int,
    max_bytes: int,
    seek: bool = True,
    sample_fps: float = SAMPLE_FPS,
    pixel_room: int | None = None,
) -> DecodedVideo:
    """Decode one base64 video, about ``sample_fps`` frames per second of it (at most ``max_frames``);
    ``seek=False`` decodes sequentially (kept for tests and odd files).

    Raises:
        InvalidMedia: undecodable, a frame over ``max_pixels``, or the sampled frames over ``pixel_room``
            pixels in all (checked from the header before decoding).
    """
    raw = decode_base64(data, max_bytes, "video")
    try:
        return _decode(raw, max_frames, max_pixels, seek, sample_fps, pixel_room)
    except InvalidMedia:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, MemoryError):
        # PyAV's messages name internal objects and paths: the kind of failure only
        raise InvalidMedia("video could not be decoded (corrupt data or unsupported codec)") from None


def _decode(
    raw: bytes, max_frames: int, max_pixels: int, seek: bool, sample_fps: float, room: int | None
) -> DecodedVideo:
    probe = _probe(raw, max_pixels)
    count = frames_to_sample(probe.total, probe.duration, max_frames, sample_fps)
    # a one-frame video counts twice: it becomes a still of 2 frames
    estimate = max(count, 2) * min(probe.pixels, MAX_DECODED_FRAME_PIXELS)
    check_room(estimate, room)
    wanted = sorted(set(np.linspace(0, probe.total - 1, count).round().astype(int).tolist()))
    picked = None
    if seek and probe.pts is not None:
        try:
            picked = _pick(raw, lambda c, s: _pick_seeking(c, s, wanted, probe, max_pixels, room))
        except _CannotSeek:
            picked = None
    if picked is None:
        picked = _pick(raw, lambda c, s: _pick_sequential(c, s, wanted, max_pixels, room))
    if not picked.frames:
        raise InvalidMedia("video has no decodable frames")
    if len(picked.frames) == 1:
        # Qwen3-VL needs at least one temporal patch (2 frames): a one-frame video is a still.
        _keep_again(picked)
    height, width = picked.frames[0].shape[:2]
    metadata = VideoMetadata(
        total_num_frames=probe.total,
        fps=probe.fps,
        width=width,
        height=height,
        duration=probe.duration,
        video_backend="pyav",
        frames_indices=picked.indices,
    )
    return DecodedVideo(
        frames=np.stack(picked.frames),
        metadata=metadata,
        timestamps=picked.times,
        checked_pixels=max(estimate, picked.pixels),
    )


def frames_to_sample(total: int, duration: float, max_frames: int, sample_fps: float = SAMPLE_FPS) -> int:
    """About ``sample_fps`` frames per second, at least ``MIN_FRAMES``, never more than the video has or
    ``max_frames``; even where possible, since frames are paired into temporal patches of 2."""
    wanted = max(MIN_FRAMES, math.ceil(duration * sample_fps))
    count = min(wanted, total, max_frames)
    if count > 2 and count % 2:
        count -= 1
    return max(count, 1)


def frame_list_video(
    frames: list[str],
    fps: float,
    max_frames: int,
    decode: Callable[[str], np.ndarray],
    pixel_room: int | None = None,
) -> DecodedVideo:
    """A video given as its frames (base64 image files, in order, taken ``fps`` per second): at most
    ``max_frames`` of them, picked uniformly (even where possible) and decoded with ``decode`` (RGB
    (H, W, 3) arrays), each resized to the first one's size as it is decoded; their timestamps are
    index / ``fps``.

    Raises:
        InvalidMedia: ``decode``'s, or the picked frames at the first one's size over ``pixel_room``
            pixels in all (checked after the first frame, before the others are decoded).
    """
    count = min(len(frames), max_frames)
    if count > 2 and count % 2:  # frames are paired into temporal patches of 2
        count -= 1
    picked = sorted(set(np.linspace(0, len(frames) - 1, count).round().astype(int).tolist()))
    first = decode(frames[picked[0]])
    height, width = first.shape[:2]
    checked = max(len(picked), 2) * height * width
    check_room(checked, pixel_room)
    arrays = [first]
    for i in picked[1:]:
        array = decode(frames[i])
        arrays.append(array if array.shape[:2] == (height, width) else _resized(array, height, width))
    if len(arrays) == 1:  # one temporal patch needs 2 frames: a one-frame video is a still
        arrays.append(arrays[0])
        picked.append(picked[0])
    metadata = VideoMetadata(
        total_num_frames=len(frames),
        fps=fps,
        width=width,
        height=height,
        duration=len(frames) / fps,
        video_backend="pyav",
        frames_indices=picked,
    )
    return DecodedVideo(
        frames=np.stack(arrays),
        metadata=metadata,
        timestamps=[i / fps for i in picked],
        checked_pixels=checked,
    )


def _resized(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))


def _probe(raw: bytes, max_pixels: int) -> _Probe:
    """Frame count, fps, duration, frame and keyframe times from the container, without decoding."""
    with av.open(io.BytesIO(raw), mode="r") as container:
        stream = _video_stream(container)
        width, height = stream.codec_context.width or 0, stream.codec_context.height or 0
        _check_size(width, height, max_pixels)
        pts: list[int | None] = []
        keyframes: list[int] = []
        for packet in container.demux(stream):
            if packet.size <= 0:
                continue  # the demuxer's end-of-stream marker
            pts.append(packet.pts)
            if packet.is_keyframe and packet.pts is not None:
                keyframes.append(packet.pts)
        rate = stream.average_rate or stream.guessed_rate
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
    total = len(pts)
    if total == 0:
        raise InvalidMedia("video has no frames")
    fps = float(rate) if rate else (total / duration if duration > 0 else DEFAULT_FPS)
    known = None if any(p is None for p in pts) else sorted(p for p in pts if p is not None)
    return _Probe(total, fps, duration or total / fps, known, sorted(keyframes), width * height)


class _CannotSeek(Exception):
    """Decoded frames lack timestamps: fall back to decoding in order."""


def check_room(pixels: int, room: int | None) -> None:
    """Refuse a video of ``pixels`` decoded pixels (frames x height x width) when they pass ``room``,
    what is left of the request's pixel budget (None: no bound).

    Raises:
        InvalidMedia: the request's pixel budget would be passed.
    """
    if room is not None and pixels > room:
        raise InvalidMedia("the request's media have more decoded pixels in all than the service allows")


def _pick(raw: bytes, how: Callable[[InputContainer, av.VideoStream], _Picked]) -> _Picked:
    with av.open(io.BytesIO(raw), mode="r") as container:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"
        return how(container, stream)


def _pick_sequential(
    container: InputContainer,
    stream: av.VideoStream,
    wanted: list[int],
    max_pixels: int,
    room: int | None = None,
) -> _Picked:
    """Decode in order, converting the frames at the ``wanted`` (sorted) indices; stop after the last."""
    picked = _Picked(room=room)
    pending = iter(wanted)
    target = next(pending, None)
    last: tuple[int, av.VideoFrame] | None = None
    for index, frame in enumerate(container.decode(stream)):
        last = (index, frame)
        if index == target:
            _keep(picked, frame, index, max_pixels)
            target = next(pending, None)
            if target is None:
                break
    # The demux count can exceed the decoded frames (e.g. a truncated tail): keep the last frame then.
    if target is not None and last is not None and (not picked.indices or picked.indices[-1] != last[0]):
        _keep(picked, last[1], last[0], max_pixels)
    return picked


def _pick_seeking(
    container: InputContainer,
    stream: av.VideoStream,
    wanted: list[int],
    probe: _Probe,
    max_pixels: int,
    room: int | None = None,
) -> _Picked:
    """For each wanted frame, seek to the keyframe before it when that keyframe lies ahead of where the
    decoder is (so nothing is decoded twice), else decode on; keep the first frame at or after it."""
    assert probe.pts is not None  # checked by the caller
    picked = _Picked(room=room)
    frames: Iterator[av.VideoFrame] | None = None
    position = -math.inf  # pts of the last decoded frame
    for index in wanted:
        target = probe.pts[index]
        keyframe = _keyframe_at_or_before(probe.keyframes, target)
        if frames is None or (keyframe is not None and keyframe > position):
            container.seek(target, stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        frame = _first_at_or_after(frames, target)
        if frame is None:
            break
        position = frame.pts
        found = min(bisect.bisect_left(probe.pts, frame.pts), probe.total - 1)
        if not picked.indices or found > picked.indices[-1]:
            _keep(picked, frame, found, max_pixels)
    return picked


def _keyframe_at_or_before(keyframes: list[int], pts: int) -> int | None:
    i = bisect.bisect_right(keyframes, pts)
    return keyframes[i - 1] if i else None


def _first_at_or_after(frames: Iterator[av.VideoFrame], pts: int) -> av.VideoFrame | None:
    for frame in frames:
        if frame.pts is None:
            raise _CannotSeek
        if frame.pts >= pts:
            return frame
    return None


def _keep(picked: _Picked, frame: av.VideoFrame, index: int, max_pixels: int) -> None:
    _check_size(frame.width, frame.height, max_pixels)
    pixels = min(frame.width * frame.height, MAX_DECODED_FRAME_PIXELS)
    picked.pixels += pixels
    check_room(picked.pixels, picked.room)
    picked.frames.append(_to_rgb_array(frame))
    picked.times.append(float(frame.time or 0.0))
    picked.indices.append(index)


def _keep_again(picked: _Picked) -> None:
    picked.frames.append(picked.frames[-1])
    picked.times.append(picked.times[-1])
    picked.indices.append(picked.indices[-1])


def _check_size(width: int | None, height: int | None, max_pixels: int) -> None:
    if width and height and width * height > max_pixels:
        raise InvalidMedia(f"video frames are {width}x{height}: more than the limit of {max_pixels} pixels")
    if width and height and max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidMedia(f"video frames are {width}x{height}: more extreme than {MAX_ASPECT_RATIO}:1")


def _video_stream(container: InputContainer) -> av.VideoStream:
    if not container.streams.video:
        raise InvalidMedia("the file has no video stream")
    return container.streams.video[0]


def _to_rgb_array(frame: av.VideoFrame) -> np.ndarray:
    width, height = frame.width, frame.height
    if width * height > MAX_DECODED_FRAME_PIXELS:
        scale = math.sqrt(MAX_DECODED_FRAME_PIXELS / (width * height))
        width, height = max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)
        return frame.to_ndarray(format="rgb24", width=width, height=height)
    return frame.to_ndarray(format="rgb24")
