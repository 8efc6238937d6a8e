"""HFEngine: sampling defaults, context limits, and a whole request through prepare -> submit -> sink."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from services.model.engine.base import Engine, TokenOutput
from services.model.engine.hf import HFEngine, resolve_sampling
from services.model.loading import SamplingDefaults
from services.model.settings import ModelSettings
from services.protocol.errors import InvalidMedia, PromptTooLong
from services.protocol.generate import GenerateRequest, ImagePart, Message, SamplingParams, TextPart
from tests.model.engine_support import Recorder, request, tiny_engine

CARD = SamplingDefaults(do_sample=True, temperature=0.8, top_p=0.95, top_k=20, repetition_penalty=1.05)


def _loaded(context: int = 100, defaults: SamplingDefaults = CARD) -> Any:
    return SimpleNamespace(sampling=defaults, context_length=context)


def test_defaults_come_from_env_then_generation_config() -> None:
    settings = ModelSettings(max_tokens=50)
    out = resolve_sampling(SamplingParams(), settings, _loaded(), prompt_tokens=10)
    assert (out.max_tokens, out.temperature, out.top_p, out.top_k) == (50, 0.8, 0.95, 20)
    assert out.repetition_penalty == 1.05

    settings = ModelSettings(max_tokens=50, temperature=0.3)
    assert resolve_sampling(SamplingParams(), settings, _loaded(), 10).temperature == 0.3

    greedy_ckpt = SamplingDefaults(
        do_sample=False, temperature=0.7, top_p=1.0, top_k=50, repetition_penalty=1.0
    )
    assert (
        resolve_sampling(SamplingParams(), ModelSettings(), _loaded(2000, greedy_ckpt), 10).temperature == 0
    )


def test_request_values_win() -> None:
    asked = SamplingParams(
        max_tokens=7, temperature=0.0, top_p=0.5, top_k=3, repetition_penalty=1.2, stop=["x"], seed=4
    )
    out = resolve_sampling(asked, ModelSettings(temperature=0.9), _loaded(), prompt_tokens=10)
    assert out.model_dump() == asked.model_dump()


def test_context_limits() -> None:
    with pytest.raises(PromptTooLong):
        resolve_sampling(SamplingParams(max_tokens=91), ModelSettings(), _loaded(100), prompt_tokens=10)
    assert resolve_sampling(SamplingParams(max_tokens=90), ModelSettings(), _loaded(100), 10).max_tokens == 90
    # the default MAX_TOKENS shrinks to what fits instead of failing
    assert (
        resolve_sampling(SamplingParams(), ModelSettings(max_tokens=1000), _loaded(100), 10).max_tokens == 90
    )
    with pytest.raises(PromptTooLong):
        resolve_sampling(SamplingParams(), ModelSettings(), _loaded(100), prompt_tokens=100)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> HFEngine:
    """A fresh engine over the shared tiny model (its scheduler is started and shut down here)."""
    shared = tiny_engine(tiny_model_dir)
    return HFEngine(shared.loaded, shared.settings.model_copy(update={"max_batch_size": 4}))


@pytest.mark.slow
def test_whole_request_through_the_engine(engine: HFEngine) -> None:
    _: Engine = engine  # structural check for the type checker
    rec = Recorder()
    engine.start(rec)
    try:
        reqs = [
            request("e-image", "What is this?", image=5, max_tokens=9, temperature=0),
            request("e-text", "Say something", max_tokens=6, temperature=0.8, seed=3),
        ]
        prepared = [asyncio.run(engine.prepare(r)) for r in reqs]
        assert prepared[0].prompt_tokens > 64  # the image expanded into its tokens
        assert prepared[0].sampling.top_k == 20  # from the tiny checkpoint's generation config
        for p in prepared:
            engine.submit(p)
        rec.wait(["e-image", "e-text"])
        for p in prepared:
            final = rec.final(p.request_id)
            assert final is not None and final.finish_reason in {"length", "stop"}
            assert final.prompt_tokens == p.prompt_tokens and final.completion_tokens >= 1
            outs = [o for o in rec.outputs(p.request_id) if isinstance(o, TokenOutput)]
            assert sum(o.tokens for o in outs) <= final.completion_tokens
        assert engine.stats().running == 0 and engine.cancel("e-text") is False
    finally:
        engine.shutdown(5)


@pytest.mark.slow
def test_bad_media_is_rejected_in_prepare(engine: HFEngine) -> None:
    parts = [ImagePart(data=base64.b64encode(b"not an image").decode()), TextPart(text="look")]
    bad = GenerateRequest(request_id="bad", messages=[Message(role="user", content=parts)])
    with pytest.raises(InvalidMedia):
        asyncio.run(engine.prepare(bad))


@pytest.mark.slow
def test_in_process_throughput_helper(tiny_model_dir: Path) -> None:
    from services.model.engine.throughput import measure

    result = measure(tiny_engine(tiny_model_dir), streams=3, max_tokens=5)
    assert result.streams == 3 and 3 <= result.tokens <= 15 and result.tokens_per_second > 0
