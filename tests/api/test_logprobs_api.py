"""logprobs / top_logprobs through the api service (a real process) and the model service with the
deterministic fake engine: the OpenAI shape (checked against the openai package's types), reasoning tokens in
``logprobs.reasoning_content`` and answer tokens in ``logprobs.content``, one entry per generated token,
stream == non-stream, a resume from every index replays them identically, bad values are 400s naming them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.openai_shapes import check_completion
from tests.api.sse import SseEvent, check_stream, read_sse
from tests.helpers.stack import Service, keyed_client, keyed_fake_stack

pytestmark = pytest.mark.integration

KEY = "key-logprobs-0123456789"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with keyed_fake_stack(
        tmp_path_factory.mktemp("api-logprobs"), KEY, {"FAKE_STEP_SECONDS": "0.002"}
    ) as svc:
        yield svc


@pytest.fixture
def client(api: Service) -> Iterator[httpx.Client]:
    with keyed_client(api, KEY) as c:
        yield c


def chat(text: str = "describe the cat [[fake:tokens=9]]", **extra: Any) -> dict[str, Any]:
    return {"model": "x", "messages": [{"role": "user", "content": text}], "seed": 5, **extra}


def streamed_logprobs(events: list[SseEvent]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"content": [], "reasoning_content": []}
    for event in events:
        if event.data == "[DONE]":
            continue
        for choice in event.json()["choices"]:
            for key in out:
                out[key] += (choice.get("logprobs") or {}).get(key) or []
    return out


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
    ],
)
def test_bad_logprob_fields_are_400_naming_them(client: httpx.Client, extra: dict, param: str) -> None:
    r = client.post("/v1/chat/completions", json=chat(**extra))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_logprobs_non_stream_and_stream_agree_and_resume_replays_them(client: httpx.Client) -> None:
    body = chat(logprobs=True, top_logprobs=3)
    whole = client.post("/v1/chat/completions", json=body).json()
    check_completion(whole)
    logprobs = whole["choices"][0]["logprobs"]
    assert logprobs["refusal"] is None
    reasoning, content = logprobs["reasoning_content"], logprobs["content"]
    assert reasoning and content, logprobs
    assert len(reasoning) + len(content) == whole["usage"]["completion_tokens"]
    assert reasoning[-1]["token"] == "</think>"  # the token closing the thinking belongs to it
    message = whole["choices"][0]["message"]
    assert "".join(e["token"] for e in reasoning[:-1]) == message["reasoning_content"]
    for entry in reasoning + content:
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # the fake's token is its most likely
    sid = f"lp-{uuid.uuid4().hex[:8]}"
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "session_id": sid}) as r:
        events = read_sse(r)
    check_stream(events, sid)
    assert streamed_logprobs(events) == {"content": content, "reasoning_content": reasoning}
    for i, event in enumerate(events[:-1]):  # a resume from every index replays the same chunks
        with client.stream(
            "GET", f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": str(event.id)}
        ) as r:
            assert [(e.id, e.data) for e in read_sse(r)] == [(e.id, e.data) for e in events[i + 1 :]]


def test_logprobs_without_candidates_and_not_asked(client: httpx.Client) -> None:
    bare = client.post("/v1/chat/completions", json=chat(logprobs=True, max_tokens=6)).json()
    check_completion(bare)
    entries = bare["choices"][0]["logprobs"]["reasoning_content"] + bare["choices"][0]["logprobs"]["content"]
    assert entries and all(e["top_logprobs"] == [] for e in entries)
    plain = client.post("/v1/chat/completions", json=chat(max_tokens=6)).json()
    assert plain["choices"][0]["logprobs"] is None
    sid = f"lp-{uuid.uuid4().hex[:8]}"
    body = {**chat(), "stream": True, "session_id": sid}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = read_sse(r)
    assert all(c["logprobs"] is None for e in events[:-1] for c in e.json()["choices"])


def test_logprobs_with_a_tool_call_keep_one_entry_per_token(client: httpx.Client) -> None:
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    body = chat("what time is it [[fake:tool_call]]", logprobs=True, tools=tools)
    whole = client.post("/v1/chat/completions", json=body).json()
    check_completion(whole)
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    logprobs = whole["choices"][0]["logprobs"]
    count = len(logprobs["reasoning_content"]) + len(logprobs["content"])
    assert count == whole["usage"]["completion_tokens"]
    sid = f"lp-{uuid.uuid4().hex[:8]}"
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "session_id": sid}) as r:
        events = read_sse(r)
    check_stream(events, sid)
    assert streamed_logprobs(events) == {k: logprobs[k] for k in ("content", "reasoning_content")}
