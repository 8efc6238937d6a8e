"""Fixtures for the browser tests: the real stack (the model service on the tiny checkpoint, the api under
gunicorn with a key, the nginx edge with the production template) and Debian's Chromium driven by
playwright (never a downloaded browser). In CI a missing chromium, nginx or playwright fails the tests."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.deploy.conftest import start_edge
from tests.helpers.env import missing, require_binary
from tests.helpers.procs import Proc
from tests.helpers.stack import Service, start_api, start_model

KEY = "playground-key-0123456789"
EDGE_BODY_LIMIT = "1m"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@dataclass
class Stack:
    base: str  # the edge's URL: what the browser opens
    api: Service
    model: Service
    logs: Path


@dataclass
class PageWatch:
    """What a page did that it must not: dialogs (an injected alert), uncaught errors, CSP violations."""

    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", self._console)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _console(self, message: Any) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.errors.append(f"csp: {message.text}")


@pytest.fixture(scope="session")
def playwright_api() -> ModuleType:
    try:
        return importlib.import_module("playwright.sync_api")
    except ImportError:
        missing("the playwright Python package")
        raise


@pytest.fixture(scope="session")
def chromium_path() -> str:
    return require_binary("chromium")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    nginx = require_binary("nginx")
    logs = tmp_path_factory.mktemp("browser")
    # One generation at a time and no queue: the tests run one stream each, and a second one meets a real 429.
    model_env = {"TORCH_THREADS": "1", "MAX_BATCH_SIZE": "1", "MAX_QUEUE": "0"}
    model = start_model(logs, model_dir=tiny_model_dir, env=model_env)
    procs: list[Proc] = [model.proc]
    try:
        api = start_api(logs, model_urls=[model.url], env={"API_KEYS": KEY, "SSE_PING_SECONDS": "1"})
        procs.append(api.proc)
        edge, base = start_edge(nginx, logs, [f"127.0.0.1:{api.port}"], client_max_body_size=EDGE_BODY_LIMIT)
        procs.append(edge)
        yield Stack(base, api, model, logs)
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.fixture(scope="module")
def browser(playwright_api: ModuleType, chromium_path: str) -> Iterator[Any]:
    with playwright_api.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def browser_page(browser: Any, stack: Stack) -> Iterator[tuple[Any, PageWatch]]:
    """A fresh browser context (empty storage) on the edge, and its watch, checked clean at the end."""
    context = browser.new_context(base_url=stack.base, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    watch = PageWatch()
    watch.attach(page)
    yield page, watch
    context.close()
    assert watch.dialogs == [], watch.dialogs
    assert watch.errors == [], watch.errors
