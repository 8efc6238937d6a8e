"""Running the model service for tests and talking to it over real HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from services.model.lifecycle import EngineFactory
from services.model.main import create_app
from services.model.settings import ModelSettings
from services.protocol import paths
from services.protocol.codec import decode_event
from services.protocol.events import Delta, Finished

Event = Delta | Finished


@contextmanager
def serve_in_thread(settings: ModelSettings, engine_factory: EngineFactory | None = None) -> Iterator[str]:
    """The app under a real uvicorn server on a free loopback port, in a thread; yields its base URL."""
    app = create_app(settings, engine_factory)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="model-service", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), what="server start")
    assert server.started, "the model service did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def wait_for(condition: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``condition`` until it is truthy (a short back-off, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


def body(request_id: str, text: str = "describe the cat", *, parts: list[Any] | None = None, **sampling: Any):
    content: Any = text if parts is None else [{"type": "text", "text": text}, *parts]
    messages = [{"role": "user", "content": content}]
    return {"request_id": request_id, "messages": messages, "sampling": sampling}


def iter_events(response: httpx.Response) -> Iterator[Event]:
    """Decode NDJSON frames from a streaming response as they arrive."""
    for line in response.iter_lines():
        if line:
            yield decode_event(line)


def read_events(response: httpx.Response) -> list[Event]:
    return list(iter_events(response))


def generate(client: httpx.Client, payload: dict[str, Any]) -> list[Event]:
    with client.stream("POST", paths.GENERATE, json=payload) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return read_events(response)


def reattach(client: httpx.Client, request_id: str, after: int = -1) -> list[Event]:
    url = paths.EVENTS.format(request_id=request_id)
    with client.stream("GET", url, params={"after": after}) as response:
        assert response.status_code == 200, response.read()
        return read_events(response)


def assert_well_formed(events: list[Event], first_seq: int = 0) -> Finished:
    """Consecutive seq from ``first_seq``, exactly one Finished and it is last; returns it."""
    assert [e.seq for e in events] == list(range(first_seq, first_seq + len(events)))
    finished = [e for e in events if isinstance(e, Finished)]
    assert len(finished) == 1 and events[-1] is finished[0]
    deltas = [e for e in events if isinstance(e, Delta)]
    assert sum(d.tokens for d in deltas) <= finished[0].usage.completion_tokens
    return finished[0]


def text_of(events: list[Event]) -> tuple[str, str]:
    deltas = [e for e in events if isinstance(e, Delta)]
    return "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas)
