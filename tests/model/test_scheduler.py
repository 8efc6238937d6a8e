"""The batching scheduler on the tiny real model: batched decoding equals decoding alone, and the request
life cycle (length, stop, cancel, errors, overload, shutdown) behaves."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from services.model.engine import batch as kv
from services.model.engine.base import EngineStats, FinalOutput, Prepared, TokenOutput
from services.model.engine.chunked import visual_tokens
from services.model.engine.scheduler import prefill_cost
from services.protocol.errors import Conflict, NotReady, Overloaded
from services.protocol.generate import (
    GenerateRequest,
    ImagePart,
    Message,
    SamplingParams,
    TextPart,
    VideoPart,
)
from tests.model.engine_support import (
    Recorder,
    drain,
    png_b64,
    prepare,
    reference_tokens,
    request,
    scheduler_for,
    tiny_engine,
    video_b64,
)

# Loading the tiny model and its processor takes several seconds; each test then takes well under one.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    return tiny_engine(tiny_model_dir)


@pytest.fixture(scope="module")
def mixed(engine: Any) -> dict[str, Prepared]:
    """Text, image and video requests of different lengths, all greedy."""
    reqs = [
        request("text-a", "Tell me a story about cats", max_tokens=12, temperature=0),
        request("image-b", "What is in the image?", image=1, max_tokens=30, temperature=0),
        request("video-c", "Describe the video", video=2, max_tokens=20, temperature=0),
        request("text-d", "hi", max_tokens=25, temperature=0),
        request("image-e", "And this one?", image=3, max_tokens=18, temperature=0),
        request("text-f", "Count to ten, slowly and carefully please", max_tokens=15, temperature=0),
    ]
    return {r.request_id: prepare(engine, r) for r in reqs}


@pytest.fixture(scope="module")
def references(engine: Any, mixed: dict[str, Prepared]) -> dict[str, list[int]]:
    return {rid: reference_tokens(engine, p) for rid, p in mixed.items()}


def _reported_tokens(rec: Recorder, request_id: str) -> int:
    """Tokens covered by the request's TokenOutputs (what the token metrics count)."""
    return sum(o.tokens for o in rec.outputs(request_id) if isinstance(o, TokenOutput))


def test_references_are_diverse(references: dict[str, list[int]]) -> None:
    # A model that repeats one token would make every equality below pass vacuously.
    for rid, tokens in references.items():
        assert len(set(tokens)) >= 3, rid
    assert len({tuple(t) for t in references.values()}) == len(references)


@pytest.mark.parametrize("layout", ["concat", "slots"])  # KV_LAYOUT: both give the tokens of `generate` alone
def test_batched_equals_alone_with_joins_and_leaves(
    engine: Any, mixed: dict[str, Prepared], references: dict[str, list[int]], layout: str
) -> None:
    sched = scheduler_for(engine, kv_layout=layout)
    rec = Recorder()
    sched.bind(rec)
    sched.submit(mixed["text-a"])
    for _ in range(3):
        sched.step_once()
    sched.submit(mixed["image-b"])  # joins a running text row
    sched.step_once()
    sched.submit(mixed["video-c"])
    sched.submit(mixed["text-d"])
    for _ in range(11):  # text-a (12 tokens) has left by now
        sched.step_once()
    assert rec.final("text-a") is not None
    sched.submit(mixed["image-e"])  # joins after a row left
    for _ in range(4):
        sched.step_once()
    sched.submit(mixed["text-f"])
    drain(sched)
    for rid, ref in references.items():
        assert sched.tokens[rid] == ref, rid
        final = rec.final(rid)
        assert final is not None
        assert final.completion_tokens == len(ref)
        assert final.finish_reason == ("length" if len(ref) == mixed[rid].sampling.max_tokens else "stop")
        assert _reported_tokens(rec, rid) == len(ref), rid
    assert sched.stats().running == 0


def test_threaded_concurrent_submissions_equal_alone(
    engine: Any, mixed: dict[str, Prepared], references: dict[str, list[int]]
) -> None:
    sched = scheduler_for(engine, max_batch_size=4, max_step_tokens=64)
    rec = Recorder()
    sched.start(rec)
    try:
        for prepared in mixed.values():
            sched.submit(prepared)
        rec.wait(list(mixed))
    finally:
        sched.shutdown(5)
    for rid, ref in references.items():
        assert sched.tokens[rid] == ref, rid


