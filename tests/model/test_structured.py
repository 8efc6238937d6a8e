"""Grammar-constrained answers and reasoning budgets on the tiny random checkpoint (real scheduler, real
xgrammar): schema-valid JSON for enum/boolean/bounded-integer schemas, a forced call of a named tool, the
budget closing the reasoning, unconstrained neighbours' greedy tokens unchanged, refused schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from services.model.engine.grammar import apply_bitmask
from services.protocol.errors import InvalidSchema
from services.protocol.generate import FunctionDef, ResponseFormat, Tool, ToolChoice
from tests.model.engine_support import Recorder, drain, prepare, request, scheduler_for, tiny_engine

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "size": {"type": "object", "properties": {"big": {"type": "boolean"}}, "required": ["big"]},
    },
    "required": ["color", "ok", "count", "size"],
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 3},
    },
    "required": ["city", "days"],
}
TOOLS = [
    Tool(function=FunctionDef(name="get_weather", parameters=WEATHER)),
    Tool(function=FunctionDef(name="get_time", parameters={"type": "object", "properties": {}})),
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    return tiny_engine(tiny_model_dir)


def structured(rid: str, text: str, budget: int = 3, **fields: Any) -> Any:
    req = request(rid, text, max_tokens=120, temperature=0.0, max_reasoning_tokens=budget)
    return req.model_copy(update=fields)


def run(engine: Any, reqs: list[Any], **config: Any) -> tuple[Recorder, Any]:
    sched = scheduler_for(engine, **config)
    rec = Recorder()
    sched.bind(rec)
    for req in reqs:
        sched.submit(prepare(engine, req))
    drain(sched)
    return rec, sched


def test_json_schema_answers_validate_and_neighbours_are_unchanged(engine: Any) -> None:
    fmt = ResponseFormat(type="json_schema", json_schema=SCHEMA)
    free = [request(f"free{i}", f"tell me about item {i}", max_tokens=40, temperature=0.0) for i in range(8)]
    constrained = [structured(f"json{i}", f"describe thing {i}", response_format=fmt) for i in range(8)]
    alone, _ = run(engine, free)
    mixed, sched = run(engine, [x for pair in zip(free, constrained, strict=True) for x in pair])
    for req in constrained:
        final = mixed.final(req.request_id)
        assert final is not None and final.finish_reason == "stop", final
        _, content = mixed.text(req.request_id)
        jsonschema.validate(json.loads(content), SCHEMA)
        assert sched.tokens[req.request_id][3] == engine.table.think_end_id  # budget 3: closed by the server
    for req in free:
        assert mixed.text(req.request_id) == alone.text(req.request_id)
    assert len({mixed.text(r.request_id)[1] for r in constrained}) > 1, "the answers depend on the prompt"


def test_a_named_tool_choice_forces_a_valid_call(engine: Any) -> None:
    reqs = [
        structured(
            f"call{i}",
            f"weather please {i}",
            tools=TOOLS,
            tool_choice=ToolChoice(mode="function", name="get_weather"),
        )
        for i in range(4)
    ] + [structured("req", "anything", tools=TOOLS, tool_choice=ToolChoice(mode="required"))]
    rec, _ = run(engine, reqs)
    for req in reqs:
        content = rec.text(req.request_id)[1]
        assert content.startswith("<tool_call>\n") and content.endswith("\n</tool_call>"), content
        call = json.loads(content[len("<tool_call>\n") : -len("\n</tool_call>")])
        if req.tool_choice.mode == "function":
            assert call["name"] == "get_weather"
            jsonschema.validate(call["arguments"], WEATHER)
        else:
            assert call["name"] in ("get_weather", "get_time")


def test_budget_zero_answers_at_once_and_max_tokens_cuts_the_json(engine: Any) -> None:
    fmt = ResponseFormat(type="json_schema", json_schema=SCHEMA)
    cut = structured("cut", "x", budget=0, response_format=fmt).model_copy()
    cut.sampling.max_tokens = 4
    rec, sched = run(engine, [cut, structured("zero", "y", budget=0, response_format=fmt)])
    assert sched.tokens["zero"][0] == engine.table.think_end_id
    assert rec.text("zero")[0] == ""
    jsonschema.validate(json.loads(rec.text("zero")[1]), SCHEMA)
    assert rec.final("cut").finish_reason == "length"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"response_format": ResponseFormat(type="json_schema", json_schema={"type": "bogus"})},
            "response_format",
        ),
        (
            {
                "tools": [TOOLS[0], Tool(function=FunctionDef(name="bad", parameters={"$ref": "#/nowhere"}))],
                "tool_choice": ToolChoice(mode="required"),
            },
            "tools[1].function.parameters",
        ),
    ],
)
def test_a_schema_the_compiler_rejects_is_refused_naming_the_parameter(
    engine: Any, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidSchema) as info:
        prepare(engine, structured("bad", "x", **fields))
    assert info.value.param == param
    assert ".cc" not in info.value.message and "/project" not in info.value.message  # no compiler internals


def test_the_fast_mask_equals_xgrammars_own() -> None:
    import torch
    import xgrammar as xgr

    vocab = 151936
    for fill in ("sparse", "dense", "random"):
        mask = xgr.allocate_token_bitmask(1, vocab)
        if fill == "sparse":
            mask.zero_()
            mask[0, 3], mask[0, 4747] = 5, -1
        elif fill == "dense":
            mask[0, 3], mask[0, 100] = 5, 0
        else:
            mask.random_(-(2**31), 2**31 - 1)
        ours = torch.randn(vocab)
        theirs = ours.clone()[None]
        apply_bitmask(ours, mask.numpy()[0])
        xgr.apply_token_bitmask_inplace(theirs, mask, backend="cpu")
        assert torch.equal(ours, theirs[0]), fill


def test_the_batched_mask_equals_xgrammars_own() -> None:
    import torch
    import xgrammar as xgr

    vocab = 151936
    mask = xgr.allocate_token_bitmask(8, vocab)
    mask[1].zero_()
    mask[1, 3], mask[1, 4747] = 5, -1  # sparse
    mask[3, 3], mask[3, 100] = 5, 0  # dense
    mask[4].random_(-(2**31), 2**31 - 1)  # neither
    mask[6].zero_()
    mask[6, 0] = -(2**31)  # one token, the sign bit
    rows = [1, 3, 4, 6]
    ours = torch.randn(8, vocab)
    theirs = ours.clone()
    from services.model.engine.grammar import apply_bitmasks

    apply_bitmasks(ours, mask, rows)
    xgr.apply_token_bitmask_inplace(theirs, mask, indices=rows, backend="cpu")
    assert torch.equal(ours, theirs)


def test_picking_among_allowed_ids_equals_masking(engine: Any) -> None:
    fmt = ResponseFormat(type="json_schema", json_schema=SCHEMA)
    reqs = [structured(f"p{i}", f"pick {i}", response_format=fmt) for i in range(6)]
    reqs += [
        structured("t", "call", tools=TOOLS, tool_choice=ToolChoice(mode="function", name="get_weather"))
    ]
    _, picked = run(engine, reqs)
    _, masked = run(engine, reqs, pick_greedy=False)
    assert dict(picked.tokens) == dict(masked.tokens)
