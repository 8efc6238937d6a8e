"""One request can never hurt another: a row whose set-up fails, or whose presence makes a batched step
(decode, sampler set-up, sampling) raise, fails alone; the other rows keep exactly the tokens they would have
produced without it (greedy rows equal HF ``generate``, seeded rows equal a run without the hostile row)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.model.engine import batch as kv
from services.model.engine.base import Prepared
from services.model.engine.isolate import culprits
from services.model.engine.sampling import BatchSampler
from tests.model.engine_support import (
    Recorder,
    drain,
    prepare,
    reference_tokens,
    request,
    scheduler_for,
    tiny_engine,
)

# Row positions past this make the injected decode fault fire; the short prompts never reach it.
POSITION_LIMIT = 150


def _probe_failing_with(bad: set[int], calls: list[list[int]]) -> Any:
    def probe(idx: list[int]) -> None:
        calls.append(idx)
        if bad & set(idx):
            raise RuntimeError("boom")

    return probe


def test_culprits_bisects_to_the_failing_rows() -> None:
    calls: list[list[int]] = []
    assert culprits(16, _probe_failing_with({11}, calls)) == [11]
    assert len(calls) == 2 * 4  # two halves per level, four levels
    assert culprits(7, _probe_failing_with({0, 6}, [])) == [0, 6]


def test_culprits_gives_up_when_the_fault_is_not_the_rows() -> None:
    assert culprits(4, _probe_failing_with({0, 1, 2, 3}, [])) is None  # every row fails: the device
    assert culprits(4, _probe_failing_with(set(), [])) is None  # only the whole batch fails: its size
    assert culprits(1, _probe_failing_with({0}, [])) is None  # one row: failing it is failing all


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    return tiny_engine(tiny_model_dir)


@pytest.fixture(scope="module")
def greedy(engine: Any) -> dict[str, Prepared]:
    reqs = [
        request("text-a", "Tell me a story about cats", max_tokens=12, temperature=0),
        request("image-b", "What is in the image?", image=1, max_tokens=14, temperature=0),
        request("text-d", "hi", max_tokens=16, temperature=0),
    ]
    return {r.request_id: prepare(engine, r) for r in reqs}


@pytest.fixture(scope="module")
def references(engine: Any, greedy: dict[str, Prepared]) -> dict[str, list[int]]:
    return {rid: reference_tokens(engine, p) for rid, p in greedy.items()}


def _hostile(engine: Any, rid: str, text: str = "", **sampling: Any) -> Prepared:
    """A prepared request whose sampling values bypass every schema check (as a bug upstream would)."""
    prompt = f"hostile {rid} {text}"
    base = prepare(engine, request(rid, prompt, max_tokens=8, temperature=1.0, seed=3, top_k=20))
    # model_copy(update=...) does not validate: the values reach the engine as they are.
    return Prepared(rid, base.sampling.model_copy(update=sampling), base.prompt_tokens, base.inputs)


def _seeded(engine: Any, rid: str, seed: int, **extra: Any) -> Prepared:
    params = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "max_tokens": 14, "seed": seed, **extra}
    return prepare(engine, request(rid, f"Once upon a time {rid}", **params))


def _run(sched: Any, first: list[Prepared], later: list[Prepared], steps_between: int = 2) -> Recorder:
    """Submit ``first``, run some steps, then let ``later`` join the running batch; drain."""
    rec = Recorder()
    sched.bind(rec)
    for prepared in first:
        sched.submit(prepared)
    for _ in range(steps_between):
        sched.step_once()
    for prepared in later:
        sched.submit(prepared)
    drain(sched)
    return rec


def _assert_untouched(sched: Any, rec: Recorder, references: dict[str, list[int]]) -> None:
    for rid, ref in references.items():
        final = rec.final(rid)
        assert final is not None and final.finish_reason in {"length", "stop"}, (rid, final)
        assert sched.tokens[rid] == ref, rid


def _error(rec: Recorder, rid: str) -> str:
    final = rec.final(rid)
    assert final is not None and final.finish_reason == "error", (rid, final)
    assert final.error
    return final.error


@pytest.mark.slow
def test_hostile_sampling_values_joining_a_running_batch_hurt_no_one(
    engine: Any, greedy: dict[str, Prepared], references: dict[str, list[int]]
) -> None:
    vocab = engine.loaded.model.get_output_embeddings().weight.shape[0]
    hostile = [
        _hostile(engine, "big-top-k", top_k=2**64),
        _hostile(engine, "big-seed", seed=2**64, top_k=50),
        _hostile(engine, "low-seed", seed=-(2**63) - 1, top_k=50),
        _hostile(engine, "nan-temperature", temperature=float("nan")),
        _hostile(engine, "inf-penalty", presence_penalty=float("inf")),
        _hostile(engine, "zero-repetition", repetition_penalty=0.0),
    ]
    sched = scheduler_for(engine)
    rec = _run(sched, list(greedy.values()), hostile)
    _assert_untouched(sched, rec, references)
    # Out-of-range integers are normalised and run: top_k clamps to the vocabulary, seeds reduce mod 2**64.
    for prepared in hostile[:3]:
        final = rec.final(prepared.request_id)
        assert final is not None and final.finish_reason in {"length", "stop"}, final
        assert final.completion_tokens == len(sched.tokens[prepared.request_id]) > 0
    assert "temperature" in _error(rec, "nan-temperature")
    assert "presence_penalty" in _error(rec, "inf-penalty")
    assert "repetition_penalty" in _error(rec, "zero-repetition")

    alone = scheduler_for(engine)
    same = [
        _hostile(engine, "big-top-k", top_k=vocab),
        _hostile(engine, "big-seed", seed=0, top_k=50),
        _hostile(engine, "low-seed", seed=(-(2**63) - 1) % 2**64, top_k=50),
    ]
    _run(alone, same, [], steps_between=0)
    for prepared in same:
        assert sched.tokens[prepared.request_id] == alone.tokens[prepared.request_id], prepared.request_id


@pytest.mark.slow
def test_hostile_long_prompt_fails_alone_at_chunked_admission(
    engine: Any, greedy: dict[str, Prepared], references: dict[str, list[int]]
) -> None:
    # Prompts over the step budget are prefilled in chunks: their set-up is guarded as well.
    sched = scheduler_for(engine, max_step_tokens=24)
    long_ok = _hostile(engine, "long-big-seed", "tell me more " * 10, seed=2**64)
    long_bad = _hostile(engine, "long-nan", "tell me more " * 10, top_p=float("nan"))
    assert long_ok.prompt_tokens > 24
    rec = _run(sched, [greedy["text-a"], greedy["text-d"]], [long_bad, long_ok])
    _assert_untouched(sched, rec, {rid: references[rid] for rid in ("text-a", "text-d")})
    assert "top_p" in _error(rec, "long-nan")
    assert rec.final("long-big-seed").finish_reason == "length"  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["concat", "slots"])  # KV_LAYOUT: slots probes on concat copies of rows
def test_a_row_that_breaks_the_batched_decode_fails_alone(
    engine: Any,
    greedy: dict[str, Prepared],
    references: dict[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
    layout: str,
) -> None:
    """A fault that fires in the batched decode whenever one row is in the batch (its position passed a
    limit, as a row past a position table would): bisection finds it; the others go on."""
    real_decode = kv.decode
    calls: list[int] = []

    def faulty(model: Any, batch: kv.BatchTensors, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(batch.size)
        if bool((batch.next_pos >= POSITION_LIMIT).any()):
            raise IndexError("index out of range in self")
        return real_decode(model, batch, *args, **kwargs)

    monkeypatch.setattr(kv, "decode", faulty)
    poison = prepare(engine, request("poison", "word " * POSITION_LIMIT, max_tokens=8, temperature=0))
    assert poison.prompt_tokens >= POSITION_LIMIT
    assert all(p.prompt_tokens + p.sampling.max_tokens < POSITION_LIMIT for p in greedy.values())
    sched = scheduler_for(engine, kv_layout=layout)
    rec = _run(sched, list(greedy.values()), [poison])
    assert "index out of range" in _error(rec, "poison")
    assert rec.final("poison").completion_tokens == 1  # type: ignore[union-attr]  # sampled at its join
    _assert_untouched(sched, rec, references)
    assert max(calls) == 4 and 1 in calls  # the batch of four failed; subsets were probed apart


@pytest.mark.slow
def test_a_row_that_breaks_sampling_fails_alone_and_seeded_rows_draw_once(
    engine: Any,
    greedy: dict[str, Prepared],
    references: dict[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fault in the batched sampling path whenever one row (top_k 13) is in the group: the seeded
    companions sample from the same group and still produce exactly their tokens without it (each
    row's generator draws once per step, also when the step is retried)."""
    seeded = [_seeded(engine, "s1", 7), _seeded(engine, "s2", 11, temperature=0.7, top_k=0, top_p=1.0)]
    alone = scheduler_for(engine)
    _run(alone, seeded, [], steps_between=0)

    real_head = BatchSampler._sample_head

    def faulty(self: BatchSampler, x: torch.Tensor, g: Any, u: torch.Tensor, tier: int = 0) -> torch.Tensor:
        if bool((g.top_k == 13).any()):
            raise RuntimeError("sampling kernel failed")
        return real_head(self, x, g, u, tier)

    monkeypatch.setattr(BatchSampler, "_sample_head", faulty)
    poison = _seeded(engine, "poison", 5, top_k=13)
    sched = scheduler_for(engine)
    rec = _run(sched, [*greedy.values(), *seeded], [poison])
    assert "sampling kernel failed" in _error(rec, "poison")
    _assert_untouched(sched, rec, references)
    for prepared in seeded:
        rid = prepared.request_id
        assert rec.final(rid).finish_reason == "length", rid  # type: ignore[union-attr]
        assert sched.tokens[rid] == alone.tokens[rid], rid


