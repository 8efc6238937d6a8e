"""The fake engine keeps the real engine's contract: batching, finish reasons, usage, cancel, limits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence

import pytest

from services.model.engine.base import FinalOutput, Output, Prepared, TokenOutput
from services.model.engine.fake import FakeEngine
from services.model.settings import ModelSettings
from services.protocol.errors import Conflict, InvalidMedia, NotReady, Overloaded, PromptTooLong
from services.protocol.generate import GenerateRequest

WAIT = 10.0


class Collector:
    """An OutputSink that records every step's batch and lets the test await conditions."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, Output]]] = []
        self._cond = threading.Condition()

    def __call__(self, batch: Sequence[tuple[str, Output]]) -> None:
        with self._cond:
            self.batches.append(list(batch))
            self._cond.notify_all()

    def outputs(self, request_id: str) -> list[Output]:
        with self._cond:
            return [out for batch in self.batches for rid, out in batch if rid == request_id]

    def final(self, request_id: str) -> FinalOutput:
        with self._cond:
            ok = self._cond.wait_for(lambda: self._final_or_none(request_id) is not None, WAIT)
        assert ok, f"no FinalOutput for {request_id}"
        final = self._final_or_none(request_id)
        assert final is not None
        return final

    def wait_tokens(self, request_id: str, n: int) -> None:
        def enough() -> bool:
            return sum(o.tokens for o in self.outputs(request_id) if isinstance(o, TokenOutput)) >= n

        with self._cond:
            assert self._cond.wait_for(enough, WAIT)

    def text(self, request_id: str) -> tuple[str, str]:
        outs = [o for o in self.outputs(request_id) if isinstance(o, TokenOutput)]
        return "".join(o.reasoning for o in outs), "".join(o.content for o in outs)

    def _final_or_none(self, request_id: str) -> FinalOutput | None:
        finals = [o for o in self.outputs(request_id) if isinstance(o, FinalOutput)]
        assert len(finals) <= 1
        return finals[0] if finals else None


def settings(**overrides: object) -> ModelSettings:
    base: dict[str, object] = {"engine": "fake", "fake_step_seconds": 0.001}
    return ModelSettings.model_validate({**base, **overrides})


def request(request_id: str, text: str = "describe the cat", **sampling: object) -> GenerateRequest:
    return GenerateRequest.model_validate(
        {"request_id": request_id, "messages": [{"role": "user", "content": text}], "sampling": sampling}
    )


@pytest.fixture
def make_engine() -> Iterator:
    engines: list[FakeEngine] = []

    def make(**overrides: object) -> tuple[FakeEngine, Collector]:
        engine = FakeEngine(settings(**overrides))
        sink = Collector()
        engine.start(sink)
        engines.append(engine)
        return engine, sink

    yield make
    for engine in engines:
        engine.shutdown(0)


def run(engine: FakeEngine, req: GenerateRequest) -> None:
    engine.submit(asyncio.run(engine.prepare(req)))


def test_output_is_deterministic_and_split_on_think(make_engine) -> None:
    engine, sink = make_engine()
    for rid in ("a", "b"):
        run(engine, request(rid, seed=7))
    run(engine, request("c", seed=8))
    finals = {rid: sink.final(rid) for rid in "abc"}
    assert sink.text("a") == sink.text("b")
    assert sink.text("a") != sink.text("c")
    reasoning, content = sink.text("a")
    assert reasoning and content.startswith("\n\n") and "</think>" not in reasoning + content
    assert finals["a"].finish_reason == "stop"
    token_sum = sum(o.tokens for o in sink.outputs("a") if isinstance(o, TokenOutput))
    assert finals["a"].completion_tokens == token_sum
    assert finals["a"].prompt_tokens == len(engine_prompt_words("describe the cat"))


def engine_prompt_words(text: str) -> list[str]:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n<think>\n".split()


def test_max_tokens_gives_length(make_engine) -> None:
    engine, sink = make_engine()
    run(engine, request("a", max_tokens=3))
    final = sink.final("a")
    assert (final.finish_reason, final.completion_tokens) == ("length", 3)


def test_stop_strings_cut_the_answer_and_hold_back_prefixes(make_engine) -> None:
    engine, sink = make_engine()
    run(engine, request("probe", seed=1))
    sink.final("probe")
    reasoning, content = sink.text("probe")
    stop = content.split()[2][:3]  # a piece of the answer, possibly in the middle of a word
    run(engine, request("a", seed=1, stop=[stop]))
    final = sink.final("a")
    assert final.finish_reason == "stop"
    assert sink.text("a") == (reasoning, content[: content.index(stop)])
    # reasoning is never cut: a stop string that only occurs there does not end the request
    only_in_reasoning = next(w for w in reasoning.split() if w not in content)
    run(engine, request("b", seed=1, stop=[only_in_reasoning]))
    assert sink.final("b").finish_reason == "stop"
    assert sink.text("b") == (reasoning, content)


