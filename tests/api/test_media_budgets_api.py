"""Media budget fields through the api service (a real process) and the model service with the fake engine:
bad ``detail`` values, unknown or out-of-cap ``mm_processor_kwargs`` and misplaced ``fps`` are 400s naming
the parameter; in-cap values and a list-of-frames video are accepted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.openai_shapes import check_completion, check_error
from tests.helpers.stack import Service, keyed_client, keyed_fake_stack
from tests.model.media import png_b64

pytestmark = pytest.mark.integration

KEY = "key-media-0123456789"
PNG = f"data:image/png;base64,{png_b64(32, 32)}"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with keyed_fake_stack(
        tmp_path_factory.mktemp("api-media-budgets"),
        KEY,
        {"FAKE_STEP_SECONDS": "0.002", "MAX_VIDEO_FRAMES": "16"},
    ) as svc:
        yield svc


@pytest.fixture
def client(api: Service) -> Iterator[httpx.Client]:
    with keyed_client(api, KEY) as c:
        yield c


def chat(part: dict[str, Any], **extra: Any) -> dict[str, Any]:
    content = [part, {"type": "text", "text": "what is it [[fake:tokens=3]]"}]
    return {"model": "x", "messages": [{"role": "user", "content": content}], **extra}


IMAGE = {"type": "image_url", "image_url": {"url": PNG}}
FRAMES = {"type": "video", "video": [PNG, PNG, PNG, PNG], "fps": 1}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            chat({"type": "image_url", "image_url": {"url": PNG, "detail": "medium"}}),
            "messages[0].content[0].image_url.detail",
        ),
        (chat(IMAGE, mm_processor_kwargs={"max_frames": 17}), "mm_processor_kwargs.max_frames"),
        (chat(IMAGE, mm_processor_kwargs={"max_pixels": 1280 * 1024 + 1}), "mm_processor_kwargs.max_pixels"),
        (
            chat(IMAGE, mm_processor_kwargs={"min_pixels": 4096, "max_pixels": 2048}),
            "mm_processor_kwargs.min_pixels",
        ),
        (chat(IMAGE, mm_processor_kwargs={"fps": 61}), "mm_processor_kwargs.fps"),
        (chat(IMAGE, mm_processor_kwargs={"fps": 0}), "mm_processor_kwargs.fps"),
        (chat(IMAGE, mm_processor_kwargs={"do_resize": False}), "mm_processor_kwargs.do_resize"),
        (chat({"type": "video", "video": []}), "messages[0].content[0].video"),
        (chat({"type": "video", "video": PNG, "fps": 2}), "messages[0].content[0]"),
        (
            chat({"type": "video", "video": [PNG, "data:text/plain;base64,AAAA"]}),
            "messages[0].content[0].video[1]",
        ),
    ],
)
def test_bad_media_budgets_are_400_naming_them(client: httpx.Client, body: dict, param: str) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = check_error(r.json())
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


@pytest.mark.parametrize(
    "body",
    [
        chat({"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}),
        chat(IMAGE, mm_processor_kwargs={"max_frames": 16, "min_pixels": 1024, "max_pixels": 1280 * 1024}),
        chat(FRAMES, mm_processor_kwargs={"fps": 2.5}),
    ],
)
def test_budgets_within_the_caps_are_accepted(client: httpx.Client, body: dict) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    check_completion(r.json())