def test_one_step_reports_all_rows_in_one_sink_call(engine: Any, mixed: dict[str, Prepared]) -> None:
    sched = scheduler_for(engine)
    rec = Recorder()
    sched.bind(rec)
    for rid in ("text-a", "text-d", "text-f"):
        sched.submit(mixed[rid])
    steps = drain(sched)
    assert len(rec.calls) <= steps
    first = {rid for rid, _ in rec.calls[1]}
    assert len(first) >= 2  # the second step already decodes several rows together


def test_prefill_budget_spreads_admissions(engine: Any, mixed: dict[str, Prepared]) -> None:
    obs = _Observer()
    sched = scheduler_for(engine, observer=obs, max_step_tokens=32)
    rec = Recorder()
    sched.bind(rec)
    for rid in ("text-a", "text-d", "text-f"):  # 16 + 11 fit one step's budget; text-f waits a step
        sched.submit(mixed[rid])
    sched.step_once()
    assert sched.stats() == EngineStats(running=2, queued=1)
    sched.step_once()
    assert sched.stats() == EngineStats(running=3, queued=0)
    assert [p for _, _, p in obs.steps[:2]] == [27, mixed["text-f"].prompt_tokens]


def test_step_budget_counts_the_vision_encoder_work(
    engine: Any, mixed: dict[str, Prepared], references: dict[str, list[int]]
) -> None:
    """An image prompt costs its prompt tokens (text decoder) plus its visual tokens (vision encoder): one
    that fits the budget by prompt tokens only, but not with its encoder work, does not ride along with
    another prompt's prefill; it is chunked in the next steps (encoder, then text) and stays exact."""
    image = mixed["image-b"]
    visual = visual_tokens(engine.loaded.model, image.inputs)
    assert visual == 64 and prefill_cost(engine.loaded.model, image) == image.prompt_tokens + 64
    budget = image.prompt_tokens + mixed["text-d"].prompt_tokens + 8  # both fit by prompt tokens alone
    obs = _Observer()
    sched = scheduler_for(engine, observer=obs, max_step_tokens=budget)
    sched.bind(Recorder())
    sched.submit(mixed["text-d"])
    sched.submit(image)
    sched.step_once()
    assert sched.stats() == EngineStats(running=1, queued=1)  # the image waits for a step of its own
    drain(sched)
    assert obs.steps[0][2] == mixed["text-d"].prompt_tokens
    assert all(p <= budget for _, _, p in obs.steps)
    assert sum(p for _, _, p in obs.steps) == mixed["text-d"].prompt_tokens + image.prompt_tokens + 64
    for rid in ("text-d", "image-b"):
        assert sched.tokens[rid] == references[rid], rid


def _long_prompt(engine: Any) -> Prepared:
    """Text, two images and a video: 171 prompt tokens, the images and video 64 + 64 + 16 of them."""
    parts = [
        ImagePart(data=png_b64(1)),
        TextPart(text="and then"),
        VideoPart(data=video_b64(2)),
        ImagePart(data=png_b64(3)),
        TextPart(text="what do these have in common? " * 2),
    ]
    req = GenerateRequest(
        request_id="long-mm",
        messages=[Message(role="user", content=parts)],
        sampling=SamplingParams(max_tokens=12, temperature=0),
    )
    return prepare(engine, req)


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(
    engine: Any, mixed: dict[str, Prepared], references: dict[str, list[int]]
) -> None:
    long = _long_prompt(engine)
    assert long.prompt_tokens > 3 * 48
    obs = _Observer()
    sched = scheduler_for(engine, observer=obs, max_step_tokens=48)
    sched.bind(Recorder())
    sched.submit(mixed["text-d"])
    sched.step_once()
    sched.submit(long)
    sched.submit(mixed["text-a"])  # arrives behind the long prompt: keeps arrival order
    chunk_steps = 0
    while "long-mm" not in sched.tokens:
        before = len(sched.tokens["text-d"])
        sched.step_once()
        chunk_steps += 1
        assert len(sched.tokens["text-d"]) == before + 1  # the running row decodes in every step
        assert "text-a" not in sched.tokens or "long-mm" in sched.tokens
    # Each image (64 visual tokens, more than the budget) is encoded alone in its step; otherwise no step
    # prefills more than the budget.
    assert chunk_steps >= 5
    assert [p for _, _, p in obs.steps[1 : 1 + chunk_steps] if p > 48] == [64, 64]
    drain(sched)
    assert sched.tokens["long-mm"] == reference_tokens(engine, long)
    for rid in ("text-d", "text-a"):
        assert sched.tokens[rid] == references[rid], rid


