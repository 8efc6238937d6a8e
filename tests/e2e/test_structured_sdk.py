"""Tool calls and structured outputs through the whole stack on the tiny checkpoint (model service with the
HF engine, api under gunicorn), driven by the official ``openai`` SDK: ``chat.completions.parse`` with a
Pydantic model, tools with ``tool_choice`` auto / required / named, a two-turn round trip, stream and not;
streamed fragments reassemble to the non-stream result; resume from every index replays the same chunks;
concurrency 16 with half the rows constrained."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.api.sse import SseEvent, check_stream, finish_reason, read_sse
from tests.helpers.stack import Service, start_api, start_model

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

KEY = "e2e-structured-0123456789"
BUDGET = {"max_reasoning_tokens": 2}  # the random model never closes its reasoning by itself
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 5},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "days", "metric"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


class Size(BaseModel):
    big: bool


class Thing(BaseModel):
    color: Literal["red", "green", "blue"]
    ok: bool
    count: int = Field(ge=0, le=9)
    size: Size


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Service]:
    logs = tmp_path_factory.mktemp("e2e-structured")
    env = {"MAX_BATCH_SIZE": "16", "MAX_TOKENS": "96", "INTERNAL_TOKEN": "internal-e2e-token"}
    model = start_model(logs, model_dir=tiny_model_dir, env=env)
    try:
        svc = start_api(
            logs, model_urls=[model.url], env={"API_KEYS": KEY, "INTERNAL_TOKEN": "internal-e2e-token"}
        )
        yield svc
        svc.proc.stop()
    finally:
        model.proc.stop()


@pytest.fixture
def sdk(api: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def http(api: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_parse_with_a_pydantic_model(sdk: openai.OpenAI) -> None:
    for i in range(3):
        out = sdk.chat.completions.parse(
            model="any",
            messages=ask(f"describe thing {i}"),
            response_format=Thing,
            max_tokens=80,
            extra_body=BUDGET,
        )
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, Thing)
        assert choice.message.reasoning_content is not None  # type: ignore[attr-defined]


def test_json_schema_streamed_validates(sdk: openai.OpenAI) -> None:
    fmt: Any = {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": Thing.model_json_schema(), "strict": True},
    }
    stream = sdk.chat.completions.create(
        model="any",
        messages=ask("stream a thing"),
        response_format=fmt,
        stream=True,
        max_tokens=80,
        extra_body=BUDGET,
    )
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    Thing.model_validate_json(content)


def fold_stream(chunks: Any) -> tuple[str, list[dict[str, Any]], str | None]:
    """(content, calls, finish_reason) reassembled from streamed chunks, the way clients do."""
    content, calls, reason = [], {}, None  # type: ignore[var-annotated]
    for chunk in chunks:
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            for frag in choice.delta.tool_calls or ():
                call = calls.setdefault(
                    frag.index, {"id": None, "type": None, "function": {"name": "", "arguments": ""}}
                )
                call["id"] = frag.id or call["id"]
                call["type"] = frag.type or call["type"]
                if frag.function is not None:
                    call["function"]["name"] += frag.function.name or ""
                    call["function"]["arguments"] += frag.function.arguments or ""
            reason = choice.finish_reason or reason
    return "".join(content), [calls[i] for i in sorted(calls)], reason


def call_dicts(message: Any) -> list[dict[str, Any]]:
    return [c.model_dump(include={"id", "type", "function"}) for c in message.tool_calls or ()]


@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_tool_calls_stream_and_non_stream_agree(sdk: openai.OpenAI, choice: str) -> None:
    tool_choice: Any = NAMED if choice == "named" else "required"
    kw: Any = {
        "model": "any",
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "max_tokens": 80,
        "temperature": 0,
        "extra_body": BUDGET,
    }
    whole = sdk.chat.completions.create(messages=ask(f"weather {choice}"), **kw)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    calls = call_dicts(message)
    assert len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    args = json.loads(calls[0]["function"]["arguments"])
    if choice == "named":
        assert calls[0]["function"]["name"] == "get_weather"
        jsonschema.validate(args, WEATHER)
    content, streamed, reason = fold_stream(
        sdk.chat.completions.create(messages=ask(f"weather {choice}"), stream=True, **kw)
    )
    assert reason == "tool_calls"
    assert [c["function"] for c in streamed] == [c["function"] for c in calls]
    assert (content.strip() or None) == message.content


def test_auto_tool_choice_answers(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(
        model="any",
        messages=ask("anything"),
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=24,
        extra_body=BUDGET,
    )
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    if out.choices[0].finish_reason == "tool_calls":
        assert out.choices[0].message.tool_calls


@pytest.mark.parametrize("stream", [False, True])
def test_a_two_turn_tool_round_trip(sdk: openai.OpenAI, stream: bool) -> None:
    messages: list[Any] = ask("What is the weather in Paris?")
    first = sdk.chat.completions.create(
        model="any", messages=messages, tools=TOOLS, tool_choice=NAMED, max_tokens=80, extra_body=BUDGET
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    messages.append(first.choices[0].message.model_dump(include={"role", "content", "tool_calls"}))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny"})})
    kw: Any = {"model": "any", "messages": messages, "tools": TOOLS, "max_tokens": 16, "extra_body": BUDGET}
    if stream:
        _, _, reason = fold_stream(sdk.chat.completions.create(stream=True, **kw))
        assert reason in ("stop", "length", "tool_calls")
    else:
        second = sdk.chat.completions.create(**kw)
        assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert second.usage is not None and second.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


def test_resume_from_every_index_replays_the_tool_call_chunks(http: httpx.Client) -> None:
    sid = f"tools-{uuid.uuid4().hex[:10]}"
    body = {
        "messages": ask("weather"),
        "tools": TOOLS,
        "tool_choice": NAMED,
        "stream": True,
        "session_id": sid,
        "max_tokens": 80,
        **BUDGET,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = read_sse(r)
    check_stream(events, sid)
    assert finish_reason(events) == "tool_calls"
    assert any('"tool_calls"' in e.data for e in events)
    for i, event in enumerate(events[:-1]):
        with http.stream("GET", f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": str(event.id)}) as r:
            rest: list[SseEvent] = read_sse(r)
        assert [(e.id, e.data) for e in rest] == [(e.id, e.data) for e in events[i + 1 :]], i


def test_half_constrained_at_concurrency_16(sdk: openai.OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}

    def one(i: int) -> tuple[int, Any]:
        extra = {"response_format": fmt} if i % 2 else {}
        out = sdk.chat.completions.create(
            model="any", messages=ask(f"item {i}"), max_tokens=60, temperature=0, extra_body=BUDGET, **extra
        )
        return i, out

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for i, out in results:
        if i % 2:
            jsonschema.validate(json.loads(out.choices[0].message.content), WEATHER)
    alone = sdk.chat.completions.create(
        model="any", messages=ask("item 0"), max_tokens=60, temperature=0, extra_body=BUDGET
    )
    assert alone.choices[0].message.content == results[0][1].choices[0].message.content


def test_a_schema_the_compiler_rejects_is_a_400_naming_it(http: httpx.Client) -> None:
    unresolved = {"type": "object", "properties": {"a": {"$ref": "#/x"}}}  # valid by the meta-schema
    for schema in ({"type": "bogus"}, unresolved):
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        r = http.post("/v1/chat/completions", json={"messages": ask("x"), "response_format": bad})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "response_format"
    tools = [
        TOOLS[0],
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}},
        },
    ]
    r = http.post(
        "/v1/chat/completions", json={"messages": ask("x"), "tools": tools, "tool_choice": "required"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[1].function.parameters", r.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_no_output_satisfies_is_the_clients_error(http: httpx.Client, stream: bool) -> None:
    # It compiles, so only the generation finds out (no token can follow `"`): a 400 naming the parameter,
    # in the non-streamed answer and as the stream's error event, not a 500 of ours.
    nothing = {"name": "x", "schema": {"type": "string", "pattern": "[^\\s\\S]"}}
    body = {
        "messages": ask("x"),
        "max_reasoning_tokens": 0,
        "response_format": {"type": "json_schema", "json_schema": nothing},
        "stream": stream,
    }
    before = generation_errors(http)
    if not stream:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
    else:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = read_sse(r)
        assert events[-1].data == "[DONE]"
        error = events[-2].json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "response_format",
        "invalid_schema",
    )
    assert error["message"].startswith("response_format: the output reached a part of this JSON schema")
    assert generation_errors(http) == before  # the client's schema: no alert on the model service


def generation_errors(http: httpx.Client) -> float:
    page = http.get("/metrics").text
    found = re.search(r'^api_model_errors_total\{reason="generation_error"\} (\S+)$', page, re.M)
    return float(found.group(1)) if found else 0.0
