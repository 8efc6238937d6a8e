"""n = 3 through the whole stack on the tiny real-architecture checkpoint (engine process, api, SQLite),
driven by the official ``openai`` SDK: three seeded choices, reproducible, different at temperature 1, the
stream reassembling to the non-stream result, the prompt prefilled once a request (``model_prefills_total``).
The prefix cache is off: a repeated prompt would otherwise start from its kept prefix."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers.stack import Service, start_api, start_model

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

KEY = "e2e-choices-0123456789"
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "seed": 77, "max_tokens": 16}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Service]:
    logs = tmp_path_factory.mktemp("e2e-choices")
    svc = start_model(logs, model_dir=tiny_model_dir, env={"MAX_BATCH_SIZE": "4", "PREFIX_CACHE": "0"})
    yield svc
    svc.proc.stop()


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory, model: Service) -> Iterator[openai.OpenAI]:
    logs = tmp_path_factory.mktemp("e2e-choices-api")
    api = start_api(logs, model_urls=[model.url], env={"API_KEYS": KEY}, gunicorn=False)
    yield openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    api.proc.stop()


def prefills(model: Service) -> float:
    text = httpx.get(f"{model.url}/metrics", timeout=10).text
    found = re.search(r"^model_prefills_total (\S+)$", text, re.MULTILINE)
    assert found, "model_prefills_total is not exported"
    return float(found.group(1))


def reasoning_of(message: object) -> str:
    return (getattr(message, "model_extra", None) or {}).get("reasoning_content") or ""


def test_three_seeded_choices_prefilled_once_and_streamed_alike(sdk: openai.OpenAI, model: Service) -> None:
    messages = [{"role": "user", "content": "name three colours"}]
    before = prefills(model)
    first = sdk.chat.completions.create(model="any", messages=messages, n=3, **SAMPLING)  # type: ignore[arg-type]
    assert prefills(model) == before + 1  # one prefill for three choices
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [
        (c.message.model_extra or {}).get("reasoning_content", "") + (c.message.content or "")
        for c in first.choices
    ]
    assert len(set(texts)) == 3, texts  # temperature 1: the choices differ
    assert first.usage is not None and first.usage.completion_tokens <= 3 * SAMPLING["max_tokens"]
    again = sdk.chat.completions.create(model="any", messages=messages, n=3, **SAMPLING)  # type: ignore[arg-type]
    assert [c.message for c in again.choices] == [c.message for c in first.choices]  # seeded
    assert [c.finish_reason for c in again.choices] == [c.finish_reason for c in first.choices]
    chunks = list(
        sdk.chat.completions.create(
            model="any",
            messages=messages,  # type: ignore[arg-type]
            n=3,
            stream=True,
            stream_options={"include_usage": True},
            **SAMPLING,  # type: ignore[arg-type]
        )
    )
    reasoning, content, finish = ["", "", ""], ["", "", ""], [None, None, None]
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            reasoning[choice.index] += (delta.model_extra or {}).get("reasoning_content") or ""
            content[choice.index] += delta.content or ""
            if choice.finish_reason:
                assert finish[choice.index] is None
                finish[choice.index] = choice.finish_reason
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == first.usage.completion_tokens
    for i, choice in enumerate(first.choices):
        assert reasoning_of(choice.message) == reasoning[i]
        assert (choice.message.content or "") == content[i]
        assert choice.finish_reason == finish[i]
