"""Shared pieces of the real-engine tests: the tiny model loaded once, media, requests, a recording sink."""

from __future__ import annotations

import base64
import io
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from services.model.engine.base import FinalOutput, Output, Prepared, TokenOutput
from services.model.engine.scheduler import Scheduler
from services.protocol.generate import (
    GenerateRequest,
    ImagePart,
    Message,
    SamplingParams,
    TextPart,
    VideoPart,
)


def load_tiny(model_dir: Path, **overrides: Any) -> tuple[Any, Any]:
    """(Loaded, ModelSettings) for the tiny checkpoint on CPU in fp32."""
    from services.model.loading import load_model_and_processor
    from services.model.settings import ModelSettings

    settings = ModelSettings(
        model_repo_id=str(model_dir), device_map="cpu", torch_dtype="float32", **overrides
    )
    return load_model_and_processor(settings), settings


def png_b64(seed: int, size: int = 64) -> str:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def video_b64(seed: int, frames: int = 8, size: int = 64, fps: int = 4) -> str:
    import av

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return base64.b64encode(buf.getvalue()).decode()


def request(
    request_id: str,
    text: str,
    *,
    image: int | None = None,
    video: int | None = None,
    **sampling: Any,
) -> GenerateRequest:
    parts: list[Any] = []
    if image is not None:
        parts.append(ImagePart(data=png_b64(image)))
    if video is not None:
        parts.append(VideoPart(data=video_b64(video)))
    parts.append(TextPart(text=text))
    return GenerateRequest(
        request_id=request_id,
        messages=[Message(role="user", content=parts)],
        sampling=SamplingParams(**sampling),
    )


@dataclass
class Recorder:
    """A sink that keeps every step's outputs; ``wait`` blocks until the named requests finished."""

    calls: list[list[tuple[str, Output]]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, outputs: Sequence[tuple[str, Output]]) -> None:
        with self.cond:
            self.calls.append(list(outputs))
            self.cond.notify_all()

    def outputs(self, request_id: str) -> list[Output]:
        with self.cond:
            return [o for call in self.calls for rid, o in call if rid == request_id]

    def final(self, request_id: str) -> FinalOutput | None:
        finals = [o for o in self.outputs(request_id) if isinstance(o, FinalOutput)]
        assert len(finals) <= 1, f"{request_id} finished twice"
        return finals[0] if finals else None

    def text(self, request_id: str) -> tuple[str, str]:
        outs = [o for o in self.outputs(request_id) if isinstance(o, TokenOutput)]
        return "".join(o.reasoning for o in outs), "".join(o.content for o in outs)

    def wait(self, request_ids: Sequence[str], timeout: float = 30.0) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: all(self._done(r) for r in request_ids), timeout)
        assert ok, f"not finished in {timeout}s: {[r for r in request_ids if not self._done(r)]}"

    def wait_tokens(self, request_id: str, n: int, timeout: float = 30.0) -> None:
        def enough() -> bool:
            outs = [o for c in self.calls for rid, o in c if rid == request_id]
            return sum(o.tokens for o in outs if isinstance(o, TokenOutput)) >= n or any(
                isinstance(o, FinalOutput) for o in outs
            )

        with self.cond:
            assert self.cond.wait_for(enough, timeout)

    def _done(self, request_id: str) -> bool:
        return any(isinstance(o, FinalOutput) for c in self.calls for rid, o in c if rid == request_id)


class RecordingScheduler(Scheduler):
    """The real scheduler, also keeping every request's generated token ids (for equality tests): ``tokens``
    by request id (all its choices interleaved), ``by_choice`` by (request id, choice index)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.by_choice: dict[tuple[str, int], list[int]] = defaultdict(list)

    def _advance(self, step: Any, row: Any, token: int, now: float) -> None:
        self.tokens[row.request_id].append(token)
        self.by_choice[(row.request_id, row.index)].append(token)
        super()._advance(step, row, token, now)


def prepare(engine: Any, req: GenerateRequest) -> Prepared:
    return engine.prepare_sync(req)


_ENGINES: dict[Path, Any] = {}


def tiny_engine(model_dir: Path) -> Any:
    """One HFEngine (not started) per process and checkpoint: loading costs seconds, tests share it."""
    from services.model.engine.hf import HFEngine

    if model_dir not in _ENGINES:
        import torch

        # One intra-op thread: the tiny model gains nothing from two, and on a shared 2-core machine
        # OpenMP threads spinning against other processes make steps up to 20x slower.
        torch.set_num_threads(1)
        loaded, settings = load_tiny(model_dir)
        _ENGINES[model_dir] = HFEngine(loaded, settings)
    return _ENGINES[model_dir]


def scheduler_for(engine: Any, observer: Any = None, **config: Any) -> RecordingScheduler:
    """A fresh recording scheduler over the engine's model (the engine's own one stays unused)."""
    from dataclasses import replace

    cfg = replace(engine.scheduler_config, **config)
    return RecordingScheduler(engine.loaded.model, engine.table, cfg, observer)


def reference_tokens(engine: Any, prepared: Prepared) -> list[int]:
    """HF ``generate`` on the request alone, greedy: the ground truth for batched decoding."""
    import torch

    inputs = dict(prepared.inputs)
    with torch.inference_mode():
        out = engine.loaded.model.generate(
            **inputs,
            do_sample=False,
            top_k=None,
            top_p=None,
            temperature=None,
            max_new_tokens=prepared.sampling.max_tokens,
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def drain(scheduler: Scheduler) -> int:
    """Drive a bound (thread-less) scheduler until it is idle; returns the number of steps."""
    steps = 0
    while scheduler.step_once():
        steps += 1
    return steps
