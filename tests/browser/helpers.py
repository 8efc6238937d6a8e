"""Helpers for the browser tests: what the server stored for a session, a stored session written through the
project's own store, a small PNG, and waiting on the page's stream state."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from services.api.store.base import AppendBatch, SessionRecord, StoredEvent
from services.api.store.sqlite import SqliteStore
from tests.api.sse import read_sse, text_of


def server_text(base: str, key: str, session_id: str) -> tuple[str, str, int]:
    """(reasoning, answer, last index) of the whole stored stream, replayed from its first event."""
    with httpx.stream(
        "GET",
        f"{base}/v1/sessions/{session_id}/events",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    ) as response:
        assert response.status_code == 200, response.read()
        events = read_sse(response)
    reasoning, answer = text_of(events)
    return reasoning, answer, max(e.index for e in events if e.id is not None)


def session_status(base: str, key: str, session_id: str) -> dict[str, Any]:
    resp = httpx.get(
        f"{base}/v1/sessions/{session_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def png_bytes(size: int = 64) -> bytes:
    """A real PNG: a colour gradient of ``size`` x ``size`` pixels."""
    image = Image.new("RGB", (size, size))
    image.putdata([(x * 4 % 256, y * 4 % 256, 128) for y in range(size) for x in range(size)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _chunk(session_id: str, delta: dict[str, Any], finish: str | None = None) -> str:
    return json.dumps(
        {
            "id": f"chatcmpl-{session_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": "stored-output",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


def store_finished_session(db_path: Path, key: str, session_id: str, reasoning: str, answer: str) -> None:
    """Write a completed session, as the runner stores one, into the api's SQLite store: the role chunk, one
    reasoning and one answer chunk with the given texts, the finish chunk and ``[DONE]``."""
    data = [
        _chunk(session_id, {"role": "assistant"}),
        _chunk(session_id, {"reasoning_content": reasoning}),
        _chunk(session_id, {"content": answer}),
        _chunk(session_id, {}, "stop"),
        "[DONE]",
    ]
    owner = hashlib.sha256(key.encode()).hexdigest()

    async def write() -> None:
        store = SqliteStore(str(db_path))
        await store.open()
        try:
            now = time.time()
            await store.create(
                SessionRecord(id=session_id, owner=owner, status="running", created=now, updated=now)
            )
            events = [StoredEvent(index, item) for index, item in enumerate(data)]
            await store.append(
                session_id,
                AppendBatch(events, model_seq=-1, status="completed", finish_reason="stop", now=time.time()),
            )
        finally:
            await store.close()

    # playwright's sync API runs an event loop in this thread: the store gets its own thread and loop.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, write()).result(30)


def transcript(page: Any) -> dict[str, str]:
    """The stream state the page shows (the transcript's data-* attributes)."""
    return page.eval_on_selector("#transcript", "node => ({...node.dataset})")


def wait_transcript(page: Any, condition: str, timeout_ms: int = 60_000) -> dict[str, str]:
    """Wait until ``condition`` (a JS expression over ``d``, the transcript's dataset) holds; its dataset."""
    page.wait_for_function(
        f"() => {{ const n = document.getElementById('transcript'); const d = n && n.dataset;"
        f" return !!(d && d.session && ({condition})); }}",
        timeout=timeout_ms,
    )
    return transcript(page)
