"""Media made in the test, as the base64 the internal protocol carries (no files, no network)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import av
import numpy as np
from PIL import Image


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def png_bytes(width: int = 64, height: int = 64, mode: str = "RGB", seed: int = 0) -> bytes:
    """A noisy image (so different seeds give different pixels) in PNG."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def png_b64(width: int = 64, height: int = 64, mode: str = "RGB", seed: int = 0) -> str:
    return b64(png_bytes(width, height, mode, seed))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with no pixel data: a decompression bomb's shape,
    rejected on the header before any decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def mp4_bytes(frames: int = 8, width: int = 64, height: int = 64, fps: int = 4, gop: int = 0) -> bytes:
    """An mpeg4 video in MP4 whose frame ``i`` is a flat grey of level ``i * 255 // frames``; ``gop``:
    keyframe interval (0: the encoder's choice)."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
            stream.codec_context.options = {"sc_threshold": "1000000000"}  # no scene-cut keyframes
        for i in range(frames):
            level = i * 255 // max(frames, 1)
            arr = np.full((height, width, 3), level, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def mp4_b64(frames: int = 8, width: int = 64, height: int = 64, fps: int = 4, gop: int = 0) -> str:
    return b64(mp4_bytes(frames, width, height, fps, gop))
