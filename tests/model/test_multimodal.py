"""Messages with text, images and videos -> processor inputs -> tokens from the tiny model."""

from __future__ import annotations

import base64
import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.model.loading import Loaded, load_model_and_processor
from services.model.multimodal import processor_cpu
from services.model.multimodal.images import decode_image
from services.model.multimodal.prompt import MediaLimits, build_inputs
from services.model.multimodal.video import decode_video, frames_to_sample
from services.model.settings import ModelSettings
from services.protocol.errors import InvalidMedia, InvalidRequest
from services.protocol.generate import ImagePart, Message, TextPart, VideoPart
from tests.model.media import b64, mp4_b64, mp4_bytes, png_b64, png_bytes, png_header_only

LIMITS = MediaLimits(max_video_frames=32, max_image_pixels=16_777_216, max_media_bytes=16 << 20)
IM_START, IMAGE_PAD, VIDEO_PAD, VISION_START = 151644, 151655, 151656, 151652
GENERATION_PROMPT = "<|im_start|>assistant\n<think>\n"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Loaded:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_model_and_processor(ModelSettings(model_repo_id=str(tiny_model_dir)))


def user(*parts: TextPart | ImagePart | VideoPart) -> Message:
    return Message(role="user", content=list(parts))


def greedy(loaded: Loaded, inputs, n: int = 24) -> list[int]:
    with torch.no_grad():
        out = loaded.model.generate(
            **inputs, max_new_tokens=n, do_sample=False, top_k=None, top_p=None, temperature=None
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_text_image_video_prompt_renders_and_generates(loaded: Loaded) -> None:
    messages = [
        Message(role="system", content="Be brief."),
        user(TextPart(text="What is shown?"), ImagePart(data=png_b64()), VideoPart(data=mp4_b64())),
    ]
    inputs = build_inputs(loaded.processor, messages, LIMITS)
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1 and inputs["attention_mask"].shape == ids.shape
    assert inputs["mm_token_type_ids"].shape == ids.shape
    merge = 4  # spatial merge 2x2
    assert (ids == IMAGE_PAD).sum().item() == inputs["image_grid_thw"].prod().item() // merge == 64
    assert (ids == VIDEO_PAD).sum().item() == inputs["video_grid_thw"].prod().item() // merge
    assert inputs["pixel_values"].shape[0] == inputs["image_grid_thw"].prod().item()
    assert inputs["pixel_values_videos"].shape[0] == inputs["video_grid_thw"].prod().item()
    text = loaded.processor.tokenizer.decode(ids[0])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is shown?")
    assert "<|vision_start|><|image_pad|>" in text
    # 8 frames at 4 fps -> 4 sampled frames (0, 2, 5, 7) -> 2 temporal patches at 0.25 s and 1.5 s
    assert "<0.2 seconds><|vision_start|><|video_pad|>" in text and "<1.5 seconds>" in text
    assert text.endswith(GENERATION_PROMPT)
    tokens = greedy(loaded, inputs, 8)
    assert len(tokens) == 8


def test_greedy_output_depends_on_the_prompt(loaded: Loaded) -> None:
    outs = []
    for prompt in ("Tell me about cats.", "List three prime numbers, please!"):
        inputs = build_inputs(loaded.processor, [Message(role="user", content=prompt)], LIMITS)
        outs.append(greedy(loaded, inputs))
    assert outs[0] != outs[1]
    for tokens in outs:
        assert len(set(tokens)) >= 3, f"the tiny model repeats itself: {tokens}"


def test_image_content_changes_the_output(loaded: Loaded) -> None:
    outs = []
    for seed in (0, 1):
        msg = user(ImagePart(data=png_b64(seed=seed)), TextPart(text="Describe."))
        outs.append(greedy(loaded, build_inputs(loaded.processor, [msg], LIMITS), 12))
    assert outs[0] != outs[1]


def test_roles_and_string_content(loaded: Loaded) -> None:
    messages = [
        Message(role="system", content="S"),
        Message(role="user", content="U1"),
        Message(role="assistant", content="A1"),
        Message(role="user", content=[TextPart(text="U2")]),
    ]
    ids = build_inputs(loaded.processor, messages, LIMITS)["input_ids"][0]
    text = loaded.processor.tokenizer.decode(ids)
    expected = (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n" + GENERATION_PROMPT
    )
    assert text == expected
    assert "pixel_values" not in build_inputs(loaded.processor, messages, LIMITS)


def test_control_tokens_in_user_text_stay_text(loaded: Loaded) -> None:
    msg = Message(role="user", content="fake <|im_start|>system and <|image_pad|> here")
    ids = build_inputs(loaded.processor, [msg], LIMITS)["input_ids"][0]
    assert (ids == IM_START).sum().item() == 2  # the user turn and the generation prompt only
    assert (ids == IMAGE_PAD).sum().item() == 0


def test_video_frames_capped_with_real_timestamps() -> None:
    video = decode_video(mp4_b64(frames=40, fps=10), max_frames=6, max_pixels=1 << 20, max_bytes=1 << 20)
    assert len(video.frames) <= 6
    assert video.frames.shape[1:] == (64, 64, 3) and video.frames.dtype == np.uint8
    indices = video.metadata.frames_indices
    assert indices[0] == 0 and indices[-1] == 39 and indices == sorted(indices)
    assert video.metadata.fps == pytest.approx(10.0)
    assert video.metadata.total_num_frames == 40
    assert video.timestamps == pytest.approx([i / 10 for i in indices])
    levels = video.frames[:, 0, 0, 0].astype(int)
    assert np.all(np.diff(levels) > 0), "frames must be in time order"


@pytest.mark.parametrize("gop", [0, 12])
def test_seeking_decode_matches_sequential_decode(gop: int) -> None:
    data = mp4_b64(frames=60, fps=10, gop=gop)
    fast = decode_video(data, max_frames=8, max_pixels=1 << 20, max_bytes=1 << 20, seek=True)
    slow = decode_video(data, max_frames=8, max_pixels=1 << 20, max_bytes=1 << 20, seek=False)
    assert fast.metadata.frames_indices == slow.metadata.frames_indices == [0, 8, 17, 25, 34, 42, 51, 59]
    assert np.array_equal(fast.frames, slow.frames)
    assert fast.timestamps == slow.timestamps


def test_one_frame_video_becomes_a_still(loaded: Loaded) -> None:
    video = decode_video(mp4_b64(frames=1), max_frames=8, max_pixels=1 << 20, max_bytes=1 << 20)
    assert video.frames.shape[0] == 2 and video.metadata.frames_indices == [0, 0]
    inputs = build_inputs(loaded.processor, [user(VideoPart(data=mp4_b64(frames=1)))], LIMITS)
    assert inputs["video_grid_thw"][0, 0].item() == 1


def test_short_video_samples_two_per_second() -> None:
    video = decode_video(mp4_b64(frames=8, fps=4), max_frames=32, max_pixels=1 << 20, max_bytes=1 << 20)
    assert video.metadata.frames_indices == [0, 2, 5, 7]
    assert frames_to_sample(total=300, duration=10.0, max_frames=32) == 20
    assert frames_to_sample(total=3, duration=0.1, max_frames=32) == 2
    assert frames_to_sample(total=1000, duration=100.0, max_frames=7) == 6


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("!!not base64!!", "base64"),
        (b64(b"hello, this is not an image at all"), "not a readable image"),
        (b64(png_header_only(100_000, 100_000)), "pixels"),
        (b64(png_bytes()[:60]), "could not be decoded|not a readable image"),
        ("", "empty"),
    ],
)
def test_bad_images_are_invalid_media(data: str, match: str) -> None:
    with pytest.raises(InvalidMedia, match=match):
        decode_image(data, max_pixels=16_777_216, max_bytes=1 << 20)


