"""Issue 13 through the official ``openai`` SDK on the tiny real-architecture checkpoint (model service
with ENGINE=hf, api service, SQLite): ``detail: low`` costs fewer prompt tokens than ``high``;
``mm_processor_kwargs`` ``fps`` / ``max_frames`` change a video's frames; a video given as a list of
frames works; logprobs stream and non-stream agree and a resume replays them identically."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.api.sse import read_sse
from tests.helpers.stack import Service, start_api, start_model
from tests.model.media import mp4_b64, png_b64

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

KEY = "e2e-media-0123456789"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Service]:
    logs = tmp_path_factory.mktemp("e2e-media")
    model = start_model(logs, model_dir=tiny_model_dir, env={"MAX_TOKENS": "16"})
    try:
        env = {"API_KEYS": KEY, "SESSIONS_DB_PATH": str(logs / "s.db")}
        svc = start_api(logs, model_urls=[model.url], env=env, gunicorn=False)
        yield svc
        svc.proc.stop()
    finally:
        model.proc.stop()


@pytest.fixture
def sdk(api: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(part: dict[str, Any]) -> list[Any]:
    return [{"role": "user", "content": [part, {"type": "text", "text": "what is this?"}]}]


def prompt_tokens(sdk: openai.OpenAI, part: dict[str, Any], **kwargs: Any) -> int:
    extra = {"mm_processor_kwargs": kwargs} if kwargs else None
    out = sdk.chat.completions.create(model="m", messages=ask(part), max_tokens=1, extra_body=extra)
    assert out.usage is not None
    return out.usage.prompt_tokens


def test_detail_low_costs_fewer_prompt_tokens(sdk: openai.OpenAI) -> None:
    url = f"data:image/png;base64,{png_b64(768, 512)}"
    high = prompt_tokens(sdk, {"type": "image_url", "image_url": {"url": url, "detail": "high"}})
    low = prompt_tokens(sdk, {"type": "image_url", "image_url": {"url": url, "detail": "low"}})
    auto = prompt_tokens(sdk, {"type": "image_url", "image_url": {"url": url}})
    assert high == auto and high - low >= 300, (high, low)  # 384 image tokens vs ~70


def test_fps_and_max_frames_change_the_video_tokens(sdk: openai.OpenAI) -> None:
    part = {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{mp4_b64(frames=24, fps=4)}"}}
    default, slow = prompt_tokens(sdk, part), prompt_tokens(sdk, part, fps=1.0)
    capped = prompt_tokens(sdk, part, max_frames=4)
    assert default > slow > capped, (default, slow, capped)  # 12 frames vs 6 vs 4


def test_a_list_of_frames_through_the_sdk(sdk: openai.OpenAI) -> None:
    frames = [f"data:image/png;base64,{png_b64(64, 64, seed=i)}" for i in range(4)]
    out = sdk.chat.completions.create(
        model="m", messages=ask({"type": "video", "video": frames, "fps": 1}), max_tokens=8, seed=1
    )
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage is not None
    two = prompt_tokens(sdk, {"type": "video", "video": frames[:2], "fps": 1})
    assert out.usage.prompt_tokens > two  # two temporal patches vs one


@pytest.mark.parametrize("stream", [False, True])
def test_undecodable_media_is_a_400_naming_the_part(sdk: openai.OpenAI, stream: bool) -> None:
    """The api passes the bytes on; the model service cannot decode them and names the part, with or
    without ``stream`` (the error comes before the first event)."""
    garbage = "data:image/png;base64,dGhpcyBpcyBub3QgYW4gaW1hZ2U="  # "this is not an image"
    good = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_b64(32, 32)}"}}
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                good,
                {"type": "text", "text": "and"},
                {"type": "image_url", "image_url": {"url": garbage}},
            ],
        },
    ]
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model="m", messages=messages, max_tokens=4, stream=stream)  # type: ignore[call-overload]
    error = bad.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_media", error
    assert error["param"] == "messages[1].content[2]" and error["message"].startswith(
        "messages[1].content[2]: "
    )


def test_logprobs_stream_resume_and_non_stream_agree(sdk: openai.OpenAI, api: Service) -> None:
    body: dict[str, Any] = {"messages": ask({"type": "text", "text": "hello"}), "max_tokens": 12}
    body.update(temperature=0.0, logprobs=True, top_logprobs=3)
    whole = sdk.chat.completions.create(model="m", **body)
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.content is not None
    extra = lp.model_extra or {}
    entries = [*extra.get("reasoning_content", []), *[e.model_dump() for e in lp.content]]
    assert len(entries) == whole.usage.completion_tokens  # type: ignore[union-attr]
    for entry in entries:
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy: row maximum
    sid = f"e2e-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=api.url, headers=headers, timeout=120) as http:
        with http.stream(
            "POST", "/v1/chat/completions", json={**body, "stream": True, "session_id": sid}
        ) as r:
            events = read_sse(r)
        streamed = [
            e
            for ev in events[:-1]
            for c in ev.json()["choices"]
            for e in [
                *((c["logprobs"] or {}).get("reasoning_content") or []),
                *((c["logprobs"] or {}).get("content") or []),
            ]
        ]
        assert streamed == entries
        middle = events[len(events) // 2]
        with http.stream("GET", f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": str(middle.id)}) as r:
            assert [e.data for e in read_sse(r)] == [e.data for e in events[len(events) // 2 + 1 :]]
