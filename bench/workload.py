"""The one workload every target runs: mixed text-only and image requests, greedy, fixed ``max_tokens``.

The same prompts, in the same order, go to the raw engine, the full stack and ``transformers serve``.
Completion tokens are always counted from what the server reports (usage), never from chunks.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

PROMPTS: tuple[str, ...] = (
    "Describe a quiet harbour at dawn in three sentences.",
    "List five uses of a paperclip and explain the oddest one.",
    "What makes a good unit test? Answer briefly.",
    "Summarise the water cycle for a ten-year-old.",
    "Write a haiku about a server room.",
    "Explain why the sky looks blue, step by step.",
    "Give three tips for reading source code you did not write.",
    "Compare a bicycle and a tram as ways to cross a city.",
)
IMAGE_PROMPTS: tuple[str, ...] = (
    "What is in this picture?",
    "Describe the colours and shapes in this image.",
)


def make_png(size: int = 64) -> bytes:
    """A small deterministic PNG (a colour gradient with a square), made with Pillow."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = (x * 255 // size, y * 255 // size, 128)
    ImageDraw.Draw(img).rectangle((size // 4, size // 4, size // 2, size // 2), fill=(240, 240, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True, slots=True)
class BenchRequest:
    index: int
    text: str
    with_image: bool


@dataclass(frozen=True, slots=True)
class Workload:
    max_tokens: int = 64
    image_every: int = 3  # every third request carries the image
    seed: int = 1234
    png: bytes = b""

    @classmethod
    def build(cls, max_tokens: int) -> Workload:
        return cls(max_tokens=max_tokens, png=make_png())

    def request(self, index: int) -> BenchRequest:
        if self.image_every and index % self.image_every == self.image_every - 1:
            text = IMAGE_PROMPTS[(index // self.image_every) % len(IMAGE_PROMPTS)]
            return BenchRequest(index, text, True)
        return BenchRequest(index, PROMPTS[index % len(PROMPTS)], False)

    @property
    def png_b64(self) -> str:
        return base64.b64encode(self.png).decode("ascii")

    def openai_body(self, req: BenchRequest, model: str, *, include_usage: bool) -> dict[str, Any]:
        """A streaming chat completion body (the image as a data URL)."""
        content: list[dict[str, Any]] = []
        if req.with_image:
            url = f"data:image/png;base64,{self.png_b64}"
            content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": req.text})
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "seed": self.seed,
            "stream": True,
        }
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    def generate_request(self, req: BenchRequest, request_id: str) -> Any:
        """The same request in the model service's internal protocol (for the in-process engine)."""
        from services.protocol.generate import GenerateRequest, ImagePart, Message, SamplingParams, TextPart

        parts: list[Any] = []
        if req.with_image:
            parts.append(ImagePart(data=self.png_b64))
        parts.append(TextPart(text=req.text))
        return GenerateRequest(
            request_id=request_id,
            messages=[Message(role="user", content=parts)],
            sampling=SamplingParams(max_tokens=self.max_tokens, temperature=0.0, seed=self.seed),
        )