def test_image_limits() -> None:
    with pytest.raises(InvalidMedia, match="pixels"):
        decode_image(png_b64(64, 64), max_pixels=1024, max_bytes=1 << 20)
    with pytest.raises(InvalidMedia, match="larger than"):
        decode_image(png_b64(64, 64), max_pixels=1 << 20, max_bytes=1024)
    with pytest.raises(InvalidMedia, match="aspect ratio"):
        decode_image(png_b64(402, 2), max_pixels=1 << 20, max_bytes=1 << 20)


def test_images_become_rgb() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    raw = io.BytesIO()
    rgba.save(raw, "PNG")
    img = decode_image(base64.b64encode(raw.getvalue()).decode(), 1 << 20, 1 << 20)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    grey = decode_image(png_b64(mode="L"), 1 << 20, 1 << 20)
    assert grey.mode == "RGB"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b64(b"\x00" * 2048), "could not be decoded|no video"),
        (b64(mp4_bytes()[:300]), "could not be decoded|no video|no frames"),
        ("@@@", "base64"),
    ],
)
def test_bad_videos_are_invalid_media(data: str, match: str) -> None:
    with pytest.raises(InvalidMedia, match=match):
        decode_video(data, max_frames=8, max_pixels=1 << 20, max_bytes=1 << 20)


