"""Streaming chat completions over HTTP, measured the way a client sees them.

Works for both servers: ours ends its stream with ``data: [DONE]``; ``transformers serve`` just closes it
(its usage rides on the last chunk; ``stream_options`` is on its list of unsupported fields). The first
token is the first chunk that carries text (content or reasoning); tokens come from ``usage``.

``transformers serve`` opens every stream with a reasoning chunk ``"\n"`` that no model step produced: its
response parser replays the end of the prompt (the Thinking template's ``<think>\n``) before generation
starts. ``leading_echo`` names such a chunk so that it does not count as the first token.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from bench.loadgen import RequestRecord
from bench.workload import Workload

_TEXT_FIELDS = ("content", "reasoning_content", "reasoning")


def make_client(max_connections: int, timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=10.0), trust_env=False)


class ChatTarget:
    """One OpenAI-compatible server: where to post and how to phrase the workload for it."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        model: str,
        workload: Workload,
        *,
        include_usage: bool,
        headers: dict[str, str] | None = None,
        leading_echo: str | None = None,
    ) -> None:
        self._client = client
        self._url = base_url.rstrip("/") + "/v1/chat/completions"
        self._model = model
        self._workload = workload
        self._include_usage = include_usage
        self._headers = headers or {}
        self._leading_echo = leading_echo

    async def send(self, index: int) -> RequestRecord:
        body = self._workload.openai_body(
            self._workload.request(index), self._model, include_usage=self._include_usage
        )
        rec = RequestRecord(start=time.perf_counter())
        try:
            async with self._client.stream("POST", self._url, json=body, headers=self._headers) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    rec.error = f"HTTP {resp.status_code}: {text[:200]}"
                else:
                    await _consume(resp, rec, self._leading_echo)
        except (httpx.HTTPError, ValueError) as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
        rec.end = time.perf_counter()
        if rec.error is None and rec.completion_tokens == 0:
            rec.error = "the stream ended without usage"
        return rec


async def _consume(resp: httpx.Response, rec: RequestRecord, leading_echo: str | None) -> None:
    echo = leading_echo
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # ids, event names, ": ping" comments, blank separators
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            rec.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
            return
        text = _text_of(chunk)
        if text and echo is not None and rec.chunks == 0 and text == echo:
            echo = None  # the server's replay of the prompt's end, not a generated token
        elif text:
            rec.chunks += 1
            if rec.first_token is None:
                rec.first_token = time.perf_counter()
        _note_usage(chunk, rec)


def _text_of(chunk: dict[str, Any]) -> str:
    parts = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        parts += [delta[f] for f in _TEXT_FIELDS if delta.get(f)]
    return "".join(parts)


def _note_usage(chunk: dict[str, Any], rec: RequestRecord) -> None:
    usage = chunk.get("usage")
    if usage:
        rec.completion_tokens = int(usage.get("completion_tokens") or 0)
        rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
