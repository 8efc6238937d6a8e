"""Cost before refusal: a prompt far over the context is refused after about one context's worth of work,
and the cheap bound never exceeds the tokens the chat template really renders (real Qwen BPE)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from services.model.multimodal import text_bound
from services.model.multimodal.text_bound import TextBound, check_prompt_text
from services.protocol.errors import PromptTooLong
from services.protocol.generate import (
    FunctionCall,
    FunctionDef,
    GenerateRequest,
    Message,
    SamplingParams,
    TextPart,
    Tool,
    ToolCall,
)
from tests.model.engine_support import tiny_engine

pytestmark = pytest.mark.slow  # loads the tiny checkpoint (once per process)

CONTEXT = 262_144  # the tiny checkpoint's (and the real model's) context
ENGLISH = "The quick brown fox jumps over the lazy dog; then it naps.\n"
CJK = "\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff0c\u6211\u4eec\u53bb\u516c\u56ed\u6563\u6b65\u3002"


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    return tiny_engine(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(engine: Any) -> Any:
    return engine.loaded.processor.tokenizer


BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
NOISE = "ab c\n\t  1234.,;!?\u00e9\u4f60\u597d\U0001f600-_/+=" + "xyz" * 5


def _text(index: int) -> str:
    """Texts over one piece long whose cuts could go wrong: prose, CJK, random symbols, a base64 blob,
    whitespace runs, one long number."""
    rng = random.Random(index)
    if index == 2:
        return "".join(rng.choice(NOISE) for _ in range(150_000))
    if index == 3:
        return "".join(rng.choice(BASE64) for _ in range(90_000))
    return {0: ENGLISH * 2000, 1: CJK * 9000, 4: "   \n\n  x  \n" * 9000, 5: "9" * 70_000}[index]


@pytest.mark.parametrize("index", range(6))
def test_piecewise_tokens_equal_the_whole_text_tokens(tokenizer: Any, index: int) -> None:
    text = _text(index)
    assert len(text) > text_bound.TOKEN_PIECE_CHARS  # cut into pieces
    whole = len(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)
    bound = TextBound(tokenizer, budget=10**9)
    assert bound.tokens_at_least([text]) == whole
    assert bound.words_at_least([text]) <= whole
    assert bound.chars_tokenized == len(text)


def test_the_bound_never_refuses_what_the_template_accepts(engine: Any) -> None:
    """For prompts that fit, the exact count (template rendered) is at least the bound's budget use."""
    from services.model.multimodal.prompt import MediaLimits, build_inputs

    limits = MediaLimits.from_settings(engine.settings)
    answer = "secret reasoning " * 5000 + "</think>the answer"
    messages = [
        Message(role="system", content="be brief " * 3000),
        Message(role="user", content=[TextPart(text=ENGLISH * 800), TextPart(text=CJK * 2000)]),
        Message(role="assistant", content=answer),
        Message(role="user", content="x" * 40_000),
    ]
    rendered = int(build_inputs(engine.loaded.processor, messages, limits)["input_ids"].shape[1])
    # the tightest context this prompt fits (max_tokens 1): the cheap check must pass it
    check_prompt_text(engine.loaded.processor.tokenizer, messages, rendered + 1, None)
    with pytest.raises(PromptTooLong):  # and the exact limit is still enforced by the engine after it
        engine.prepare_sync(_request(messages, max_tokens=CONTEXT - rendered + 1))


