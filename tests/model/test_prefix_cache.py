"""The prefix cache on the tiny real model: a prompt that shares a prefix with a kept one is prefilled from
where it differs, the vision encoder does not run again for a cached image, and greedy output equals HF
``generate`` on the request alone (no cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.model.engine.base import Prepared
from services.model.engine.kv_slots import BLOCK
from services.model.engine.prefix import PrefixCache, prompt_key, shared_prefix
from services.protocol.generate import GenerateRequest, ImagePart, Message, SamplingParams, TextPart
from tests.model.engine_support import (
    Recorder,
    drain,
    png_b64,
    prepare,
    reference_tokens,
    scheduler_for,
    tiny_engine,
)

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant. Answer briefly, in plain words, and never make up facts. " * 2


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    return tiny_engine(tiny_model_dir)


def _chat(
    rid: str, turns: list[tuple[str, str]], image: int | None = None, **sampling: Any
) -> GenerateRequest:
    """A conversation: a system prompt, then (role, text) turns; the first user turn carries the image."""
    messages = [Message(role="system", content=[TextPart(text=SYSTEM)])]
    for i, (role, text) in enumerate(turns):
        parts: list[Any] = [TextPart(text=text)]
        if i == 0 and image is not None:
            parts.insert(0, ImagePart(data=png_b64(image, size=128)))
        messages.append(Message(role=role, content=parts))
    sampling.setdefault("temperature", 0)
    return GenerateRequest(request_id=rid, messages=messages, sampling=SamplingParams(**sampling))


def _run(sched: Any, prepared: list[Prepared]) -> Recorder:
    rec = Recorder()
    sched.bind(rec)
    for p in prepared:
        sched.submit(p)
    drain(sched)
    return rec


class _EncoderCalls:
    """Counts vision encoder passes of the tiny model (the whole-prompt forward and ChunkedPrefill)."""

    def __init__(self, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = model.model.get_image_features

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(model.model, "get_image_features", counted)


def test_second_turn_of_an_image_chat_reuses_the_image_and_equals_generate(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    turn1 = prepare(engine, _chat("t1", [("user", "What is in the picture?")], image=7, max_tokens=10))
    turn2 = prepare(
        engine,
        _chat(
            "t2",
            [
                ("user", "What is in the picture?"),
                ("assistant", "A pattern of dots."),
                ("user", "Which colour?"),
            ],
            image=7,
            max_tokens=24,
        ),
    )
    ref1, ref2 = reference_tokens(engine, turn1), reference_tokens(engine, turn2)
    assert len(set(ref2)) >= 3  # the tiny model's output depends on its input: the equality bites
    sched = scheduler_for(engine)
    encoder = _EncoderCalls(engine.loaded.model, monkeypatch)
    rec = _run(sched, [turn1])
    assert encoder.calls == 1 and sched.tokens["t1"] == ref1
    rec = _run(sched, [turn2])
    assert encoder.calls == 1  # turn 2 did not encode the image again
    assert sched.tokens["t2"] == ref2
    final = rec.final("t2")
    assert final is not None and final.prompt_tokens == turn2.prompt_tokens
    image_end = max(s.end for s in turn2.prefix_key.spans)
    assert image_end < final.cached_tokens < turn2.prompt_tokens
    assert sched.prefix is not None
    assert (sched.prefix.stats.hits, sched.prefix.stats.misses) == (1, 1)
    assert sched.prefix.stats.reused_tokens == final.cached_tokens


def test_a_different_image_of_the_same_size_is_not_a_hit(engine: Any) -> None:
    first = prepare(engine, _chat("img-a", [("user", "Describe it.")], image=11, max_tokens=6))
    other = prepare(engine, _chat("img-b", [("user", "Describe it.")], image=12, max_tokens=12))
    assert torch.equal(first.prefix_key.ids, other.prefix_key.ids)  # same placeholders, other pixels
    start = other.prefix_key.spans[0].start
    assert shared_prefix(first.prefix_key, other.prefix_key) == start  # cut at the image
    sched = scheduler_for(engine, prefix_min_tokens=start + 1)
    rec = _run(sched, [first, other])
    assert rec.final("img-b").cached_tokens == 0  # type: ignore[union-attr]
    assert sched.tokens["img-b"] == reference_tokens(engine, other)


@pytest.mark.parametrize("layout", ["concat", "slots"])  # KV_LAYOUT: a hit's rows join either batch
def test_shared_system_prompt_hits_while_other_rows_run_and_in_chunks(engine: Any, layout: str) -> None:
    """Text rows sharing a system prompt join a running batch (whole, then chunked at a small step budget):
    each equals ``generate`` alone."""
    reqs = [
        _chat("sys-a", [("user", "Tell me about cats.")], max_tokens=20),
        _chat("sys-b", [("user", "And dogs, please?")], max_tokens=16),
        _chat(
            "sys-c",
            [("user", "Birds now, with a long and winding question about their songs?")],
            max_tokens=12,
        ),
    ]
    prepared = [prepare(engine, r) for r in reqs]
    refs = {p.request_id: reference_tokens(engine, p) for p in prepared}
    for budget in (4096, 24):
        sched = scheduler_for(engine, max_step_tokens=budget, kv_layout=layout)
        rec = Recorder()
        sched.bind(rec)
        sched.submit(prepared[0])
        for _ in range(3):
            sched.step_once()
        sched.submit(prepared[1])
        sched.step_once()
        sched.submit(prepared[2])
        drain(sched)
        for p in prepared:
            assert sched.tokens[p.request_id] == refs[p.request_id], (budget, p.request_id)
        assert [rec.final(p.request_id).cached_tokens > 0 for p in prepared] == [False, True, True]  # type: ignore[union-attr]


@pytest.mark.parametrize("layout", ["concat", "slots"])
def test_the_cache_stays_within_the_kv_budget(engine: Any, layout: str) -> None:
    prepared = [
        prepare(engine, _chat(f"b{i}", [("user", f"Question number {i}?")], max_tokens=4)) for i in range(6)
    ]
    per_token = _kv_bytes_per_token(engine.loaded.model)
    # two rows (at most) and about two kept prompts (slots: a row's columns come in blocks of BLOCK)
    row = BLOCK if layout == "slots" else prepared[0].prompt_tokens + 8
    budget = per_token * (row + prepared[0].prompt_tokens + 8) * 2
    sched = scheduler_for(engine, kv_cache_bytes=budget, kv_layout=layout, max_batch_size=2)
    rec = _run(sched, prepared)
    assert sched.prefix is not None and 0 < sched.prefix.nbytes <= budget
    assert all(rec.final(p.request_id).finish_reason == "length" for p in prepared)  # type: ignore[union-attr]


def test_prefix_cache_off_keeps_nothing(engine: Any) -> None:
    p = prepare(engine, _chat("off", [("user", "Hello there")], max_tokens=4))
    sched = scheduler_for(engine, prefix_cache=False)
    rec = _run(sched, [p, prepare(engine, _chat("off2", [("user", "Hello there")], max_tokens=4))])
    assert sched.prefix is None and rec.final("off2").cached_tokens == 0  # type: ignore[union-attr]


def test_prefix_cache_lru_and_cover_rules() -> None:
    def key(ids: list[int]) -> Any:
        return prompt_key(_Config(), {"input_ids": torch.tensor([ids])})

    layer = [(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))]
    cache = PrefixCache(min_tokens=2)
    cache.insert(key([1, 2, 3]), layer)
    cache.insert(key([1, 2, 3, 4]), layer)  # covers the first: it goes
    assert len(cache) == 1
    hit = cache.lookup(key([1, 2, 3, 4, 5]))
    assert hit is not None and hit[1] == 4
    assert cache.lookup(key([1, 2, 3, 4]))[1] == 3  # type: ignore[index]  # the last token is prefilled again
    assert cache.lookup(key([9, 2, 3])) is None
    cache.insert(key([7, 7, 7]), layer)
    cache.lookup(key([1, 2, 3, 4, 6]))  # the first entry is now the most recent
    cache.evict(1)
    assert cache.lookup(key([7, 7, 7, 1])) is None and cache.lookup(key([1, 2, 3, 4, 6])) is not None
    assert (cache.stats.hits, cache.stats.misses) == (4, 2)


class _Vision:
    spatial_merge_size = 2


class _Config:
    vision_config = _Vision()
    image_token_id = 151655
    video_token_id = 151656


def _kv_bytes_per_token(model: Any) -> int:
    text = model.config.text_config
    return 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * model.dtype.itemsize


def test_cached_tokens_cross_the_engine_wire_and_reach_the_usage() -> None:
    from services.api.streaming.translate import usage_dict
    from services.model.engine import wire
    from services.model.engine.base import FinalOutput
    from services.protocol.events import Finished, Usage

    packed = wire.pack_outputs([("r", FinalOutput("stop", 40, 5, None, 32))])
    [(rid, final)] = wire.StepReport(packed=packed).outputs()
    assert rid == "r" and final == FinalOutput("stop", 40, 5, None, 32)
    usage = Usage(prompt_tokens=40, completion_tokens=5, cached_tokens=32)
    assert usage_dict(Finished(seq=3, finish_reason="stop", usage=usage)) == {
        "prompt_tokens": 40,
        "completion_tokens": 5,
        "total_tokens": 45,
        "prompt_tokens_details": {"cached_tokens": 32},
    }


def test_kv_and_prefix_metrics_reach_prometheus(engine: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from services.model.metrics import ModelMetrics

    metrics = ModelMetrics()
    sched = scheduler_for(engine, observer=metrics, kv_cache_bytes=1 << 30)
    first = prepare(engine, _chat("m1", [("user", "Tell me about cats.")], max_tokens=4))
    second = prepare(engine, _chat("m2", [("user", "And dogs?")], max_tokens=4))
    rec = _run(sched, [first])
    rec = _run(sched, [second])
    cached = rec.final("m2").cached_tokens  # type: ignore[union-attr]
    samples = {
        (s.name, s.labels.get("kind", "")): s.value
        for family in text_string_to_metric_families(metrics.render(None).decode())
        for s in family.samples
    }
    assert samples[("model_prefix_cache_hits_total", "")] == 1
    assert samples[("model_prefix_cache_misses_total", "")] == 1
    assert samples[("model_prefix_cache_reused_tokens_total", "")] == cached > 0
    assert samples[("model_kv_cache_budget_bytes", "")] == 1 << 30
    assert samples[("model_kv_cache_bytes", "prefixes")] == sched.prefix.nbytes > 0  # type: ignore[union-attr]
    assert samples[("model_kv_cache_bytes", "rows")] == 0  # nothing runs any more
