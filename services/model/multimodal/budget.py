"""Per-request pixel budgets of images and video frames (``detail``, ``mm_processor_kwargs``).

The processor resizes every image into one band of pixels (its ``shortest_edge``..``longest_edge``, in
pixels, after ``cap_visual_tokens``), rounding each side to a multiple of the visual-token edge (32 for
Qwen3-VL). A request may narrow that band for its own media: the media are resized here, before the
processor, to a size inside the narrowed band and on the 32-pixel grid, which the processor then keeps.
So ``detail: "low"`` or a small ``max_pixels`` means fewer visual tokens (and prompt tokens), a larger
``min_pixels`` more; the service's own band still bounds both (the caps are checked before:
``limits.check_media_options``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from services.model.multimodal.limits import PIXELS_PER_TOKEN, MediaLimits
from services.protocol.generate import MediaOptions


@dataclass(frozen=True, slots=True)
class PixelBand:
    """Pixels per image (or frame) between ``low`` and ``high``; sides multiples of ``factor``."""

    low: int
    high: int
    factor: int


def processor_band(processor: Any) -> PixelBand:
    """The band the processor's image resizing uses by itself (pixels)."""
    images = processor.image_processor
    size = images.size

    def edge(name: str) -> int:
        return int(size[name] if isinstance(size, dict) else getattr(size, name))

    return PixelBand(edge("shortest_edge"), edge("longest_edge"), images.patch_size * images.merge_size)


def request_band(
    service: PixelBand, options: MediaOptions | None, low_detail: bool, limits: MediaLimits
) -> PixelBand | None:
    """The band for one item of a request: ``min_pixels``/``max_pixels`` within the service's band,
    ``low_detail`` at most LOW_DETAIL_IMAGE_TOKENS tokens; None when the item keeps the service's."""
    low = options.min_pixels if options and options.min_pixels is not None else None
    high = options.max_pixels if options and options.max_pixels is not None else None
    if low_detail:
        budget = limits.low_detail_image_tokens * PIXELS_PER_TOKEN
        high = budget if high is None else min(high, budget)
    if low is None and high is None:
        return None
    top = min(service.high, high if high is not None else service.high)
    bottom = max(service.low, low if low is not None else service.low)
    top = max(top, service.low)  # never below what the processor scales up to anyway
    return PixelBand(min(bottom, top), top, service.factor)


def fit(height: int, width: int, band: PixelBand) -> tuple[int, int]:
    """(height, width) with the aspect ratio about kept, each a multiple of ``band.factor`` (at least
    one), and height * width within the band where the grid allows. A side raised to one ``factor`` (an
    extreme aspect ratio) takes its pixels from the other side's share, so the product never passes
    ``band.high`` (when ``band.high`` >= factor^2)."""
    f = band.factor
    h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
    if h * w > band.high:
        scale = math.sqrt(height * width / band.high)
        h = max(f, math.floor(height / scale / f) * f)
        w = max(f, math.floor(width / scale / f) * f)
        if h * w > band.high:  # one side was raised to f: shorten the other to what is left
            if h == f:
                w = max(f, band.high // h // f * f)
            else:
                h = max(f, band.high // w // f * f)
    elif h * w < band.low:
        scale = math.sqrt(band.low / (height * width))
        h, w = math.ceil(height * scale / f) * f, math.ceil(width * scale / f) * f
    return h, w


def resize_image(image: Image.Image, band: PixelBand | None) -> Image.Image:
    """``image`` resized to fit ``band`` (unchanged when None or already fitting)."""
    if band is None:
        return image
    h, w = fit(image.height, image.width, band)
    if (h, w) == (image.height, image.width):
        return image
    return image.resize((w, h), Image.Resampling.BICUBIC)


def resize_frames(frames: np.ndarray, band: PixelBand | None) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 resized to fit ``band`` (unchanged when None or already fitting)."""
    if band is None:
        return frames
    h, w = fit(frames.shape[1], frames.shape[2], band)
    if (h, w) == frames.shape[1:3]:
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC)) for f in frames])
