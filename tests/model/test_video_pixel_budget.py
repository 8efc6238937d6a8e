"""A video's pixels are checked against the request's budget before its frames are decoded: a frame list
after its first frame, a video file from its header; and each frame as it is kept. Per-request resizing
never passes its band, whatever the aspect ratio."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.model.multimodal import prompt
from services.model.multimodal import video as video_module
from services.model.multimodal.budget import PixelBand, fit
from services.model.multimodal.prompt import MediaLimits, build_inputs
from services.model.multimodal.video import decode_video, frame_list_video
from services.protocol.errors import InvalidMedia
from services.protocol.generate import ImagePart, Message, TextPart, VideoPart
from tests.model.engine_support import png_b64, tiny_engine, video_b64


def shapes_decoder(shapes: list[tuple[int, int]]) -> tuple[Any, list[int]]:
    """A decode that returns frame i as a (h, w, 3) array of shapes[i] (frames are named by index)."""
    calls: list[int] = []

    def decode(data: str) -> np.ndarray:
        calls.append(int(data))
        h, w = shapes[int(data)]
        return np.zeros((h, w, 3), dtype=np.uint8)

    return decode, calls


def test_a_frame_list_is_refused_after_its_first_frame() -> None:
    # the reviewer's case in small: one large first frame, then tiny ones (all resized to the first's size)
    decode, calls = shapes_decoder([(400, 400)] + [(1, 1)] * 31)
    with pytest.raises(InvalidMedia, match="decoded pixels"):
        frame_list_video([str(i) for i in range(32)], 2.0, 32, decode, pixel_room=32 * 400 * 400 - 1)
    assert calls == [0]  # nothing decoded after the first frame
    decode, calls = shapes_decoder([(400, 400)] + [(1, 1)] * 31)
    video = frame_list_video([str(i) for i in range(32)], 2.0, 32, decode, pixel_room=32 * 400 * 400)
    assert video.frames.shape == (32, 400, 400, 3) and len(calls) == 32


def test_a_one_frame_list_counts_as_the_still_it_becomes() -> None:
    decode, _ = shapes_decoder([(10, 10)])
    with pytest.raises(InvalidMedia):
        frame_list_video(["0"], 2.0, 32, decode, pixel_room=199)
    assert frame_list_video(["0"], 2.0, 32, decode, pixel_room=200).frames.shape[0] == 2


def test_a_video_file_is_refused_from_its_header_before_any_frame_is_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = video_b64(3, frames=8, size=64)
    whole = decode_video(data, 32, 10**7, 10**8, pixel_room=None)
    needed = int(np.prod(whole.frames.shape[:3]))

    def never(*args: Any) -> np.ndarray:
        raise AssertionError("a frame was decoded for a video over the budget")

    monkeypatch.setattr(video_module, "_to_rgb_array", never)
    with pytest.raises(InvalidMedia, match="decoded pixels"):
        decode_video(data, 32, 10**7, 10**8, pixel_room=needed - 1)
    monkeypatch.undo()
    assert decode_video(data, 32, 10**7, 10**8, pixel_room=needed).frames.shape == whole.frames.shape


@pytest.mark.integration
def test_build_inputs_refuses_a_frame_list_over_the_budget_left_by_earlier_media(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = tiny_engine(tiny_model_dir)
    limits = dataclasses.replace(
        MediaLimits.from_settings(engine.settings), max_request_pixels=8 * 256 * 256 + 64 * 64
    )
    decoded: list[int] = []  # pixels of each image prompt.py decodes (a frame list's frames included)
    original = prompt.decode_image

    def counting(*args: Any, **kwargs: Any) -> Any:
        image = original(*args, **kwargs)
        decoded.append(image.width * image.height)
        return image

    monkeypatch.setattr(prompt, "decode_image", counting)
    frames = [png_b64(0, size=256)] + [png_b64(i, size=1) for i in range(1, 8)]
    ok = [Message(role="user", content=[TextPart(text="x"), VideoPart(frames=frames, fps=2.0)])]
    build_inputs(engine.loaded.processor, ok, limits)
    assert len(decoded) == 8
    decoded.clear()
    image_first = [ImagePart(data=png_b64(9, size=128)), VideoPart(frames=frames, fps=2.0)]
    with pytest.raises(InvalidMedia, match="decoded pixels"):
        build_inputs(engine.loaded.processor, [Message(role="user", content=image_first)], limits)
    assert decoded == [128 * 128, 256 * 256]  # the image, then the video's first frame only


@pytest.mark.parametrize(
    ("height", "width"), [(1, 16_000_000), (16_000_000, 1), (3, 90_000), (100, 20_000), (4096, 4096)]
)
def test_fit_never_passes_the_band_for_extreme_aspect_ratios(height: int, width: int) -> None:
    band = PixelBand(low=32 * 32 * 4, high=1_000_000, factor=32)
    h, w = fit(height, width, band)
    assert h * w <= band.high and h % 32 == 0 and w % 32 == 0 and min(h, w) >= 32


def test_a_video_file_with_an_extreme_aspect_ratio_is_refused() -> None:
    with pytest.raises(InvalidMedia, match="more extreme than 200:1"):
        video_module._check_size(20_002, 100, 10**9)
