"""The playground page in real Chromium, through the nginx edge, against the api (gunicorn) and the model
service on the tiny checkpoint: an image prompt streams its reasoning (and leaves the README screenshot),
a reload and a network loss resume every event exactly once, cancel, output and file names rendered as text,
readable 401 and 413 errors."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import EDGE_BODY_LIMIT, KEY, PageWatch, Stack
from tests.browser.helpers import (
    png_bytes,
    server_text,
    session_status,
    store_finished_session,
    transcript,
    wait_transcript,
)
from tests.e2e.tcp_proxy import TcpProxy
from tests.helpers.env import REPO, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.e2e]

HOSTILE = "<img src=x onerror=alert(1)>"
SCREENSHOT = Path(os.environ.get("PLAYGROUND_SCREENSHOT", REPO / "tmp" / "playground" / "playground.png"))
BrowserPage = tuple[Any, PageWatch]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(autouse=True)
def _cancel_what_the_test_left_running(browser_page: BrowserPage, stack: Stack) -> Iterator[None]:
    """The stack serves one generation at a time (MAX_BATCH_SIZE=1, no queue): a test that fails before its
    own cancel must not leave a 60,000-token generation in the way of the tests after it."""
    yield
    page, _watch = browser_page
    with contextlib.suppress(Exception):  # a broken page or stack: the test's own failure says why
        session = transcript(page).get("session")
        if session:
            httpx.post(f"{stack.base}/v1/cancel/{session}", headers=AUTH, timeout=10)


def open_with_key(page: Any, key: str = KEY, path: str = "/") -> None:
    page.goto(path)
    page.fill("#api-key", key)
    page.click("#key-save")


def send(page: Any, prompt: str, max_tokens: int, seed: int = 7) -> None:
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#seed", str(seed))
    page.click("#send")


def check_same_as_server(page: Any, stack: Stack) -> dict[str, str]:
    """The page applied every event once (no duplicate, no gap) and shows exactly the stored texts."""
    shown = transcript(page)
    reasoning, answer, last = server_text(stack.base, KEY, shown["session"])
    assert (shown["duplicates"], shown["gaps"]) == ("0", "0"), shown
    assert int(shown["lastIndex"]) == last
    assert page.text_content("#reasoning") == reasoning
    assert page.text_content("#answer") == answer
    return shown


def test_an_image_prompt_streams_its_reasoning(browser_page: BrowserPage, stack: Stack) -> None:
    page, _watch = browser_page
    open_with_key(page)
    name = f"{HOSTILE}.png"
    page.set_input_files(
        "#file-input", files=[{"name": name, "mimeType": "image/png", "buffer": png_bytes()}]
    )
    assert page.text_content("#attachments .name") == name  # a file name is text, never markup
    # long enough that the streaming state is surely seen on any hardware (~5 s here), short enough to finish
    send(page, "Describe this picture.", max_tokens=3000)
    wait_transcript(
        page, "d.status === 'streaming' && document.getElementById('reasoning').textContent.length > 40"
    )
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    shown = wait_transcript(page, "d.status === 'completed'", timeout_ms=180_000)
    assert re.search(r"[?&]session=" + re.escape(shown["session"]) + "$", page.url)
    check_same_as_server(page, stack)
    assert page.text_content("#user-media .name") == name
    assert page.locator("img[src='x']").count() == 0
    assert re.fullmatch(r"\d+ ms", page.text_content("#stat-ttft") or "")
    assert re.fullmatch(r"\d+ prompt \+ \d+ completion = \d+", page.text_content("#stat-usage") or "")
    assert "tok/s" in (page.text_content("#stat-rate") or "")
    assert page.locator("#session-list button[aria-current='true']").count() == 1


def test_a_reload_mid_stream_continues_the_same_session_with_every_event_once(
    browser_page: BrowserPage, stack: Stack
) -> None:
    page, _watch = browser_page
    resumes: list[str | None] = []
    page.on(
        "request",
        lambda r: resumes.append(r.headers.get("last-event-id")) if "/events" in r.url else None,
    )
    open_with_key(page)
    # far more tokens than the test waits for, so the session is surely running at the reload on any hardware;
    # once events after the resume point have arrived, the test cancels it
    send(page, "Count slowly.", max_tokens=60000)
    before = wait_transcript(page, "Number(d.lastIndex) >= 5")
    page.reload()
    assert session_status(stack.base, KEY, before["session"])["status"] == "running"  # reloaded mid-stream
    # the live tail after the reload (the page saved at least `before`'s index before it went away)
    wait_transcript(page, f"Number(d.lastIndex) >= {int(before['lastIndex']) + 5}")
    assert len(resumes) == 1 and resumes[0] is not None
    sid, index = resumes[0].rsplit(":", 1)
    assert sid == before["session"] and int(index) >= 0  # resumed after its saved event, not replayed
    page.click("#cancel")
    shown = wait_transcript(page, "d.status === 'cancelled'")
    assert shown["session"] == before["session"]
    check_same_as_server(page, stack)


def test_a_network_loss_resumes_after_the_last_event(browser_page: BrowserPage, stack: Stack) -> None:
    page, _watch = browser_page
    edge_port = int(stack.base.rsplit(":", 1)[1])
    proxy = TcpProxy("127.0.0.1", edge_port, free_port()).start()  # the browser's network path to the edge
    try:
        open_with_key(page, path=f"http://127.0.0.1:{proxy.port}/")
        # far more tokens than the test waits for: the session surely runs when the network goes, on any
        # hardware; once events past the loss have arrived, the test cancels it
        send(page, "Keep talking.", max_tokens=60000)
        wait_transcript(page, "Number(d.lastIndex) >= 5")
        proxy.down()  # every open connection reset, new ones refused
        lost = wait_transcript(page, "d.status === 'reconnecting'")
        proxy.up()
        wait_transcript(
            page, f"d.status === 'streaming' && Number(d.lastIndex) >= {int(lost['lastIndex']) + 5}"
        )
        page.click("#cancel")
        shown = wait_transcript(page, "d.status === 'cancelled'")
    finally:
        proxy.close()
    assert int(page.text_content("#stat-resumes") or "0") >= 1
    assert shown["session"] == lost["session"]
    check_same_as_server(page, stack)


def test_cancel_shows_the_cancelled_state(browser_page: BrowserPage, stack: Stack) -> None:
    page, _watch = browser_page
    open_with_key(page)
    send(page, "Write a long story.", max_tokens=60000)
    wait_transcript(page, "Number(d.lastIndex) >= 3")
    page.click("#cancel")
    shown = wait_transcript(page, "d.status === 'cancelled'")
    assert page.get_attribute("#status", "data-state") == "cancelled"
    status = session_status(stack.base, KEY, shown["session"])
    assert (status["status"], status["finish_reason"]) == ("cancelled", "cancelled")
    check_same_as_server(page, stack)
    assert page.is_disabled("#cancel")


def test_model_output_is_rendered_as_text(browser_page: BrowserPage, stack: Stack) -> None:
    page, watch = browser_page
    session_id = "pg-stored-hostile-output"
    answer = f"Here: {HOSTILE} and <script>alert(2)</script> <b>bold</b>"
    store_finished_session(stack.logs / "sessions.db", KEY, session_id, f"thinking {HOSTILE}", answer)
    open_with_key(page)
    page.goto(f"/?session={session_id}")  # a session this browser never saw: replayed from the start
    wait_transcript(page, "d.status === 'completed'")
    assert page.text_content("#answer") == answer
    assert page.text_content("#reasoning") == f"thinking {HOSTILE}"
    assert page.locator("#transcript img, #transcript script, #transcript b").count() == 0
    assert watch.dialogs == []


def test_a_bad_key_shows_the_401_message(browser_page: BrowserPage) -> None:
    page, _watch = browser_page
    open_with_key(page, key="not-the-key")
    send(page, "Hello?", max_tokens=8)
    page.wait_for_selector("#error:not([hidden])")
    error = page.text_content("#error") or ""
    assert error.startswith("401 authentication_error: "), error
    assert "API key" in error
    assert page.get_attribute("#status", "data-state") == "error"


def test_an_upload_over_the_edge_limit_shows_the_413_message(browser_page: BrowserPage) -> None:
    page, _watch = browser_page
    open_with_key(page)
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(1_200_000)
    page.set_input_files("#file-input", files=[{"name": "big.png", "mimeType": "image/png", "buffer": big}])
    send(page, "What is this?", max_tokens=8)
    page.wait_for_selector("#error:not([hidden])")
    error = page.text_content("#error") or ""
    assert error.startswith("413 invalid_request_error: "), error
    assert f"limit {EDGE_BODY_LIMIT}" in error


def occupy_the_model(stack: Stack, session_id: str, deadline_s: float = 20.0) -> None:
    """Start a long generation on the model's only slot (retrying while an earlier one still holds it)."""
    body = {
        "messages": [{"role": "user", "content": "occupy"}],
        "max_tokens": 60000,
        "stream": True,
        "session_id": session_id,
    }
    deadline = time.monotonic() + deadline_s
    while True:
        with httpx.stream(
            "POST", f"{stack.base}/v1/chat/completions", json=body, headers=AUTH, timeout=30
        ) as resp:
            if resp.status_code == 200:
                return  # the generation goes on after this client leaves
        assert resp.status_code == 429 and time.monotonic() < deadline, resp.status_code
        time.sleep(0.1)  # polling for the previous test's generation to leave the slot


def test_a_full_model_shows_the_429_with_its_retry_after(browser_page: BrowserPage, stack: Stack) -> None:
    page, _watch = browser_page
    busy = "pg-occupant-429"
    occupy_the_model(stack, busy)
    try:
        open_with_key(page)
        send(page, "Anyone there?", max_tokens=8)
        page.wait_for_selector("#error:not([hidden])")
    finally:
        httpx.post(f"{stack.base}/v1/cancel/{busy}", headers=AUTH, timeout=10)
    error = page.text_content("#error") or ""
    assert error.startswith("429 rate_limit_error: "), error
    assert re.search(r"\nRetry after \d+ s\.$", error), error
    assert page.get_attribute("#status", "data-state") == "error"
