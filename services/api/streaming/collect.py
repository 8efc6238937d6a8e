"""Non-streaming responses: follow a session to its end and fold its chunks into one chat.completion."""

from __future__ import annotations

import json
from typing import Any

from services.api.errors import ApiError, ServiceUnavailable, from_payload
from services.api.streaming.hub import SessionHub
from services.api.streaming.replay import follow
from services.api.streaming.translate import DONE

# error codes the runner writes when the model service lost the generation: retrying may help
_RETRYABLE = frozenset({"generation_lost", "model_stream_broken"})


class _Folded:
    """A session's chunks folded: the head, usage or error, and each choice (by index) folded apart."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.choices: dict[int, _Choice] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            self.error = chunk["error"]
            return
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            self.choices.setdefault(int(choice.get("index", 0)), _Choice()).add(choice)

    def response_choices(self) -> list[dict[str, Any]]:
        """The ``chat.completion`` choices by index (each choice has its role chunk: none is missing)."""
        return [
            {
                "index": index,
                "message": folded.message(),
                "logprobs": folded.choice_logprobs(),
                "finish_reason": folded.finish_reason,
            }
            for index, folded in sorted(self.choices.items())
        ]


class _Choice:
    """One choice's chunks folded into its message, logprobs and finish reason."""

    def __init__(self) -> None:
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.logprobs: dict[str, list[dict[str, Any]]] | None = None  # once a chunk carried some

    def add(self, choice: dict[str, Any]) -> None:
        """Fold one chunk's object of this choice."""
        delta = choice.get("delta") or {}
        if delta.get("reasoning_content"):
            self.reasoning.append(delta["reasoning_content"])
        if delta.get("content"):
            self.content.append(delta["content"])
        for fragment in delta.get("tool_calls") or ():
            self._add_call(fragment)
        if choice.get("logprobs"):
            self._add_logprobs(choice["logprobs"])
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]

    def _add_logprobs(self, logprobs: dict[str, Any]) -> None:
        if self.logprobs is None:
            self.logprobs = {"content": [], "reasoning_content": []}
        for key in ("content", "reasoning_content"):
            self.logprobs[key].extend(logprobs.get(key) or ())

    def choice_logprobs(self) -> dict[str, Any] | None:
        """``{"content": [...], "reasoning_content": [...], "refusal": None}`` (answer tokens, reasoning
        tokens) when logprobs were asked for, else None."""
        if self.logprobs is None:
            return None
        return {**self.logprobs, "refusal": None}

    def _add_call(self, fragment: dict[str, Any]) -> None:
        """Fold one streamed tool-call fragment: the first of an index opens the call, later ones append
        to its arguments."""
        function = fragment.get("function") or {}
        if fragment.get("id"):
            call = {"id": fragment["id"], "type": "function", "function": {"name": function.get("name", "")}}
            self.tool_calls.append({**call, "_args": [function.get("arguments", "")]})
        elif self.tool_calls:
            self.tool_calls[-1]["_args"].append(function.get("arguments", ""))

    def message(self) -> dict[str, Any]:
        """The assistant message: content (None when the answer is only tool calls, as OpenAI answers),
        reasoning and the calls."""
        content = "".join(self.content)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if self.tool_calls and not content.strip() else content,
            "refusal": None,  # required by the OpenAI reference; this server never refuses
            "reasoning_content": "".join(self.reasoning) or None,
        }
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    **{k: v for k, v in c.items() if k != "_args"},
                    "function": {**c["function"], "arguments": "".join(c["_args"])},
                }
                for c in self.tool_calls
            ]
        return message


async def collect(hub: SessionHub, session_id: str, retry_after: int) -> dict[str, Any]:
    folded = _Folded()
    async for event in follow(hub, session_id, -1):
        if event is None:
            continue
        if event.data == DONE:
            break
        folded.add(json.loads(event.data))
    if folded.error is not None:
        raise _error(folded.error, retry_after)
    record = await hub.store.get(session_id)
    usage = folded.usage or (record.usage if record else None) or {}
    return {
        **folded.head,
        "object": "chat.completion",
        "choices": folded.response_choices(),
        "usage": {
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
            "prompt_tokens_details": usage.get("prompt_tokens_details") or {"cached_tokens": 0},
        },
    }


def _error(error: dict[str, Any], retry_after: int) -> ApiError:
    message = str(error.get("message", "generation failed"))
    code = error.get("code")
    if code in _RETRYABLE:
        return ServiceUnavailable(message, code=code, retry_after=retry_after)
    return from_payload(error, retry_after)
