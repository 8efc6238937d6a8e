"""convert.py: what the model service receives for an OpenAI request (roles, parts, every sampling field),
checked through the wire encoding of GenerateRequest."""

from __future__ import annotations

import base64

import pytest

from services.api.convert import to_messages, to_sampling
from services.api.errors import BadRequest
from services.api.media import MediaError, MediaKind
from services.api.openai_schemas import ChatCompletionRequest
from services.api.routes.common import validate
from services.protocol.generate import GenerateRequest, ImagePart, Message, TextPart, VideoPart

pytestmark = pytest.mark.anyio


def req(**body: object) -> ChatCompletionRequest:
    return validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], **body})


def on_the_wire(request: ChatCompletionRequest, messages: list[Message] | None = None) -> GenerateRequest:
    wire = GenerateRequest(
        request_id="r-1",
        messages=messages or [Message(role="user", content="hi")],
        sampling=to_sampling(request),
    )
    return GenerateRequest.model_validate_json(wire.model_dump_json())


def test_every_sampling_parameter_reaches_the_model() -> None:
    request = req(
        max_tokens=50,
        max_completion_tokens=9,
        temperature=0.3,
        top_p=0.5,
        top_k=7,
        seed=11,
        stop=["END", "STOP"],
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.1,
        max_reasoning_tokens=12,
        logprobs=True,
        top_logprobs=4,
        n=3,
    )
    assert on_the_wire(request).sampling.model_dump() == {
        "n": 3,
        "max_tokens": 9,  # max_completion_tokens wins
        "temperature": 0.3,
        "top_p": 0.5,
        "top_k": 7,
        "seed": 11,
        "stop": ["END", "STOP"],
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "repetition_penalty": 1.1,
        "max_reasoning_tokens": 12,
        "top_logprobs": 4,
    }


def test_absent_parameters_leave_the_defaults_to_the_model_service() -> None:
    sampling = on_the_wire(req(max_tokens=12, stop="x")).sampling
    assert (sampling.max_tokens, sampling.stop) == (12, ["x"])
    # None = MAX_TOKENS / TEMPERATURE from the model service's env, else the generation config
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.repetition_penalty) == (None,) * 4
    assert on_the_wire(req()).sampling.max_tokens is None


async def test_roles_and_parts_in_every_accepted_shape() -> None:
    fetched: list[tuple[str, MediaKind]] = []

    async def fetch(url: str, kind: MediaKind) -> bytes:
        fetched.append((url, kind))
        return url.encode()

    content = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://h/a.png", "detail": "high"}},
        {"type": "input_image", "image_url": "https://h/b.png"},
        {"type": "input_image", "input_image": {"url": "https://h/c.png"}},
        {"type": "video_url", "video_url": {"url": "https://h/d.mp4"}},
        {"type": "input_video", "input_video": "https://h/e.mp4"},
    ]
    request = req(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "system", "content": [{"type": "text", "text": "sys"}]},
            {"role": "user", "content": content},
            {"role": "assistant", "content": None},
        ]
    )
    messages = await to_messages(request.messages, fetch)
    assert [m.role for m in messages] == ["system", "system", "user", "assistant"]
    parts = on_the_wire(request, messages).messages[2].content
    assert isinstance(parts, list)
    assert [type(p) for p in parts] == [TextPart, ImagePart, ImagePart, ImagePart, VideoPart, VideoPart]
    urls = [base64.b64decode(p.data).decode() for p in parts if not isinstance(p, TextPart)]
    assert (
        urls
        == [u for u, _ in fetched]
        == [f"https://h/{n}" for n in ("a.png", "b.png", "c.png", "d.mp4", "e.mp4")]
    )
    assert [k for _, k in fetched] == ["image", "image", "image", "video", "video"]


async def test_a_media_error_is_a_400_naming_the_part() -> None:
    async def refuse(url: str, kind: MediaKind) -> bytes:
        raise MediaError("local paths are refused")

    content = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]
    with pytest.raises(BadRequest) as info:
        await to_messages(req(messages=[{"role": "user", "content": content}]).messages, refuse)
    assert info.value.param == "messages[0].content[1].image_url.url" and info.value.code == "invalid_media"