def test_cancel_during_a_chunked_prefill_frees_its_slot(engine: Any, mixed: dict[str, Prepared]) -> None:
    long = _long_prompt(engine)
    sched = scheduler_for(engine, max_step_tokens=48, max_batch_size=2)
    rec = Recorder()
    sched.bind(rec)
    sched.submit(long)
    sched.step_once()
    assert sched.stats() == EngineStats(running=1, queued=0)  # prefilling: holds a batch slot
    assert sched.cancel("long-mm")
    sched.step_once()
    assert rec.final("long-mm") == FinalOutput("cancelled", long.prompt_tokens, 0)
    assert sched.stats() == EngineStats(running=0, queued=0)
    assert sched.cancel("long-mm") is False
    sched.submit(mixed["text-a"])
    drain(sched)
    assert rec.final("text-a").finish_reason == "length"  # type: ignore[union-attr]


def _sampled(engine: Any, rid: str, seed: int, **extra: Any) -> Prepared:
    text = {"s1": "Once upon a time", "s2": "Write a poem", "s3": "Explain gravity"}.get(rid, "hello there")
    params = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "max_tokens": 16, "seed": seed, **extra}
    return prepare(engine, request(rid, text, **params))


def test_seeded_sampling_is_reproducible_and_independent_of_companions(engine: Any) -> None:
    alone = scheduler_for(engine)
    alone.bind(Recorder())
    alone.submit(_sampled(engine, "s1", seed=7))
    drain(alone)

    crowd = scheduler_for(engine)
    crowd.bind(Recorder())
    crowd.submit(_sampled(engine, "s2", seed=1, temperature=0.7))
    crowd.submit(_sampled(engine, "s3", seed=2, top_p=1.0, top_k=0))
    crowd.step_once()
    crowd.submit(_sampled(engine, "s1", seed=7))
    crowd.submit(_sampled(engine, "s4", seed=3, temperature=0))
    drain(crowd)
    assert crowd.tokens["s1"] == alone.tokens["s1"]

    other = scheduler_for(engine)
    other.bind(Recorder())
    other.submit(_sampled(engine, "s1", seed=8))
    drain(other)
    assert other.tokens["s1"] != alone.tokens["s1"]


def test_stop_string_split_across_tokens_finishes_with_stop(engine: Any) -> None:
    # All output counts as content here, so the stop string applies from the first token.
    base = request("stop-ref", "Tell me a story about cats", max_tokens=20, temperature=0)
    sched = scheduler_for(engine, starts_in_reasoning=False)
    rec = Recorder()
    sched.bind(rec)
    sched.submit(prepare(engine, base))
    drain(sched)
    full = rec.text("stop-ref")[1]
    assert len(full) > 12
    stop = full[8:14]  # spans several tokens of this (random) output
    cut = full.index(stop)

    sched.submit(
        prepare(
            engine,
            request(
                "stop", base.messages[0].content[0].text, max_tokens=20, temperature=0, stop=["zzzq", stop]
            ),
        )
    )
    drain(sched)
    final = rec.final("stop")
    assert final is not None and final.finish_reason == "stop"
    assert rec.text("stop") == ("", full[:cut])
    assert final.completion_tokens < 20


def test_cancel_one_of_several_within_a_step(engine: Any, mixed: dict[str, Prepared]) -> None:
    long = {
        rid: prepare(engine, request(rid, f"keep going {rid}", max_tokens=60000, temperature=0))
        for rid in ("long-1", "long-2", "long-3")
    }
    sched = scheduler_for(engine)
    rec = Recorder()
    sched.start(rec)
    try:
        for prepared in long.values():
            sched.submit(prepared)
        sched.submit(mixed["text-a"])
        rec.wait_tokens("long-2", 5)
        seen = len(sched.tokens["long-2"])
        assert sched.cancel("long-2")
        rec.wait(["long-2"])
        final = rec.final("long-2")
        assert final is not None and final.finish_reason == "cancelled"
        assert final.completion_tokens <= seen + 2  # at most the step in flight and the next boundary
        assert sched.cancel("long-2") is False
        rec.wait(["text-a"])
        assert rec.final("text-a").finish_reason == "length"  # type: ignore[union-attr]
        assert sched.stats().running == 2
    finally:
        sched.shutdown(0)
    for rid in ("long-1", "long-3"):
        assert rec.final(rid).finish_reason == "cancelled"  # type: ignore[union-attr]


