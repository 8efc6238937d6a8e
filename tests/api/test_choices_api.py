"""n > 1 through the api service (a real process) and the model service with the deterministic fake engine:
n choices indexed 0..n-1, seeded and reproducible, streaming chunks (each validated) that reassemble to the
non-stream result, a role chunk and a finish chunk per choice, one usage chunk counting every choice, resume
from every index, session status, cancel of every choice, tool calls and logprobs per choice, and the 400s
(above MAX_N, above the model service's batch size) naming ``n``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.openai_shapes import check_chunk, check_completion
from tests.api.sse import SseEvent, check_stream, iter_sse, read_sse
from tests.helpers.stack import Service, keyed_client, keyed_fake_stack

pytestmark = pytest.mark.integration

KEY = "key-choices-0123456789"
TOKENS = 9  # [[fake:tokens=9]]: 9 text tokens, then the end of sequence (10 completion tokens a choice)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with keyed_fake_stack(
        tmp_path_factory.mktemp("api-choices"), KEY, {"FAKE_STEP_SECONDS": "0.002", "MAX_BATCH_SIZE": "6"}
    ) as svc:
        yield svc


@pytest.fixture
def client(api: Service) -> Iterator[httpx.Client]:
    with keyed_client(api, KEY) as c:
        yield c


def chat(text: str = f"describe the cat [[fake:tokens={TOKENS}]]", **extra: Any) -> dict[str, Any]:
    return {"model": "x", "messages": [{"role": "user", "content": text}], "seed": 5, "n": 3, **extra}


def stream(client: httpx.Client, body: dict[str, Any]) -> tuple[str, list[SseEvent]]:
    sid = f"ch-{uuid.uuid4().hex[:8]}"
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "session_id": sid}) as r:
        assert r.status_code == 200, r.read()
        events = read_sse(r)
    check_stream(events, sid)
    return sid, events


def reassemble(
    events: list[SseEvent], include_usage: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per choice (by index): role, reasoning, content, tool calls, logprobs and finish reason, checking
    that each choice's first chunk is its role and that it has exactly one finish chunk; plus the usage
    chunks."""
    choices: dict[int, dict[str, Any]] = {}
    usages = []
    for event in events[:-1]:
        chunk = event.json()
        check_chunk(chunk, include_usage=include_usage)
        if not chunk["choices"]:
            usages.append(chunk["usage"])
            continue
        (choice,) = chunk["choices"]
        c = choices.get(choice["index"])
        if c is None:
            assert choice["delta"] == {"role": "assistant"}, choice  # a choice starts with its role
            c = choices[choice["index"]] = {"reasoning": "", "content": "", "calls": [], "finish": None}
            c["logprobs"] = {"content": [], "reasoning_content": []}
        assert c["finish"] is None, "a chunk after the choice's finish chunk"
        delta = choice["delta"]
        c["reasoning"] += delta.get("reasoning_content") or ""
        c["content"] += delta.get("content") or ""
        c["calls"] += [f["id"] for f in delta.get("tool_calls") or () if f.get("id")]
        for key in ("content", "reasoning_content"):
            c["logprobs"][key] += (choice.get("logprobs") or {}).get(key) or []
        c["finish"] = choice["finish_reason"]
    return [choices[i] for i in sorted(choices)], usages