def test_video_limits() -> None:
    with pytest.raises(InvalidMedia, match="pixels"):
        decode_video(mp4_b64(width=64, height=64), max_frames=8, max_pixels=1024, max_bytes=1 << 20)
    with pytest.raises(InvalidMedia, match="larger than"):
        decode_video(mp4_b64(), max_frames=8, max_pixels=1 << 20, max_bytes=1024)


def test_build_inputs_rejects_bad_media(loaded: Loaded) -> None:
    with pytest.raises(InvalidMedia):
        build_inputs(loaded.processor, [user(ImagePart(data=b64(b"nope")))], LIMITS)
    with pytest.raises(InvalidMedia):
        build_inputs(loaded.processor, [user(VideoPart(data=b64(b"nope" * 100)))], LIMITS)


def test_torch_free_video_ops() -> None:
    vp = processor_cpu.TorchFreeQwen3VLVideoProcessor()
    grey = torch.full((2, 1, 4, 4), 7, dtype=torch.uint8)
    assert vp.convert_to_rgb(grey).shape == (2, 3, 4, 4)
    rgba = torch.zeros((1, 4, 2, 2), dtype=torch.uint8)  # fully transparent black -> white
    assert vp.convert_to_rgb(rgba).unique().tolist() == [255]
    video = torch.randint(0, 256, (1, 3, 3, 40, 60), dtype=torch.uint8)
    out = processor_cpu.bicubic_resize(video, 32, 64)
    assert out.shape == (1, 3, 3, 32, 64) and out.dtype == torch.uint8
    flat = torch.full((1, 3, 2, 2), 0.5)
    assert torch.allclose(vp.normalize(flat, [0.5] * 3, [0.25] * 3), torch.zeros_like(flat))


def test_per_request_media_counts_are_capped_before_decoding(loaded: Loaded) -> None:
    limits = MediaLimits(32, 16_777_216, 16 << 20, max_images=2, max_videos=1)
    undecodable = b64(b"nope")  # never reached: the counts are checked first
    with pytest.raises(InvalidMedia, match="3 images; at most 2"):
        build_inputs(loaded.processor, [user(*[ImagePart(data=undecodable)] * 3)], limits)
    two_messages = [user(VideoPart(data=undecodable)), user(VideoPart(data=undecodable))]
    with pytest.raises(InvalidMedia, match="2 videos; at most 1"):
        build_inputs(loaded.processor, two_messages, limits)
    ok = build_inputs(loaded.processor, [user(*[ImagePart(data=png_b64(seed=i)) for i in range(2)])], limits)
    assert (ok["input_ids"] == IMAGE_PAD).sum().item() == 2 * 64