def test_cancel_of_a_queued_request(engine: Any, mixed: dict[str, Prepared]) -> None:
    sched = scheduler_for(engine, max_batch_size=1)
    rec = Recorder()
    sched.bind(rec)
    sched.submit(mixed["text-a"])
    sched.submit(mixed["text-d"])
    sched.step_once()
    assert sched.stats().queued == 1
    assert sched.cancel("text-d")
    sched.step_once()
    final = rec.final("text-d")
    assert final == FinalOutput("cancelled", mixed["text-d"].prompt_tokens, 0)
    drain(sched)
    assert rec.final("text-a").finish_reason == "length"  # type: ignore[union-attr]
    assert sched.cancel("unknown") is False


def test_overloaded_when_queue_full_and_conflict_on_duplicate(
    engine: Any, mixed: dict[str, Prepared]
) -> None:
    sched = scheduler_for(engine, max_batch_size=1, max_queue=1)
    sched.bind(Recorder())
    sched.submit(mixed["text-a"])  # takes the free batch slot at the next step
    with pytest.raises(Conflict):
        sched.submit(mixed["text-a"])
    sched.submit(mixed["text-d"])  # the one queue place
    with pytest.raises(Overloaded):
        sched.submit(mixed["text-f"])
    sched.step_once()
    with pytest.raises(Overloaded):  # text-a runs, text-d still waits
        sched.submit(mixed["text-f"])


def test_failed_prefill_fails_only_that_request(engine: Any, mixed: dict[str, Prepared]) -> None:
    sched = scheduler_for(engine)
    rec = Recorder()
    sched.bind(rec)
    sched.submit(mixed["text-a"])
    sched.step_once()
    broken = Prepared(request_id="broken", sampling=mixed["text-d"].sampling, prompt_tokens=3, inputs={})
    sched.submit(broken)
    drain(sched)
    final = rec.final("broken")
    assert final is not None and final.finish_reason == "error" and final.error
    assert rec.final("text-a").finish_reason == "length"  # type: ignore[union-attr]
    # A prompt over the budget (prefilled in chunks) that fails fails alone too.
    broken_long = Prepared(request_id="broken-long", sampling=broken.sampling, prompt_tokens=10**6, inputs={})
    sched.submit(broken_long)
    sched.submit(mixed["text-d"])
    drain(sched)
    assert rec.final("broken-long").finish_reason == "error"  # type: ignore[union-attr]
    assert rec.final("text-d").finish_reason == "length"  # type: ignore[union-attr]


