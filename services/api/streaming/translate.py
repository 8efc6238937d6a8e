"""Model events -> OpenAI ``chat.completion.chunk`` JSON strings (pure; no I/O).

Each chunk is encoded once here, stored as-is and sent as-is. The fixed part of every chunk of a session
(id, created, model) is pre-encoded so a delta costs one small ``json.dumps`` of the text.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from services.api.errors import from_model_error
from services.protocol.errors import InvalidRequest, error_from_code
from services.protocol.events import Finished

log = logging.getLogger("api.translate")

DONE = "[DONE]"
# What a client reads when the model service failed a generation; the model's own text (which may name
# internals, e.g. a tensor error) goes to the log with the session id, never to the client.
GENERATION_FAILED = "the generation failed on the model service"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class ChunkEncoder:
    """Builds the chunk strings of one session (all share one ``id``, ``created`` and ``model``). Every
    chunk carries one choice; ``choice`` is its ``index`` (0..n-1).

    With ``include_usage`` every chunk but the last carries ``"usage": null``, as the OpenAI reference says
    for ``stream_options.include_usage``; the last one has empty ``choices`` and the usage."""

    def __init__(self, chunk_id: str, created: int, model: str, include_usage: bool = False) -> None:
        self.chunk_id = chunk_id
        head = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model}
        self._prefix = _dumps(head)[:-1] + ',"choices":'
        self._suffix = ',"usage":null}' if include_usage else "}"

    def _chunk(self, delta: str, finish_reason: str | None, logprobs: str = "null", choice: int = 0) -> str:
        finish = "null" if finish_reason is None else _dumps(finish_reason)
        one = f'{{"index":{int(choice)},"delta":{delta},"logprobs":{logprobs},"finish_reason":{finish}}}'
        return f"{self._prefix}[{one}]{self._suffix}"

    def role(self, choice: int = 0) -> str:
        """A choice's first chunk: its role (one per choice, as the OpenAI reference streams ``n`` > 1)."""
        return self._chunk('{"role":"assistant"}', None, choice=choice)

    def reasoning(self, text: str, logprobs: list[dict[str, Any]] | None = None, choice: int = 0) -> str:
        """Reasoning text; its tokens' logprob entries (when asked for) go to ``logprobs.reasoning_content``
        (an extension next to ``content``, as ``reasoning_content`` is next to ``content`` in the delta)."""
        lp = "null" if logprobs is None else '{"content":null,"refusal":null,"reasoning_content":'
        if logprobs is not None:
            lp += _dumps(logprobs) + "}"
        return self._chunk('{"reasoning_content":' + _dumps(text) + "}", None, lp, choice)

    def content(self, text: str, logprobs: list[dict[str, Any]] | None = None, choice: int = 0) -> str:
        """Answer text; its tokens' logprob entries (when asked for) in ``logprobs.content``."""
        lp = "null" if logprobs is None else '{"content":' + _dumps(logprobs) + ',"refusal":null}'
        return self._chunk('{"content":' + _dumps(text) + "}", None, lp, choice)

    def tool_call_start(self, index: int, call_id: str, name: str, choice: int = 0) -> str:
        """The first fragment of a call: its index, id, type and name (arguments follow)."""
        call = {
            "index": index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        return self._chunk('{"tool_calls":[' + _dumps(call) + "]}", None, choice=choice)

    def tool_call_arguments(self, index: int, arguments: str, choice: int = 0) -> str:
        """A later fragment of call ``index``: more of its arguments' JSON text."""
        call = {"index": index, "function": {"arguments": arguments}}
        return self._chunk('{"tool_calls":[' + _dumps(call) + "]}", None, choice=choice)

    def finish(self, reason: str, choice: int = 0) -> str:
        return self._chunk("{}", reason, choice=choice)

    def usage(self, usage: dict[str, Any]) -> str:
        return f'{self._prefix}[],"usage":{_dumps(usage)}}}'


def usage_dict(finished: Finished) -> dict[str, Any]:
    """The OpenAI ``usage`` object: token counts and ``prompt_tokens_details.cached_tokens`` (prompt tokens
    served from the model service's prefix cache)."""
    p, c = finished.usage.prompt_tokens, finished.usage.completion_tokens
    details = {"cached_tokens": finished.usage.cached_tokens}
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": details,
    }


def error_payload(message: str, *, type_: str, code: str | None, param: str | None = None) -> str:
    return _dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def request_error(finished: Finished) -> InvalidRequest | None:
    """The typed error of a generation that failed because of the request itself — a kind of
    ``InvalidRequest`` the model service found only while generating, such as ``invalid_schema`` (the output
    reached a part of the JSON schema that no value satisfies) —, else None (the model service's failure)."""
    if finished.error is None:
        return None
    exc = error_from_code(finished.error.code, finished.error.message)
    return exc if isinstance(exc, InvalidRequest) else None


def choice_reason(reason: str, called_tools: bool) -> str:
    """A choice's public finish_reason: ``tool_calls`` instead of ``stop`` when its answer called tools."""
    return "tool_calls" if called_tools and reason == "stop" else reason


def final_chunks(
    enc: ChunkEncoder,
    finished: Finished,
    include_usage: bool,
    called_tools: bool = False,
    open_choices: dict[int, bool] | None = None,
) -> tuple[list[str], str, str | None]:
    """Chunks that end a stream, the session's final status and its finish_reason (``tool_calls`` instead
    of ``stop`` when the answer called tools). A model-side error ends the stream with one error event (no
    finish chunk), as the contract asks for errors mid-stream.

    ``open_choices`` (n > 1): the choices that have no finish chunk yet (index -> called tools), each
    ended with the request's reason; the session's finish_reason is then the request's (the first of
    cancelled, length, stop any choice ended with). None: one choice (index 0, ``called_tools``)."""
    usage = usage_dict(finished)
    if finished.finish_reason == "error":
        bad = request_error(finished)
        if bad is not None:  # the same 400 as before the stream, its text scrubbed as every model text is
            err = from_model_error(bad, retry_after=0)
            payload = error_payload(err.message, type_=err.type, code=err.code, param=err.param)
            return [payload, DONE], "failed", None
        code = finished.error.code if finished.error else None
        if finished.error is not None:
            log.warning("the model service failed the generation: %s (%s)", finished.error.message, code)
        return [error_payload(GENERATION_FAILED, type_="server_error", code=code), DONE], "failed", None
    status = "cancelled" if finished.finish_reason == "cancelled" else "completed"
    if open_choices is None:
        reason = choice_reason(finished.finish_reason, called_tools)
        chunks = [enc.finish(reason)]
    else:
        reason = finished.finish_reason
        ends = sorted(open_choices.items())
        chunks = [enc.finish(choice_reason(reason, called), i) for i, called in ends]
    if include_usage:
        chunks.append(enc.usage(usage))
    chunks.append(DONE)
    return chunks, status, reason