def test_steps_batch_all_running_rows(make_engine) -> None:
    engine, sink = make_engine(max_batch_size=4)
    for i in range(3):
        run(engine, request(f"r{i}", "[[fake:tokens=20]]"))
    for i in range(3):
        sink.final(f"r{i}")
    steps_with_all = [b for b in sink.batches if {rid for rid, _ in b} == {"r0", "r1", "r2"}]
    assert len(steps_with_all) >= 15  # they advanced together, one sink call per step


def test_cancel_running_and_queued(make_engine) -> None:
    engine, sink = make_engine(max_batch_size=1, max_queue=2)
    run(engine, request("running", "[[fake:tokens=100000]]"))
    run(engine, request("queued", "[[fake:tokens=100000]]"))
    sink.wait_tokens("running", 2)
    assert engine.stats().queued == 1
    assert engine.cancel("queued") and engine.cancel("running")
    assert not engine.cancel("unknown")
    assert sink.final("queued").finish_reason == "cancelled"
    assert sink.final("queued").completion_tokens == 0
    final = sink.final("running")
    assert final.finish_reason == "cancelled" and final.completion_tokens >= 2
    assert not engine.cancel("running")


def test_full_queue_is_overloaded_at_once(make_engine) -> None:
    engine, _ = make_engine(max_batch_size=1, max_queue=1)
    run(engine, request("a", "[[fake:tokens=100000]]"))
    run(engine, request("b", "[[fake:tokens=100000]]"))
    with pytest.raises(Overloaded):
        run(engine, request("c"))
    with pytest.raises(Conflict):
        run(engine, request("a"))


def test_error_directive_fails_the_request(make_engine) -> None:
    engine, sink = make_engine()
    run(engine, request("a", "[[fake:error]]"))
    final = sink.final("a")
    assert final.finish_reason == "error" and final.error


def test_prepare_validates_media_and_context(make_engine) -> None:
    engine, _ = make_engine(fake_context_tokens=64)
    bad = GenerateRequest.model_validate(
        {"request_id": "m", "messages": [{"role": "user", "content": [{"type": "image", "data": "%%"}]}]}
    )
    with pytest.raises(InvalidMedia):
        asyncio.run(engine.prepare(bad))
    with pytest.raises(PromptTooLong):
        asyncio.run(engine.prepare(request("long", "word " * 100)))
    with pytest.raises(PromptTooLong):
        asyncio.run(engine.prepare(request("long", "hi", max_tokens=64)))
    prepared = asyncio.run(engine.prepare(request("ok", "hi")))
    assert prepared.sampling.max_tokens == 64 - prepared.prompt_tokens  # the default is clamped


def test_shutdown_cancels_what_outlives_the_grace(make_engine) -> None:
    engine, sink = make_engine(max_batch_size=1)
    run(engine, request("short", max_tokens=3))
    run(engine, request("long", "[[fake:tokens=100000]]"))
    engine.shutdown(0.2)
    assert sink.final("short").finish_reason == "length"
    assert sink.final("long").finish_reason == "cancelled"
    with pytest.raises(NotReady):
        run(engine, request("late"))


def test_a_row_that_fails_in_a_step_fails_alone(make_engine) -> None:
    """A hostile prepared request (``max_tokens`` None, as if every check upstream were bypassed) and a
    normal prompt join two running rows: the hostile one fails alone, the other one runs, and the running
    rows produce exactly the text of a run without them."""
    prompts = {rid: f"[[fake:tokens=600]] a long story {rid}" for rid in ("a", "b")}  # ~3 s: room under load
    reference, ref_sink = make_engine(fake_step_seconds=0)
    for rid, text in prompts.items():
        run(reference, request(rid, text, seed=4))
    expected = {rid: (ref_sink.final(rid), ref_sink.text(rid)) for rid in prompts}

    engine, sink = make_engine(max_batch_size=4, fake_step_seconds=0.005)
    for rid, text in prompts.items():
        run(engine, request(rid, text, seed=4))
    sink.wait_tokens("a", 3)
    base = asyncio.run(engine.prepare(request("hostile")))
    sampling = base.sampling.model_copy(update={"max_tokens": None})  # not validated: reaches the engine
    engine.submit(Prepared("hostile", sampling, base.prompt_tokens, base.inputs))
    # (a lone surrogate, which once failed its step here, is refused by the protocol at the boundary now:
    # tests/model/test_media_messages.py)
    run(engine, request("surrogate", "a b [[fake:tokens=6]]"))
    final = sink.final("hostile")
    assert final.finish_reason == "error" and final.error
    assert sink.final("surrogate").finish_reason == "stop"
    # It failed while the others were running (in one step with their tokens), not after them.
    failed_in = next(b for b in sink.batches if ("hostile", final) in b)
    assert {"a", "b"} <= {rid for rid, out in failed_in if isinstance(out, TokenOutput)}
    for rid in prompts:
        assert (sink.final(rid), sink.text(rid)) == expected[rid], rid