def test_a_huge_english_prompt_is_refused_by_counting_words(tokenizer: Any) -> None:
    messages = [Message(role="user", content=ENGLISH * (10_000_000 // len(ENGLISH)))]
    with pytest.raises(PromptTooLong) as refused:
        check_prompt_text(tokenizer, messages, CONTEXT, None)
    assert "context of 262144 tokens" in refused.value.message


def test_a_huge_prompt_without_spaces_is_refused_after_one_context_of_tokenizing(tokenizer: Any) -> None:
    text = CJK * (3_500_000 // len(CJK))  # ~10 MB of UTF-8, almost no whitespace
    bound = TextBound(tokenizer, CONTEXT - 1)
    assert bound.words_at_least([text]) < 10  # words cannot decide this one
    assert bound.tokens_at_least([text]) > CONTEXT - 1
    # work done: about one context's worth of characters (~0.6 token per character here), not 3.5 M
    assert bound.chars_tokenized < 2 * CONTEXT + text_bound.TOKEN_PIECE_CHARS, bound.chars_tokenized
    with pytest.raises(PromptTooLong):
        check_prompt_text(tokenizer, [Message(role="user", content=text)], CONTEXT, None)


def test_max_tokens_over_the_context_is_refused_before_any_counting(tokenizer: Any) -> None:
    with pytest.raises(PromptTooLong) as refused:
        check_prompt_text(None, [Message(role="user", content="hi")], CONTEXT, CONTEXT)
    assert "max_tokens (262144)" in refused.value.message


def test_the_engine_refuses_before_the_template_and_the_media_run(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the chat template ran on a prompt the cheap bound must refuse")

    monkeypatch.setattr(engine.loaded.processor, "apply_chat_template", never)
    monkeypatch.setattr("services.model.multimodal.prompt.decode_image", never)
    huge = [Message(role="user", content=ENGLISH * (10_000_000 // len(ENGLISH)))]
    with pytest.raises(PromptTooLong):
        engine.prepare_sync(_request(huge))
    with pytest.raises(PromptTooLong):  # a big prompt plus a max_tokens that leaves it no room
        engine.prepare_sync(_request([Message(role="user", content=ENGLISH * 40_000)], max_tokens=200_000))


def _tool(name: str, words: int) -> Tool:
    params = {"type": "object", "description": "w " * words, "properties": {"a": {"type": "string"}}}
    return Tool(function=FunctionDef(name=name, description="look it up", parameters=params))


def _called(arguments: str) -> Message:
    call = ToolCall(id="c1", function=FunctionCall(name="f0", arguments=arguments))
    return Message(role="assistant", content="", tool_calls=[call])


def test_tools_and_history_calls_count_and_the_bound_stays_under_the_template(engine: Any) -> None:
    from services.model.multimodal.prompt import MediaLimits, build_inputs

    tools = [_tool(f"f{i}", 3000) for i in range(4)]
    messages = [
        Message(role="user", content="call it"),
        _called('{"a": "' + "v " * 5000 + '"}'),
        Message(role="tool", content="done", tool_call_id="c1"),
    ]
    limits = MediaLimits.from_settings(engine.settings)
    rendered = int(build_inputs(engine.loaded.processor, messages, limits, tools)["input_ids"].shape[1])
    tokenizer = engine.loaded.processor.tokenizer
    check_prompt_text(tokenizer, messages, rendered + 1, None, tools)  # never more than the template
    bound = check_prompt_text(tokenizer, messages, 10**9, None, tools)
    assert bound.words_at_least(text_bound.rendered_texts(messages, tools)) > 4 * 3000 + 5000
    with pytest.raises(PromptTooLong):  # the tools' and arguments' words alone pass a smaller context
        check_prompt_text(tokenizer, messages, 4 * 3000 + 5000, None, tools)


def test_the_engine_refuses_huge_tools_or_call_arguments_before_the_template(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the chat template ran on a prompt the cheap bound must refuse")

    monkeypatch.setattr(engine.loaded.processor, "apply_chat_template", never)
    user = Message(role="user", content="hi")
    tools = [_tool(f"f{i}", 30_000) for i in range(128)]  # 128 tools of ~60 KiB: ~3.8 M words
    with pytest.raises(PromptTooLong):
        engine.prepare_sync(GenerateRequest(request_id="r", messages=[user], tools=tools))
    arguments = '{"a": "' + "v " * 500_000 + '"}'  # 1 MB of arguments sent back in the history
    with pytest.raises(PromptTooLong):
        engine.prepare_sync(_request([user, _called(arguments), Message(role="user", content="and?")]))


def _request(messages: list[Message], **sampling: Any) -> GenerateRequest:
    return GenerateRequest(request_id="r", messages=messages, sampling=SamplingParams(**sampling))
