"""Base64 video bytes -> uniformly sampled RGB frames with their real timestamps, decoded with PyAV.

Everything stays in memory (PyAV reads a file-like object): no temp files. A first pass only demuxes
(cheap) to count frames; the second decodes and keeps just the sampled frames, so memory is bounded by
``max_frames`` frames, each at most ``MAX_DECODED_FRAME_PIXELS`` (larger frames are scaled down while
decoding; the processor scales far below that anyway).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import av
import numpy as np
from transformers.video_utils import VideoMetadata

from services.model.multimodal.images import decode_base64
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


def decode_video(data: str, max_frames: int, max_pixels: int, max_bytes: int) -> DecodedVideo:
    raw = decode_base64(data, max_bytes, "video")
    try:
        return _decode(raw, max_frames, max_pixels)
    except InvalidMedia:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, MemoryError) as exc:
        raise InvalidMedia(f"video could not be decoded ({type(exc).__name__}: {str(exc)[:200]})") from None


def _decode(raw: bytes, max_frames: int, max_pixels: int) -> DecodedVideo:
    total, fps, duration = _probe(raw, max_pixels)
    count = frames_to_sample(total, duration, max_frames)
    indices = np.linspace(0, total - 1, count).round().astype(int).tolist()
    frames, times, kept = _decode_selected(raw, sorted(set(indices)))
    if not frames:
        raise InvalidMedia("video has no decodable frames")
    height, width = frames[0].shape[:2]
    metadata = VideoMetadata(
        total_num_frames=total,
        fps=fps,
        width=width,
        height=height,
        duration=duration,
        video_backend="pyav",
        frames_indices=kept,
    )
    return DecodedVideo(frames=np.stack(frames), metadata=metadata, timestamps=times)


def _probe(raw: bytes, max_pixels: int) -> tuple[int, float, float]:
    """(frame count, fps, duration in seconds) from the container, demuxing without decoding."""
    with av.open(io.BytesIO(raw), mode="r") as container:
        stream = _video_stream(container)
        width, height = stream.codec_context.width, stream.codec_context.height
        if width and height and width * height > max_pixels:
            raise InvalidMedia(
                f"video frames are {width}x{height}: more than the limit of {max_pixels} pixels"
            )
        total = sum(1 for packet in container.demux(stream) if packet.size > 0)
        rate = stream.average_rate or stream.guessed_rate
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
    if total <= 0:
        raise InvalidMedia("video has no frames")
    fps = float(rate) if rate else (total / duration if duration > 0 else DEFAULT_FPS)
    return total, fps, duration or total / fps


def frames_to_sample(total: int, duration: float, max_frames: int) -> int:
    """About ``SAMPLE_FPS`` frames per second, at least ``MIN_FRAMES``, never more than the video has or
    ``max_frames``; even where possible, since frames are paired into temporal patches of 2."""
    wanted = max(MIN_FRAMES, math.ceil(duration * SAMPLE_FPS))
    count = min(wanted, total, max_frames)
    if count > 2 and count % 2:
        count -= 1
    return max(count, 1)


def _decode_selected(raw: bytes, wanted: list[int]) -> tuple[list[np.ndarray], list[float], list[int]]:
    """Decode in order, converting only the frames at ``wanted`` indices (sorted); stop after the last."""
    frames: list[np.ndarray] = []
    times: list[float] = []
    kept: list[int] = []
    pending = iter(wanted)
    target = next(pending, None)
    last: tuple[int, av.VideoFrame] | None = None
    with av.open(io.BytesIO(raw), mode="r") as container:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            last = (index, frame)
            if index == target:
                _keep(frame, index, frames, times, kept)
                target = next(pending, None)
                if target is None:
                    break
    # The demux count can exceed the decoded frames (e.g. a truncated tail): keep the last frame then.
    if target is not None and last is not None and (not kept or kept[-1] != last[0]):
        _keep(last[1], last[0], frames, times, kept)
    return frames, times, kept


def _keep(frame: av.VideoFrame, index: int, frames: list, times: list, kept: list) -> None:
    frames.append(_to_rgb_array(frame))
    times.append(float(frame.time or 0.0))
    kept.append(index)


def _video_stream(container: av.container.InputContainer) -> av.VideoStream:
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
