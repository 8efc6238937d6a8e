"""Tools, tool choice and response formats through the api service (a real process) and the model service with
the deterministic fake engine: every bad shape is a 400 naming its parameter; forced and voluntary calls come
back as ``tool_calls`` (stream and not, the same), JSON answers validate, the reasoning budget holds."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from tests.api.openai_shapes import check_completion
from tests.api.sse import check_stream, finish_reason, read_sse, text_of
from tests.helpers.stack import Service, keyed_client, keyed_fake_stack

pytestmark = pytest.mark.integration

KEY = "key-structured-0123456789"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 3},
    },
    "required": ["city", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with keyed_fake_stack(
        tmp_path_factory.mktemp("api-structured"),
        KEY,
        {"FAKE_STEP_SECONDS": "0.002", "FAKE_CONTEXT_TOKENS": "4096"},
    ) as svc:
        yield svc


@pytest.fixture
def client(api: Service) -> Iterator[httpx.Client]:
    with keyed_client(api, KEY) as c:
        yield c


def chat(text: str = "weather in Paris", **extra: Any) -> dict[str, Any]:
    return {"model": "x", "messages": [{"role": "user", "content": text}], **extra}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": "x" * 70000}}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [*TOOLS, TOOLS[0]]}, "tools[2].function.name"),
        ({"tools": [TOOLS[0]] * 129}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": {"type": "bogus"}},
                }
            },
            "response_format",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"type": "bogus"}}},
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (  # compiling it took 6 s on xgrammar 0.2.9: refused before the compiler sees it
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "s",
                        "schema": {
                            "type": "object",
                            "properties": {
                                f"p{i}": {"type": "string", "pattern": "[a-z]{1,4000}"} for i in range(6)
                            },
                        },
                    },
                }
            },
            "response_format",
        ),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"max_reasoning_tokens": -1}, "max_reasoning_tokens"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_bad_tool_and_format_fields_are_400_naming_them(
    client: httpx.Client, extra: dict, param: str
) -> None:
    r = client.post("/v1/chat/completions", json=chat(**extra))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "tool", "content": "x"}], "messages[0]"),
        (
            [
                {"role": "user", "content": "x", "tool_calls": []},
                {
                    "role": "user",
                    "content": "y",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
            ],
            "messages[1]",
        ),
        (
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}],
                }
            ],
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": 'f", "x": "', "arguments": "{}"}}
                    ],
                }
            ],
            "messages[0].tool_calls[0].function.name",
        ),
    ],
)
def test_bad_tool_history_is_400(client: httpx.Client, messages: list, param: str) -> None:
    r = client.post("/v1/chat/completions", json={"model": "x", "messages": messages})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_named_call_non_stream_and_stream_agree(client: httpx.Client) -> None:
    body = chat(tools=TOOLS, tool_choice=NAMED, seed=3)
    whole = client.post("/v1/chat/completions", json=body).json()
    check_completion(whole)
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    sid = f"t-{uuid.uuid4().hex[:8]}"
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "session_id": sid}) as r:
        events = read_sse(r)
    check_stream(events, sid)
    assert finish_reason(events) == "tool_calls"
    fragments = [
        d for e in events[:-1] for c in e.json().get("choices", []) for d in c["delta"].get("tool_calls", [])
    ]
    assert fragments[0] == {
        "index": 0,
        "id": fragments[0]["id"],
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert "".join(f["function"].get("arguments", "") for f in fragments) == call["function"]["arguments"]
    for i, event in enumerate(events[:-1]):  # resume from every index replays the same chunks
        with client.stream(
            "GET", f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": str(event.id)}
        ) as r:
            assert [(e.id, e.data) for e in read_sse(r)] == [(e.id, e.data) for e in events[i + 1 :]]


def test_auto_calls_when_the_model_writes_a_block_and_answers_otherwise(client: httpx.Client) -> None:
    called = client.post("/v1/chat/completions", json=chat("go [[fake:tool_call]]", tools=TOOLS)).json()
    assert called["choices"][0]["finish_reason"] == "tool_calls"
    assert called["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    plain = client.post("/v1/chat/completions", json=chat("hello", tools=TOOLS)).json()
    assert (
        plain["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in plain["choices"][0]["message"]
    )
    none = client.post(
        "/v1/chat/completions", json=chat("go [[fake:tool_call]]", tools=TOOLS, tool_choice="none")
    ).json()
    assert none["choices"][0]["finish_reason"] == "stop"


def test_json_schema_and_reasoning_budget(client: httpx.Client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}}
    out = client.post("/v1/chat/completions", json=chat(response_format=fmt, max_reasoning_tokens=2)).json()
    message = out["choices"][0]["message"]
    jsonschema.validate(json.loads(message["content"]), WEATHER)
    assert len(message["reasoning_content"].split()) == 2
    minimal = client.post(
        "/v1/chat/completions", json=chat(reasoning_effort="minimal", response_format={"type": "json_object"})
    ).json()
    assert minimal["choices"][0]["message"]["reasoning_content"] is None
    assert isinstance(json.loads(minimal["choices"][0]["message"]["content"]), dict)
    with client.stream("POST", "/v1/chat/completions", json=chat(response_format=fmt, stream=True)) as r:
        jsonschema.validate(json.loads(text_of(read_sse(r))[1]), WEATHER)


def test_a_two_turn_round_trip(client: httpx.Client) -> None:
    first = client.post("/v1/chat/completions", json=chat(tools=TOOLS, tool_choice="required")).json()
    message = first["choices"][0]["message"]
    call = message["tool_calls"][0]
    messages = [
        {"role": "user", "content": "weather in Paris"},
        {"role": "assistant", "content": None, "tool_calls": message["tool_calls"]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "clear"}'},
    ]
    second = client.post(
        "/v1/chat/completions", json={"model": "x", "messages": messages, "tools": TOOLS}
    ).json()
    check_completion(second)
    assert second["choices"][0]["finish_reason"] == "stop"
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]
