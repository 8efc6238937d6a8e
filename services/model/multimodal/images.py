"""Base64 image bytes -> a bounded RGB Pillow image.

The pixel count is checked on the header (``Image.open`` reads only that) before the full decode, so a
decompression bomb is rejected without allocating its pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, ImageOps

from services.protocol.errors import InvalidMedia

# Qwen's resize rejects more extreme shapes; failing here gives a clear message instead.
MAX_ASPECT_RATIO = 200


def decode_base64(data: str, max_bytes: int, what: str) -> bytes:
    """Strict base64 -> bytes, refusing payloads over ``max_bytes`` before decoding them."""
    if len(data) * 3 // 4 > max_bytes + 3:
        raise InvalidMedia(f"{what} is larger than the limit of {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidMedia(f"{what} data is not valid base64") from None
    if not raw:
        raise InvalidMedia(f"{what} data is empty")
    if len(raw) > max_bytes:
        raise InvalidMedia(f"{what} is larger than the limit of {max_bytes} bytes")
    return raw


def decode_image(data: str, max_pixels: int, max_bytes: int) -> Image.Image:
    """Decode one base64 image (any format Pillow reads; first frame of animations) to RGB."""
    raw = decode_base64(data, max_bytes, "image")
    img = _open_checked(raw, max_pixels)
    try:
        img.load()
        img = ImageOps.exif_transpose(img) or img
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise InvalidMedia(f"image could not be decoded ({_reason(exc)})") from None
    return to_rgb(img)


def _open_checked(raw: bytes, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # Our own limit below decides; Pillow's global bomb warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw))
        except Image.DecompressionBombError:
            raise InvalidMedia(f"image has too many pixels (limit {max_pixels})") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise InvalidMedia(f"data is not a readable image ({_reason(exc)})") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidMedia("image has no pixels")
    if width * height > max_pixels:
        raise InvalidMedia(f"image is {width}x{height}: more than the limit of {max_pixels} pixels")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InvalidMedia(f"image aspect ratio {width}x{height} is more extreme than {MAX_ASPECT_RATIO}:1")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited over white (what Qwen's own conversion does)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _reason(exc: BaseException) -> str:
    """What a client may read about a decoder failure: Pillow's messages name internal objects
    (``<_io.BytesIO object at 0x...>``), so only the kind of failure is told."""
    if isinstance(exc, Image.UnidentifiedImageError):
        return "unknown or unsupported image format"
    if isinstance(exc, Image.DecompressionBombError):
        return "too many pixels"
    return "corrupt or truncated image data"