def test_n_choices_stream_equals_non_stream_and_is_reproducible(client: httpx.Client) -> None:
    body = chat(stream_options={"include_usage": True})
    whole = client.post("/v1/chat/completions", json={k: v for k, v in body.items() if k != "stream_options"})
    assert whole.status_code == 200, whole.text
    completion = whole.json()
    check_completion(completion)
    assert [c["index"] for c in completion["choices"]] == [0, 1, 2]
    messages = [c["message"] for c in completion["choices"]]
    assert len({(m["reasoning_content"], m["content"]) for m in messages}) == 3  # the choices differ
    assert all(c["finish_reason"] == "stop" for c in completion["choices"])
    assert completion["usage"]["completion_tokens"] == 3 * (TOKENS + 1)
    again = client.post("/v1/chat/completions", json={**body, "stream_options": None}).json()
    assert [c["message"] for c in again["choices"]] == messages  # seeded: reproducible
    single = client.post("/v1/chat/completions", json={**body, "n": 1, "stream_options": None}).json()
    assert single["choices"][0]["message"] == messages[0]  # choice 0 keeps the request's seed
    sid, events = stream(client, body)
    choices, usages = reassemble(events)
    assert [(c["reasoning"], c["content"]) for c in choices] == [
        (m["reasoning_content"] or "", m["content"]) for m in messages
    ]
    assert [c["finish"] for c in choices] == ["stop"] * 3
    assert usages == [completion["usage"]]  # one usage chunk, every choice counted
    status = client.get(f"/v1/sessions/{sid}").json()
    assert status["status"] == "completed" and status["finish_reason"] == "stop"
    assert status["usage"]["completion_tokens"] == 3 * (TOKENS + 1)
    for i, event in enumerate(events[:-1]):  # a resume from every index replays every choice's chunks
        with client.stream(
            "GET", f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": str(event.id)}
        ) as r:
            assert [(e.id, e.data) for e in read_sse(r)] == [(e.id, e.data) for e in events[i + 1 :]]


def test_cancel_stops_every_choice(client: httpx.Client) -> None:
    sid = f"ch-{uuid.uuid4().hex[:8]}"
    body = {**chat("go on [[fake:tokens=3000]]"), "stream": True, "session_id": sid}
    events: list[SseEvent] = []
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for event in iter_sse(r):
            if event is None:
                continue
            events.append(event)
            if len(events) == 8:  # every choice has started
                assert client.post(f"/v1/cancel/{sid}").json()["status"] == "cancelled"
    check_stream(events, sid)
    choices, _ = reassemble(events, include_usage=False)
    assert [c["finish"] for c in choices] == ["cancelled"] * 3
    status = client.get(f"/v1/sessions/{sid}").json()
    assert status["status"] == "cancelled" and status["finish_reason"] == "cancelled"


def test_tool_calls_and_logprobs_per_choice(client: httpx.Client) -> None:
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    body = chat("what time is it [[fake:tool_call]]", n=2, tools=tools, logprobs=True)
    whole = client.post("/v1/chat/completions", json=body).json()
    check_completion(whole)
    ids = []
    for choice in whole["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_time"]
        ids += [c["id"] for c in choice["message"]["tool_calls"]]
        assert choice["logprobs"]["content"] or choice["logprobs"]["reasoning_content"]
    assert len(set(ids)) == 2  # call ids are unique across choices
    counted = sum(
        len(c["logprobs"]["content"]) + len(c["logprobs"]["reasoning_content"]) for c in whole["choices"]
    )
    assert counted == whole["usage"]["completion_tokens"]  # one entry per token of every choice
    _, events = stream(client, {**body, "stream_options": {"include_usage": True}})
    choices, _ = reassemble(events)
    assert [len(c["calls"]) for c in choices] == [1, 1]  # ids derive from the session's chunk id
    assert len({i for c in choices for i in c["calls"]}) == 2
    assert [c["finish"] for c in choices] == ["tool_calls"] * 2
    for streamed, choice in zip(choices, whole["choices"], strict=True):
        lp = choice["logprobs"]
        assert streamed["logprobs"] == {
            "content": lp["content"],
            "reasoning_content": lp["reasoning_content"],
        }


@pytest.mark.parametrize("n", [9, 7])  # over MAX_N (8); over the model service's MAX_BATCH_SIZE (6)
def test_too_many_choices_are_400_naming_n(client: httpx.Client, n: int) -> None:
    r = client.post("/v1/chat/completions", json=chat(n=n))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "n", err
    assert "Traceback" not in json.dumps(err)
