"""Per-request media budgets on the tiny checkpoint's real processor: ``detail: low`` and ``max_pixels`` mean
fewer image tokens, ``min_pixels`` more; ``fps`` and ``max_frames`` change a video's sampled frames; a video
given as a list of frames gets timestamps from its ``fps``; values over the service's caps are refused naming
the parameter (``InvalidValue``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.model.loading import Loaded, load_model_and_processor
from services.model.multimodal.budget import PixelBand, fit
from services.model.multimodal.prompt import MediaLimits, build_inputs
from services.model.settings import ModelSettings
from services.protocol.errors import InvalidValue
from services.protocol.generate import ImagePart, MediaOptions, Message, TextPart, VideoPart
from tests.model.media import mp4_b64, png_b64

LIMITS = MediaLimits(
    max_video_frames=32, max_image_pixels=16_777_216, max_media_bytes=16 << 20, max_image_tokens=1280
)
IMAGE_PAD = 151655


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Loaded:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_model_and_processor(ModelSettings(model_repo_id=str(tiny_model_dir)))


def inputs(loaded: Loaded, part: Any, **options: Any) -> Any:
    messages = [Message(role="user", content=[part, TextPart(text="?")])]
    media = MediaOptions(**options) if options else None
    return build_inputs(loaded.processor, messages, LIMITS, None, media)


def image_tokens(loaded: Loaded, detail: str | None = None, **options: Any) -> int:
    out = inputs(loaded, ImagePart(data=png_b64(768, 512), detail=detail), **options)
    return int((out["input_ids"] == IMAGE_PAD).sum())


def test_fit_keeps_the_grid_and_the_band() -> None:
    band = PixelBand(low=64 * 1024, high=256 * 1024, factor=32)
    for h, w in ((1000, 3000), (5, 7), (512, 512), (31, 4000)):
        fh, fw = fit(h, w, band)
        assert fh % 32 == 0 and fw % 32 == 0
        assert fh * fw <= band.high or min(fh, fw) == 32


@pytest.mark.integration
def test_detail_and_pixel_budgets_change_the_image_tokens(loaded: Loaded) -> None:
    high, auto, default = image_tokens(loaded, "high"), image_tokens(loaded, "auto"), image_tokens(loaded)
    assert high == auto == default == 768 * 512 // 1024  # within the service's 1280-token cap: kept
    # LOW_DETAIL_IMAGE_TOKENS' default, 64, is also the processor's own minimum (65,536 pixels): the
    # 32-pixel grid rounds the 3:2 image to 70
    low = image_tokens(loaded, "low")
    assert 64 <= low <= 80
    assert image_tokens(loaded, max_pixels=128 * 1024) <= 128
    assert image_tokens(loaded, "low", max_pixels=200 * 1024) == low  # the lower of the two
    assert image_tokens(loaded, min_pixels=1024 * 1024) >= 1000  # scaled up to at least the minimum


@pytest.mark.integration
def test_fps_and_max_frames_change_the_sampled_frames(loaded: Loaded) -> None:
    video = VideoPart(data=mp4_b64(frames=24, fps=4))  # 6 seconds

    def frames(**options: Any) -> int:
        return int(inputs(loaded, video, **options)["video_grid_thw"][0][0]) * 2  # temporal patches of 2

    assert frames() == 12  # 2 per second by default
    assert frames(fps=1.0) == 6
    assert frames(fps=4.0) == 24
    assert frames(fps=4.0, max_frames=10) == 10


@pytest.mark.integration
def test_a_list_of_frames_is_a_video_with_the_given_fps(
    loaded: Loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.model.multimodal import prompt

    seen: list[Any] = []
    real = prompt.frame_list_video
    monkeypatch.setattr(prompt, "frame_list_video", lambda *a: seen.append(real(*a)) or seen[-1])
    part = VideoPart(frames=[png_b64(64, 64, seed=i) for i in range(6)], fps=0.5)
    out = inputs(loaded, part)
    assert int(out["video_grid_thw"][0][0]) == 3
    assert seen[0].timestamps == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert seen[0].metadata.fps == 0.5 and seen[0].frames.shape[0] == 6
    capped = inputs(loaded, part.model_copy(update={"fps": None}), max_frames=4, fps=2.0)
    assert int(capped["video_grid_thw"][0][0]) == 2
    assert [round(t, 2) for t in seen[-1].timestamps] == [0.0, 1.0, 1.5, 2.5]  # indices 0, 2, 3, 5 at 2 fps
    odd = VideoPart(frames=[png_b64(64, 48, seed=1), png_b64(32, 32, seed=2)])  # sizes differ: resized
    assert int(inputs(loaded, odd)["video_grid_thw"][0][0]) == 1


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"max_frames": 33}, "mm_processor_kwargs.max_frames"),
        ({"max_pixels": 1280 * 1024 + 1}, "mm_processor_kwargs.max_pixels"),
        ({"min_pixels": 1280 * 1024 + 1}, "mm_processor_kwargs.min_pixels"),
        ({"min_pixels": 2048, "max_pixels": 1024}, "mm_processor_kwargs.min_pixels"),
    ],
)
def test_values_over_the_caps_are_refused_naming_them(options: dict, param: str) -> None:
    from services.model.multimodal.limits import check_media_options

    with pytest.raises(InvalidValue) as info:
        check_media_options(MediaOptions(**options), LIMITS)
    assert info.value.param == param and info.value.status == 400
    check_media_options(MediaOptions(max_frames=32, min_pixels=1024, max_pixels=1280 * 1024), LIMITS)


def test_frames_are_picked_uniformly_and_evenly() -> None:
    from services.model.multimodal.video import frame_list_video

    decoded: list[int] = []

    def decode(data: str) -> np.ndarray:
        decoded.append(int(data))
        return np.zeros((32, 32, 3), np.uint8)

    video = frame_list_video([str(i) for i in range(9)], 3.0, 32, decode)
    assert video.frames.shape[0] == 8 and decoded == video.metadata.frames_indices  # 9 is odd: 8 kept
    decoded.clear()
    video = frame_list_video([str(i) for i in range(100)], 3.0, 4, decode)
    assert decoded == [0, 33, 66, 99]  # only the picked frames are decoded
