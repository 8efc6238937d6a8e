"""Bodies and chunks checked against the official ``openai`` package's response types and the keys the
OpenAI API reference marks required (the SDK's models make some of them optional, e.g. ``message.refusal``).

``cancelled`` is this server's documented extra finish reason (the contract's); it is checked as ``stop``
against the SDK's literal, so everything else about such a chunk is still validated.
"""

from __future__ import annotations

import json
from typing import Any

from openai.types.chat import ChatCompletion, ChatCompletionChunk

# The reference's required keys (nullable ones included).
COMPLETION_KEYS = {"id", "object", "created", "model", "choices"}
COMPLETION_CHOICE_KEYS = {"index", "message", "finish_reason", "logprobs"}
MESSAGE_KEYS = {"role", "content", "refusal"}
CHUNK_KEYS = {"id", "object", "created", "model", "choices"}
CHUNK_CHOICE_KEYS = {"index", "delta", "finish_reason"}
ERROR_KEYS = {"message", "type", "param", "code"}
TOKEN_LOGPROB_KEYS = {"token", "logprob", "bytes", "top_logprobs"}
TOP_LOGPROB_KEYS = {"token", "logprob", "bytes"}


def _sdk_view(body: dict[str, Any]) -> dict[str, Any]:
    choices = [
        {**c, "finish_reason": "stop"} if c.get("finish_reason") == "cancelled" else c
        for c in body.get("choices") or []
    ]
    return {**body, "choices": choices}


def check_completion(body: dict[str, Any]) -> ChatCompletion:
    """A non-streaming ``chat.completion`` body; returns the SDK's parsed object."""
    assert body.keys() >= COMPLETION_KEYS, body
    assert body["object"] == "chat.completion"
    for choice in body["choices"]:
        assert choice.keys() >= COMPLETION_CHOICE_KEYS, choice
        assert choice["message"].keys() >= MESSAGE_KEYS, choice["message"]
        check_logprobs(choice["logprobs"])
    return ChatCompletion.model_validate(_sdk_view(body))


def check_logprobs(logprobs: dict[str, Any] | None) -> None:
    """A choice's ``logprobs``: null, or ``content`` (and this server's ``reasoning_content``) lists of
    token entries with the reference's required keys, each with its candidates most likely first."""
    if logprobs is None:
        return
    assert logprobs.keys() >= {"content", "refusal"}, logprobs
    for entry in [*(logprobs["content"] or ()), *(logprobs.get("reasoning_content") or ())]:
        assert entry.keys() >= TOKEN_LOGPROB_KEYS, entry
        assert isinstance(entry["logprob"], float) and entry["logprob"] <= 0.0
        assert entry["bytes"] is None or entry["bytes"] == list(bytes(entry["bytes"]))
        values = [top["logprob"] for top in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True), entry
        assert all(top.keys() >= TOP_LOGPROB_KEYS for top in entry["top_logprobs"])


def check_chunk(chunk: dict[str, Any], include_usage: bool | None = None) -> ChatCompletionChunk:
    """One ``chat.completion.chunk``. With ``include_usage`` known: every chunk but the usage one carries
    ``"usage": null`` (True) or no ``usage`` at all (False)."""
    assert chunk.keys() >= CHUNK_KEYS, chunk
    assert chunk["object"] == "chat.completion.chunk"
    for choice in chunk["choices"]:
        assert choice.keys() >= CHUNK_CHOICE_KEYS, choice
        check_logprobs(choice.get("logprobs"))
    if include_usage is True:
        assert "usage" in chunk and (chunk["usage"] is None) == bool(chunk["choices"]), chunk
    elif include_usage is False:
        assert chunk.get("usage") is None, chunk
    return ChatCompletionChunk.model_validate(_sdk_view(chunk))


def check_error(body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``; returns ``error``."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error.keys() >= ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    return error


def check_event_data(data: str) -> None:
    """One SSE ``data:`` payload of a chat stream: ``[DONE]``, an error, or a valid chunk."""
    if data == "[DONE]":
        return
    parsed = json.loads(data)
    if "error" in parsed:
        check_error(parsed)
    else:
        check_chunk(parsed)
