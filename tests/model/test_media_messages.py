"""Messages about undecodable media name the kind of failure, never a decoder's internals (issue 9 item 5:
Pillow's "cannot identify image file <_io.BytesIO object at 0x...>" reached clients)."""

from __future__ import annotations

import base64

import pytest

from services.model.multimodal.images import decode_image
from services.model.multimodal.video import decode_video
from services.protocol.errors import InvalidMedia

GARBAGE = base64.b64encode(b"hello world, not a picture at all").decode()
TRUNCATED_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10").decode()


@pytest.mark.parametrize("data", [GARBAGE, TRUNCATED_PNG])
def test_an_undecodable_image_says_what_is_wrong_without_internals(data: str) -> None:
    with pytest.raises(InvalidMedia) as info:
        decode_image(data, max_pixels=1 << 24, max_bytes=1 << 20)
    message = info.value.message
    assert "image" in message
    assert "0x" not in message and "BytesIO" not in message and "<" not in message


def test_an_undecodable_video_says_what_is_wrong_without_internals() -> None:
    with pytest.raises(InvalidMedia) as info:
        decode_video(GARBAGE, max_frames=4, max_pixels=1 << 24, max_bytes=1 << 20)
    message = info.value.message
    assert "video" in message and "0x" not in message and "<" not in message and "/" not in message