def test_failed_decode_fails_the_batch_and_the_loop_lives_on(
    engine: Any, mixed: dict[str, Prepared], references: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sched = scheduler_for(engine)
    rec = Recorder()
    sched.bind(rec)
    sched.submit(mixed["text-a"])
    sched.submit(mixed["text-d"])
    sched.step_once()

    def boom(model: Any, batch: kv.BatchTensors, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("device lost")

    with monkeypatch.context() as m:
        m.setattr(kv, "decode", boom)
        sched.step_once()
    for rid in ("text-a", "text-d"):
        final = rec.final(rid)
        assert final is not None and final.finish_reason == "error" and "device lost" in (final.error or "")
    sched.submit(mixed["text-f"])
    drain(sched)
    assert sched.tokens["text-f"] == references["text-f"]


def test_shutdown_lets_short_rows_finish_then_cancels_the_rest(
    engine: Any, mixed: dict[str, Prepared]
) -> None:
    sched = scheduler_for(engine, max_batch_size=1)
    rec = Recorder()
    sched.start(rec)
    sched.submit(mixed["text-a"])
    sched.submit(mixed["text-d"])  # queued: never starts once shutdown begins
    rec.wait_tokens("text-a", 1)
    sched.shutdown(30)
    assert rec.final("text-a").finish_reason == "length"  # type: ignore[union-attr]
    assert rec.final("text-d").finish_reason == "cancelled"  # type: ignore[union-attr]
    with pytest.raises(NotReady):
        sched.submit(mixed["text-f"])

    sched = scheduler_for(engine)
    rec = Recorder()
    sched.start(rec)
    sched.submit(prepare(engine, request("endless", "go on", max_tokens=100_000, temperature=0)))
    rec.wait_tokens("endless", 3)
    stopped = threading.Event()
    threading.Thread(target=lambda: (sched.shutdown(0), stopped.set())).start()
    assert stopped.wait(10)
    assert rec.final("endless").finish_reason == "cancelled"  # type: ignore[union-attr]


class _Observer:
    def __init__(self) -> None:
        self.steps: list[tuple[int, float, int]] = []
        self.first: dict[str, float] = {}
        self.finished: dict[str, tuple[str, int]] = {}

    def on_step(self, batch_size: int, seconds: float, prefill_tokens: int, prefills: int = 0) -> None:
        self.steps.append((batch_size, seconds, prefill_tokens))

    def on_first_token(self, request_id: str, seconds: float) -> None:
        self.first[request_id] = seconds

    def on_finish(self, request_id: str, finish_reason: str, completion_tokens: int) -> None:
        self.finished[request_id] = (finish_reason, completion_tokens)


def test_observer_sees_steps_first_tokens_and_finishes(
    engine: Any, mixed: dict[str, Prepared], references: dict[str, list[int]]
) -> None:
    obs = _Observer()
    sched = scheduler_for(engine, observer=obs)
    sched.bind(Recorder())
    sched.submit(mixed["text-a"])
    sched.submit(mixed["text-d"])
    drain(sched)
    prompts = mixed["text-a"].prompt_tokens + mixed["text-d"].prompt_tokens
    assert obs.steps[0][0] == 2 and obs.steps[0][2] == prompts
    assert max(b for b, _, _ in obs.steps) == 2 and obs.steps[-1][0] == 1
    assert set(obs.first) == {"text-a", "text-d"} and all(s >= 0 for s in obs.first.values())
    assert obs.finished == {rid: ("length", len(references[rid])) for rid in ("text-a", "text-d")}


def test_unexpected_step_error_fails_all_rows_and_recovers(
    engine: Any, mixed: dict[str, Prepared], references: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.model.engine.detokenize import IncrementalDetokenizer

    sched = scheduler_for(engine)
    rec = Recorder()
    sched.bind(rec)
    sched.submit(mixed["text-a"])
    sched.step_once()
    sched.submit(mixed["text-d"])  # admitted in the failing step

    def bug(self: Any, token: int) -> Any:
        raise ValueError("detokenizer bug")

    with monkeypatch.context() as m:
        m.setattr(IncrementalDetokenizer, "push", bug)
        sched.step_once()
    for rid in ("text-a", "text-d"):
        final = rec.final(rid)
        assert final is not None and final.finish_reason == "error"
        assert "detokenizer bug" in (final.error or "")
    assert sched.stats().running == 0
    sched.submit(mixed["text-f"])
    drain(sched)
    assert sched.tokens["text-f"] == references["text-f"]


def test_eos_token_finishes_with_stop(
    engine: Any, mixed: dict[str, Prepared], references: dict[str, list[int]]
) -> None:
    ref = references["text-a"]
    eos = ref[5]  # pretend the sixth greedy token is an end-of-sequence token
    sched = scheduler_for(engine, eos_token_ids=frozenset({eos}))
    rec = Recorder()
    sched.bind(rec)
    sched.submit(mixed["text-a"])
    drain(sched)
    final = rec.final("text-a")
    assert final is not None and final.finish_reason == "stop"
    assert final.completion_tokens == ref.index(eos) + 1
    assert _reported_tokens(rec, "text-a") == final.completion_tokens  # the eos token too
    assert sched.tokens["text-a"] == ref[: ref.index(eos) + 1]


def test_batch_never_exceeds_max_batch_size(
    engine: Any, mixed: dict[str, Prepared], references: dict[str, list[int]]
) -> None:
    obs = _Observer()
    sched = scheduler_for(engine, observer=obs, max_batch_size=2)
    sched.bind(Recorder())
    for prepared in mixed.values():
        sched.submit(prepared)
    drain(sched)
    assert max(b for b, _, _ in obs.steps) == 2
    for rid, ref in references.items():
        assert sched.tokens[rid] == ref, rid
