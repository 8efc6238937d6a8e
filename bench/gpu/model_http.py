"""The model service's own HTTP stream as a benchmark target (no api in front of it).

Posts the workload's request in the internal protocol to ``GENERATE`` and reads the NDJSON events with the
one codec, recording what a client would see (first text, the final usage), like ``bench.http_client``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from bench.loadgen import RequestRecord, next_id
from bench.workload import Workload
from services.protocol import paths
from services.protocol.codec import decode_event
from services.protocol.events import Delta
from services.protocol.generate import GenerateRequest


def generate_url(base_url: str) -> str:
    return base_url.rstrip("/") + paths.GENERATE


class ModelTarget:
    """``send(index)``: one workload request to the model service at ``base_url``."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, workload: Workload) -> None:
        self._client = client
        self._url = generate_url(base_url)
        self._workload = workload

    async def send(self, index: int) -> RequestRecord:
        request = self._workload.generate_request(self._workload.request(index), next_id("model"))
        return await stream_generate(self._client, self._url, request)


async def stream_generate(client: httpx.AsyncClient, url: str, request: GenerateRequest) -> RequestRecord:
    """POST ``request`` to the model service's generate ``url``; the record of its stream (errors in
    ``record.error``, never raised for HTTP or stream failures)."""
    return await post_stream(client, url, request.model_dump(mode="json"), _consume)


async def post_stream(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    read: Callable[[httpx.Response, RequestRecord], Awaitable[None]],
) -> RequestRecord:
    """POST ``body`` as JSON to ``url`` and ``read`` a 200 response's stream into the record (start and end
    in ``time.perf_counter()`` seconds); an HTTP error status or a transport/stream failure ends up in
    ``record.error``, never raised."""
    rec = RequestRecord(start=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text[:200]}"
            else:
                await read(resp, rec)
    except (httpx.HTTPError, ValueError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.end = time.perf_counter()
    return rec


async def _consume(resp: httpx.Response, rec: RequestRecord) -> None:
    async for line in resp.aiter_lines():
        if not line.strip():
            continue
        event = decode_event(line)
        if isinstance(event, Delta):
            if event.reasoning or event.content:
                rec.chunks += 1
                if rec.first_token is None:
                    rec.first_token = time.perf_counter()
            continue
        rec.completion_tokens = event.usage.completion_tokens
        rec.prompt_tokens = event.usage.prompt_tokens
        if event.finish_reason not in ("stop", "length"):
            rec.error = f"{event.finish_reason}: {event.error.message if event.error else ''}"
        return
