"""Messages about undecodable media name the kind of failure, never a decoder's internals (issue 9 item 5:
Pillow's "cannot identify image file <_io.BytesIO object at 0x...>" reached clients)."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.model.multimodal.images import decode_image
from services.model.multimodal.video import decode_video
from services.protocol.errors import InvalidMedia

ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")  # an object's address, as in <_io.BytesIO object at 0x7f...>
GARBAGE = base64.b64encode(b"hello world, not a picture at all").decode()
TRUNCATED_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10").decode()


@pytest.mark.parametrize("data", [GARBAGE, TRUNCATED_PNG])
def test_an_undecodable_image_says_what_is_wrong_without_internals(data: str) -> None:
    with pytest.raises(InvalidMedia) as info:
        decode_image(data, max_pixels=1 << 24, max_bytes=1 << 20)
    message = info.value.message
    assert "image" in message
    assert not ADDRESS.search(message) and "BytesIO" not in message and "<" not in message


def test_an_undecodable_video_says_what_is_wrong_without_internals() -> None:
    with pytest.raises(InvalidMedia) as info:
        decode_video(GARBAGE, max_frames=4, max_pixels=1 << 24, max_bytes=1 << 20)
    message = info.value.message
    assert "video" in message and not ADDRESS.search(message) and "<" not in message and "/" not in message


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    data=st.binary(max_size=2048),
    prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff"]),
)
def test_arbitrary_bytes_decode_or_fail_as_invalid_media(data: bytes, prefix: bytes) -> None:
    """Media bytes from a fuzzer: a decoded image, or InvalidMedia with a clean message; nothing else."""
    encoded = base64.b64encode(prefix + data).decode()
    for decode in (
        lambda: decode_image(encoded, max_pixels=1 << 22, max_bytes=1 << 20),
        lambda: decode_video(encoded, max_frames=2, max_pixels=1 << 22, max_bytes=1 << 20),
    ):
        try:
            decode()
        except InvalidMedia as exc:
            assert not ADDRESS.search(exc.message) and "<" not in exc.message


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": "a\ud83d b"},
        {"role": "user", "content": [{"type": "text", "text": "\udc00"}]},
    ],
)
def test_the_model_service_refuses_text_that_is_not_unicode(message: dict) -> None:
    """The model service never trusts its caller: a lone surrogate is a validation error (400), not a 500
    from the tokenizer."""
    from pydantic import ValidationError

    from services.protocol.generate import GenerateRequest

    with pytest.raises(ValidationError):
        GenerateRequest(request_id="r1", messages=[message])
    with pytest.raises(ValidationError):
        GenerateRequest(
            request_id="r1", messages=[{"role": "user", "content": "x"}], sampling={"stop": ["\ud800"]}
        )
