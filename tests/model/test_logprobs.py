"""Logprobs of generated tokens: the sampler's distribution (unit), and the real scheduler on the tiny
checkpoint (sorted candidate lists, the chosen token among them when it is in its own top k, greedy tokens
at the row maximum, one entry per generated token, reasoning/answer split at ``</think>``, rows without
logprobs unchanged), and their trip through the model service's log (compaction keeps them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from services.model.engine.base import FinalOutput, LogprobEntry, TokenOutput
from services.model.engine.logprobs import FLOOR, candidate
from services.model.engine.sampling import (
    BatchSampler,
    RowSampler,
    log_distribution,
    sampling_config,
)
from tests.model.engine_support import Recorder, drain, prepare, request, scheduler_for, tiny_engine

VOCAB = 1000


def _rows(*temps: float, **extra: Any) -> list[RowSampler]:
    return [
        RowSampler(sampling_config(temperature=t, seed=i, **extra), torch.empty(0), VOCAB)
        for i, t in enumerate(temps)
    ]


def test_the_distribution_sums_to_one_and_follows_the_temperature() -> None:
    x = torch.randn(3, VOCAB) * 4
    lp = log_distribution(x, [0.0, 0.5, 1.7])
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(lp[0], torch.log_softmax(x[0], -1))  # greedy: temperature 1
    assert torch.allclose(lp[1], torch.log_softmax(x[1] / 0.5, -1), atol=1e-5)


def test_sampler_logprobs_are_those_of_the_distribution_it_drew_from() -> None:
    sampler = BatchSampler(VOCAB, "cpu")
    rows = _rows(0.0, 0.8, 1.3, repetition_penalty=1.0)
    sampler.set_rows(rows)
    x = torch.randn(3, VOCAB) * 3
    tokens = sampler.sample(x, [0.0, 0.3, 0.7])
    chosen, ids, values = sampler.logprobs([0, 2], tokens, 5)
    full = log_distribution(x[[0, 2]], [0.0, 1.3])
    for j, row in enumerate([0, 2]):
        assert chosen[j] == pytest.approx(full[j, tokens[row]].item(), abs=1e-5)
        assert values[j] == sorted(values[j], reverse=True)
        assert ids[j] == full[j].topk(5).indices.tolist()
    assert chosen[0] == pytest.approx(values[0][0])  # greedy: the row's most likely token


def test_penalised_rows_report_the_penalised_distribution() -> None:
    sampler = BatchSampler(VOCAB, "cpu")
    row = RowSampler(sampling_config(temperature=0.0, frequency_penalty=2.0), torch.empty(0), VOCAB)
    sampler.set_rows([row])
    x = torch.zeros(1, VOCAB)
    x[0, 7] = 3.0
    row.record(7)
    row.record(7)  # 7 is now penalised by 4: below the others' 0
    tokens = sampler.sample(x)
    assert tokens.item() != 7
    chosen, ids, _ = sampler.logprobs([0], tokens, 3)
    assert 7 not in ids[0]
    assert math.exp(chosen[0]) == pytest.approx(1 / (VOCAB - 1 + math.exp(-1.0)), rel=1e-4)


def test_a_masked_token_gets_the_floor_not_infinity() -> None:
    from services.model.engine.detokenize import TokenTable

    table = TokenTable(pieces=(b"a", b"\xe4\xbd"), special_names={2: "<|im_end|>"})
    assert candidate(table, 0, float("-inf")) == ("a", FLOOR, b"a")
    assert candidate(table, 1, -1.0) == ("\ufffd", -1.0, b"\xe4\xbd")
    assert candidate(table, 2, -0.5) == ("<|im_end|>", -0.5, None)
    assert candidate(table, 0, float("nan")) == ("a", FLOOR, b"a")  # a row whose every token was masked
    assert candidate(table, 0, 1e-7)[1] == 0.0  # rounding never gives a probability above 1


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 1e-45},
        {"temperature": 1e-40, "presence_penalty": 2.0},
        {"temperature": 1e-300, "top_k": 1},
        {"temperature": 0.0, "repetition_penalty": 1e-300},
        {"temperature": 1e-30, "repetition_penalty": 1e-300},
    ],
)
def test_tiny_temperatures_and_penalties_keep_the_numbers_finite(extra: dict[str, Any]) -> None:
    # A hostile-input hunt: temperature 1e-45 with logprobs gave NaN logprobs (null on the wire, a broken
    # stream); repetition_penalty 1e-300 is 0 in float32. Below MIN_TEMPERATURE a row is greedy.
    sampler = BatchSampler(VOCAB, "cpu")
    row = RowSampler(sampling_config(**extra), torch.empty(0), VOCAB)
    assert row.config.greedy and row.config.repetition_penalty >= 1e-6
    sampler.set_rows([row])
    x = torch.randn(1, VOCAB) * 4
    row.record(int(x[0].argmin()))  # a seen token, so that the penalties act
    token = sampler.sample(x.clone(), [0.5])
    chosen, _, values = sampler.logprobs([0], token, 5)
    assert math.isfinite(chosen[0]) and all(math.isfinite(v) for v in values[0])
    assert token.item() == int(x[0].argmax())  # the seen token had the lowest logit


# ---- the real scheduler on the tiny checkpoint --------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    return tiny_engine(tiny_model_dir)


def _entries(rec: Recorder, rid: str) -> tuple[list[LogprobEntry], list[LogprobEntry]]:
    reasoning: list[LogprobEntry] = []
    content: list[LogprobEntry] = []
    for out in rec.outputs(rid):
        if isinstance(out, TokenOutput) and out.logprobs is not None:
            reasoning += out.logprobs.reasoning
            content += out.logprobs.content
    return reasoning, content


def _run(engine: Any, reqs: list[Any]) -> tuple[Recorder, Any]:
    sched = scheduler_for(engine)
    rec = Recorder()
    sched.bind(rec)
    for req in reqs:
        sched.submit(prepare(engine, req))
    drain(sched)
    return rec, sched


@pytest.mark.integration
def test_tiny_model_logprobs(engine: Any) -> None:
    k = 5
    # a reasoning budget of 8 forces </think>: both parts get entries whatever the random model writes
    greedy = request(
        "g", "describe a cat", max_tokens=30, temperature=0.0, top_logprobs=k, max_reasoning_tokens=8
    )
    sampled = request(
        "s",
        "describe a dog",
        max_tokens=30,
        temperature=1.0,
        seed=3,
        top_k=0,
        top_logprobs=k,
        max_reasoning_tokens=8,
    )
    plain = request("p", "describe a cat", max_tokens=30, temperature=0.0)
    rec, sched = _run(engine, [greedy, sampled, plain])
    alone, _ = _run(engine, [request("p", "describe a cat", max_tokens=30, temperature=0.0)])
    assert rec.text("p") == alone.text("p")  # a neighbour asking for logprobs changes nothing
    assert all(o.logprobs is None for o in rec.outputs("p") if isinstance(o, TokenOutput))
    assert len(set(sched.tokens["g"])) > 2, "the tiny model must give varied tokens for this to bite"
    for rid in ("g", "s"):
        final = rec.final(rid)
        assert isinstance(final, FinalOutput)
        reasoning, content = _entries(rec, rid)
        entries = reasoning + content
        assert len(entries) == final.completion_tokens == len(sched.tokens[rid])
        in_top = 0
        for token_id, (token, logprob, raw, tops) in zip(sched.tokens[rid], entries, strict=True):
            assert (token, raw) == candidate(engine.table, token_id, logprob)[::2]
            values = [v for _, v, _ in tops]
            assert len(tops) == k and values == sorted(values, reverse=True)
            if logprob >= values[-1]:  # in the top k of its own distribution: listed
                assert (token, logprob, raw) in tops
                in_top += 1
            if rid == "g":
                assert logprob == pytest.approx(values[0])  # greedy: the row maximum
        assert in_top > 0
        think_end = engine.table.think_end_id
        assert think_end in sched.tokens[rid][:9]  # closed by the budget at the latest
        assert len(reasoning) == sched.tokens[rid].index(think_end) + 1  # </think> ends the reasoning
        assert content and len(content) == len(sched.tokens[rid]) - len(reasoning)


def test_the_model_log_keeps_logprobs_through_compaction() -> None:
    from services.model.engine.base import TokenLogprobs
    from services.model.generations import Generation

    entry: LogprobEntry = ("a", -0.5, b"a", (("a", -0.5, b"a"), ("b", -1.5, b"b")))
    eos: LogprobEntry = ("<|im_end|>", -0.1, None, ())
    gen = Generation("r", 3, 0.0)
    assert not gen.append_delta(TokenOutput("", "", 1))  # no text, no logprobs: folded into the next
    gen.append_delta(TokenOutput("a", "", 1, TokenLogprobs([entry], [])))
    gen.append_delta(TokenOutput("", "", 1, TokenLogprobs([], [eos])))  # logprobs alone make a delta
    gen.append_finished(FinalOutput("stop", 3, 3), 0.0)
    before = gen.events
    assert [e.model_dump() for e in before][1]["logprobs"]["content"][0] == {
        "token": "<|im_end|>",
        "logprob": -0.1,
        "bytes": None,
        "top_logprobs": [],
    }
    gen.compact()
    assert gen.events == before and gen.events_from(1) == before[1:]


@pytest.mark.integration
def test_logprobs_of_a_forced_think_end_and_of_a_grammar_masked_answer(engine: Any) -> None:
    """The server's own </think> (budget spent) has probability 1 in the distribution it was taken from;
    an answer under a grammar reports the masked distribution: the chosen token is its maximum (greedy),
    only allowed tokens have a probability, and the alternatives listed are allowed ones."""
    import json

    from services.protocol.generate import ResponseFormat

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    fmt = ResponseFormat(type="json_schema", json_schema=schema)
    constrained = request(
        "j", "answer in JSON", max_tokens=40, temperature=0.0, top_logprobs=3, max_reasoning_tokens=2
    ).model_copy(update={"response_format": fmt})
    rec, sched = _run(engine, [constrained])
    final = rec.final("j")
    assert isinstance(final, FinalOutput) and final.finish_reason == "stop", final
    reasoning, content = _entries(rec, "j")
    assert len(reasoning) == 3 and sched.tokens["j"][2] == engine.table.think_end_id
    forced_token, forced_logprob, _, _ = reasoning[2]
    assert forced_token == "</think>" and forced_logprob == pytest.approx(0.0)
    assert json.loads(rec.text("j")[1]) in ({"ok": True}, {"ok": False})
    for token, logprob, _, tops in content:
        values = [v for _, v, _ in tops]
        assert logprob == pytest.approx(values[0])  # greedy among the allowed tokens
        assert math.fsum(math.exp(v) for v in values) <= 1.0 + 1e-6
        assert (token, logprob) == (tops[0][0], tops[0][1])
        if logprob == pytest.approx(0.0):  # one allowed token: the others listed are masked (the floor)
            assert all(v == FLOOR for v in values[1:]), tops
    # where the grammar allows one token only (the fixed key), it has probability 1
    assert any(logprob == pytest.approx(0.0) for _, logprob, _, _ in content)
