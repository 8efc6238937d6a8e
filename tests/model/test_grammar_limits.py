"""Bounded grammar compiles: costly schemas refused before compiling, a compile deadline, the compile before
any media work, and the forced-tool path's errors as 400s naming the parameter."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from services.model.engine import schema_limits
from services.model.engine.grammar import COMPILE_THREADS, Grammars
from services.model.engine.schema_limits import check_schema
from services.protocol.errors import InvalidSchema, Overloaded
from services.protocol.generate import FunctionDef, ResponseFormat, Tool, ToolChoice
from tests.model.engine_support import request, tiny_engine

# the reviewer's schema: 408 characters, 5-6 s of compiling on xgrammar 0.2.9
SLOW = {
    "type": "object",
    "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,4000}"} for i in range(6)},
}


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        (SLOW, "repeats 4000 times"),
        ({"type": "string", "pattern": "a{5000}"}, "repeats 5000 times"),
        ({"type": "string", "pattern": "(ab){2,999}"}, "repeats 999 times"),
        ({"patternProperties": {"^x{1,300}$": {}}}, "repeats 300 times"),
        ({"type": "string", "pattern": "a" * 513}, "over 512 characters"),
        (
            {"properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,100}"} for i in range(6)}},
            "add up to 600",
        ),
        ({"enum": list(range(5000))}, "over 4096 nodes"),
        ({"description": "x" * 70_000}, "over 65536 characters"),
    ],
)
def test_costly_schemas_are_refused_before_compiling(schema: Any, says: str) -> None:
    with pytest.raises(InvalidSchema) as info:
        check_schema(schema, "tools[2].function.parameters")
    assert info.value.param == "tools[2].function.parameters" and says in info.value.message


def test_ordinary_schemas_pass() -> None:
    check_schema({"type": "string", "pattern": r"^\d{3}-\d{4}$", "maxLength": 100_000}, "response_format")
    check_schema({"type": "string", "pattern": r"\{1000\}"}, "response_format")  # escaped braces: literal
    check_schema({"properties": {f"p{i}": {"type": "integer"} for i in range(500)}}, "response_format")
    assert schema_limits.MAX_PATTERN_REPEAT * 4 == schema_limits.MAX_TOTAL_REPEAT


def _blocker(started: threading.Event, release: threading.Event) -> Any:
    def compile_() -> str:
        started.set()
        release.wait(30)
        return "compiled"

    return compile_


def test_a_compile_past_its_deadline_is_refused_and_remembered_and_busy_threads_answer_429() -> None:
    grammars = Grammars(None, 0, [], compile_seconds=1.0)
    release = threading.Event()
    firsts = [threading.Event() for _ in range(COMPILE_THREADS)]
    outcomes: list[BaseException] = []

    def slow(k: int) -> None:
        try:
            grammars._bounded(f"key{k}", "response_format", _blocker(firsts[k], release))
        except BaseException as exc:  # recorded for the assertions
            outcomes.append(exc)

    threads = [threading.Thread(target=slow, args=(k,)) for k in range(COMPILE_THREADS)]
    try:
        for t in threads:
            t.start()
        for started in firsts:
            assert started.wait(10)  # every compile thread is busy now
        began = time.monotonic()
        with pytest.raises(Overloaded):  # could not even start before its deadline
            grammars._bounded("other", "response_format", lambda: "fast")
        assert time.monotonic() - began >= 1.0
        for t in threads:
            t.join(10)
        assert all(isinstance(e, InvalidSchema) and "too complex" in e.message for e in outcomes), outcomes
        assert {e.param for e in outcomes if isinstance(e, InvalidSchema)} == {"response_format"}
    finally:
        release.set()
    began = time.monotonic()
    with pytest.raises(InvalidSchema, match="too complex"):  # remembered: refused at once
        grammars._bounded("key0", "response_format", lambda: "fast")
    assert time.monotonic() - began < 0.5
    assert grammars._bounded("other", "response_format", lambda: "fast") == "fast"
    grammars.close()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    return tiny_engine(tiny_model_dir)


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("media work ran before the grammar was checked")


@pytest.mark.integration
def test_the_reviewers_schema_is_refused_at_once_before_any_media_work(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.model.multimodal.prompt.decode_image", _never)
    fmt = ResponseFormat(type="json_schema", json_schema=SLOW)
    began = time.monotonic()
    with pytest.raises(InvalidSchema) as info:
        engine.prepare_sync(request("slow", "x", image=1).model_copy(update={"response_format": fmt}))
    assert info.value.param == "response_format" and time.monotonic() - began < 1.0
    bogus = ResponseFormat(type="json_schema", json_schema={"type": "bogus"})
    with pytest.raises(InvalidSchema):  # a schema the compiler rejects: also before the image is decoded
        engine.prepare_sync(request("bogus", "x", image=1).model_copy(update={"response_format": bogus}))


@pytest.mark.integration
def test_a_failing_forced_tool_compile_is_a_400_naming_the_tool(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiler = engine.grammars.compiler()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("[12:00:00] /project/cpp/grammar.cc:1: something inside")

    monkeypatch.setattr(compiler, "compile_grammar", broken)
    tool = Tool(function=FunctionDef(name="get_time", parameters={"type": "object", "properties": {}}))
    fields = {"tools": [tool], "tool_choice": ToolChoice(mode="function", name="get_time")}
    with pytest.raises(InvalidSchema) as info:
        engine.prepare_sync(request("tool", "x").model_copy(update=fields))
    assert info.value.param == "tools[0].function.parameters"
    assert "/project" not in info.value.message
    slow_tool = Tool(function=FunctionDef(name="slow", parameters=SLOW))
    fields = {"tools": [tool, slow_tool], "tool_choice": ToolChoice(mode="required")}
    with pytest.raises(InvalidSchema) as info:
        engine.prepare_sync(request("tool2", "x").model_copy(update=fields))
    assert info.value.param == "tools[1].function.parameters"


def test_the_compilers_assertion_text_stays_out_of_the_message(tiny_model_dir: Path) -> None:
    # A hostile-input hunt: "Check failed: (val <= MAX_INT64_AS_DOUBLE) is false: ..." reached the client.
    engine = tiny_engine(tiny_model_dir)
    schema = {"type": "integer", "minimum": 1e30, "maximum": 1e30 + 1}
    req = request("huge", "x").model_copy(
        update={"response_format": ResponseFormat(type="json_schema", json_schema=schema)}
    )
    with pytest.raises(InvalidSchema) as info:
        engine.grammars.matchers(req)
    message = info.value.message
    assert message.startswith("response_format: the JSON schema cannot be used: "), message
    assert "Check failed" not in message and "MAX_INT64" not in message and ".cc:" not in message