@pytest.mark.slow
def test_a_fault_that_cannot_be_isolated_fails_the_batch_and_the_loop_lives_on(
    engine: Any,
    greedy: dict[str, Prepared],
    references: dict[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sched = scheduler_for(engine)
    rec = Recorder()
    sched.bind(rec)
    sched.submit(greedy["text-a"])
    sched.submit(greedy["text-d"])
    sched.step_once()

    def broken(self: BatchSampler, logits: torch.Tensor, draws: Any = None) -> torch.Tensor:
        raise RuntimeError("device lost")

    with monkeypatch.context() as m:
        m.setattr(BatchSampler, "sample", broken)
        sched.step_once()
    for rid in ("text-a", "text-d"):
        assert "device lost" in _error(rec, rid)
    assert sched.stats().running == 0
    sched.submit(greedy["image-b"])
    drain(sched)
    assert sched.tokens["image-b"] == references["image-b"]


@pytest.mark.slow
def test_a_row_whose_own_output_step_raises_fails_alone(
    engine: Any,
    greedy: dict[str, Prepared],
    references: dict[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.model.engine.detokenize import IncrementalDetokenizer

    real_push = IncrementalDetokenizer.push

    def faulty(self: IncrementalDetokenizer, token: int) -> Any:
        if "poison-stop" in self._stops:
            raise ValueError("detokenizer bug")
        return real_push(self, token)

    monkeypatch.setattr(IncrementalDetokenizer, "push", faulty)
    poison = prepare(engine, request("poison", "hello", max_tokens=8, temperature=0, stop=["poison-stop"]))
    sched = scheduler_for(engine)
    rec = _run(sched, list(greedy.values()), [poison])
    assert "detokenizer bug" in _error(rec, "poison")
    _assert_untouched(sched, rec, references)
