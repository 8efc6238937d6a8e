"""How long one large image stalls the other streams: the worst gap between two outputs of a running stream
while a 4095x4095 image is prefilled (tiny checkpoint, the real scheduler in this process).

``python -m tests.model.image_stall [MAX_IMAGE_TOKENS]`` prints the figures; ``measure_stall`` is shared
with the tests.
"""

from __future__ import annotations

import base64
import io
import itertools
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from services.model.engine.base import FinalOutput, Output, TokenOutput
from services.protocol.generate import GenerateRequest, ImagePart, Message, SamplingParams, TextPart


def big_image_b64(side: int = 4095) -> str:
    """A ``side`` x ``side`` PNG with smooth content (small to send, as costly as any image to encode)."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack(
        [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)), np.tile(ramp, (side, 1)).T], -1
    )
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class TimedSink:
    """The engine's sink, keeping when each request's outputs arrived (monotonic seconds)."""

    times: dict[str, list[float]] = field(default_factory=dict)
    finished: dict[str, FinalOutput] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, outputs: Sequence[tuple[str, Output]]) -> None:
        now = time.monotonic()
        with self.cond:
            for request_id, out in outputs:
                self.times.setdefault(request_id, []).append(now)
                if isinstance(out, TokenOutput):
                    self.tokens[request_id] = self.tokens.get(request_id, 0) + out.tokens
                else:
                    self.finished[request_id] = out
            self.cond.notify_all()

    def wait(self, condition: Any, timeout: float = 300.0) -> None:
        with self.cond:
            assert self.cond.wait_for(condition, timeout), "timed out"


@dataclass
class Stall:
    image_tokens: int  # the image's visual tokens (its grid after the processor's resize / merge)
    prepare_seconds: float  # decode + processor, off the scheduler thread
    worst_gap_seconds: float  # the running stream's longest wait while the image was prefilled
    image_first_token_seconds: float  # submit to the image request's first token


def measure_stall(engine: Any, side: int = 4095) -> Stall:
    """``engine``: an HFEngine (not started). Runs one long text stream, then adds one big image."""
    sink = TimedSink()
    engine.start(sink)
    try:
        text = GenerateRequest(
            request_id="stream",
            messages=[Message(role="user", content="Tell a very long story")],
            sampling=SamplingParams(max_tokens=100_000, temperature=0),
        )
        engine.submit(engine.prepare_sync(text))
        sink.wait(lambda: sink.tokens.get("stream", 0) >= 20)
        parts = [ImagePart(data=big_image_b64(side)), TextPart(text="What is this?")]
        image = GenerateRequest(
            request_id="image",
            messages=[Message(role="user", content=parts)],
            sampling=SamplingParams(max_tokens=2, temperature=0),
        )
        started = time.monotonic()
        prepared = engine.prepare_sync(image)
        prepare_seconds = time.monotonic() - started
        grid = prepared.inputs["image_grid_thw"][0].tolist()
        merge = engine.loaded.processor.image_processor.merge_size
        submitted = time.monotonic()
        engine.submit(prepared)
        sink.wait(lambda: "image" in sink.finished)
        done = time.monotonic()
        engine.cancel("stream")
        sink.wait(lambda: "stream" in sink.finished)
        window = [t for t in sink.times["stream"] if t >= submitted - 1.0]
        ends = [t for t in window if t <= done] + [min(t for t in window if t > done)]
        gaps = [b - a for a, b in itertools.pairwise(ends)]
        return Stall(
            image_tokens=grid[0] * grid[1] * grid[2] // (merge * merge),
            prepare_seconds=prepare_seconds,
            worst_gap_seconds=max(gaps),
            image_first_token_seconds=sink.times["image"][0] - submitted,
        )
    finally:
        engine.shutdown(5.0)


def main() -> None:
    import torch

    from services.model.engine.hf import HFEngine
    from tests.model.engine_support import load_tiny

    torch.set_num_threads(1)
    overrides = {"max_image_tokens": int(sys.argv[1])} if len(sys.argv) > 1 else {}
    model_dir = Path(".cache/tiny-qwen3-vl")
    loaded, settings = load_tiny(model_dir, **overrides)
    stall = measure_stall(HFEngine(loaded, settings))
    print(
        f"4095x4095 image: {stall.image_tokens} visual tokens; prepare {stall.prepare_seconds:.2f} s; "
        f"worst gap of the running stream {stall.worst_gap_seconds:.2f} s; "
        f"image's first token after {stall.image_first_token_seconds:.2f} s"
    )


if __name__ == "__main__":
    main()