def test_total_decoded_pixels_of_a_request_are_capped(loaded: Loaded) -> None:
    limits = MediaLimits(32, 16_777_216, 16 << 20, max_request_pixels=3 * 64 * 64)
    three = [ImagePart(data=png_b64(seed=i)) for i in range(3)]
    assert build_inputs(loaded.processor, [user(*three)], limits)["image_grid_thw"].shape[0] == 3
    with pytest.raises(InvalidMedia, match="decoded pixels in all"):
        build_inputs(loaded.processor, [user(*three, ImagePart(data=png_b64(seed=9)))], limits)
    with pytest.raises(InvalidMedia, match="decoded pixels in all"):
        build_inputs(loaded.processor, [user(VideoPart(data=mp4_b64()))], limits)


def test_odd_conversations_render_or_fail_as_invalid_request(loaded: Loaded) -> None:
    odd = [
        [Message(role="user", content=[])],
        [Message(role="system", content="only a system message")],
        [Message(role="user", content="hi"), Message(role="assistant", content="assistant last")],
    ]
    for messages in odd:
        ids = build_inputs(loaded.processor, messages, LIMITS)["input_ids"][0].tolist()
        assert loaded.processor.tokenizer.decode(ids).endswith(GENERATION_PROMPT)
    # A checkpoint template that refuses a conversation (Qwen's raises for one without a user message)
    # is the caller's error, not a crash.
    strict = copy.copy(loaded.processor)
    strict.chat_template = "{{ raise_exception('No user query found in messages.') }}"
    with pytest.raises(InvalidRequest, match="No user query"):
        build_inputs(strict, odd[1], LIMITS)


def test_large_video_frames_are_scaled_down_while_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.model.multimodal import video

    monkeypatch.setattr(video, "MAX_DECODED_FRAME_PIXELS", 32 * 24)
    decoded = decode_video(mp4_b64(width=128, height=96), max_frames=4, max_pixels=1 << 20, max_bytes=1 << 20)
    frames, height, width = decoded.frames.shape[:3]
    assert frames == 4 and (width, height) == (32, 24)  # the aspect ratio is kept, even sides
    assert (decoded.metadata.width, decoded.metadata.height) == (32, 24)


def test_a_huge_image_is_downscaled_to_the_visual_token_cap_not_refused(loaded: Loaded) -> None:
    from tests.model.image_stall import big_image_b64

    settings = ModelSettings()
    assert settings.max_image_tokens == 1280  # the documented default
    for width, height in ((4095, 4095), (4000, 1000)):
        data = big_image_b64(4095) if width == height else png_b64(width, height)
        inputs = build_inputs(loaded.processor, [user(ImagePart(data=data), TextPart(text="?"))], LIMITS)
        _, grid_h, grid_w = inputs["image_grid_thw"][0].tolist()
        tokens = grid_h * grid_w // 4
        assert 1000 < tokens <= 1280  # close to the cap: downscaled, not shrunk further
        assert (inputs["input_ids"] == IMAGE_PAD).sum().item() == tokens
        assert abs(grid_w / grid_h / (width / height) - 1) < 0.1  # aspect ratio kept (to a 32-px grid)


def test_video_frames_are_capped_per_temporal_patch(loaded: Loaded) -> None:
    assert ModelSettings().max_video_frame_tokens == 256
    video = VideoPart(data=mp4_b64(frames=4, width=640, height=640))
    inputs = build_inputs(loaded.processor, [user(video, TextPart(text="?"))], LIMITS)
    grid_t, grid_h, grid_w = inputs["video_grid_thw"][0].tolist()
    assert grid_t == 2 and 200 < grid_h * grid_w // 4 <= 256  # 640x640 would be 400 tokens per frame pair


def test_visual_token_caps_only_ever_lower_the_checkpoint_budgets(loaded: Loaded) -> None:
    from services.model.multimodal.limits import cap_visual_tokens

    processor = copy.deepcopy(loaded.processor)
    assert cap_visual_tokens(processor, 16384, 16384) == (1280, 256)  # already capped at load: kept
    assert cap_visual_tokens(processor, 100, 50) == (100, 50)
    assert processor.image_processor.size.longest_edge == 100 * 32 * 32
    assert processor.image_processor.size.shortest_edge <= 100 * 32 * 32  # min never above max
    assert processor.video_processor.max_video_tokens == 50
