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
    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.error: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            self.error = chunk["error"]
            return
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                self.reasoning.append(delta["reasoning_content"])
            if delta.get("content"):
                self.content.append(delta["content"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]


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
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(folded.content),
                    "refusal": None,  # required by the OpenAI reference; this server never refuses
                    "reasoning_content": "".join(folded.reasoning) or None,
                },
                "logprobs": None,
                "finish_reason": folded.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
        },
    }


def _error(error: dict[str, Any], retry_after: int) -> ApiError:
    message = str(error.get("message", "generation failed"))
    code = error.get("code")
    if code in _RETRYABLE:
        return ServiceUnavailable(message, code=code, retry_after=retry_after)
    return from_payload(error, retry_after)
