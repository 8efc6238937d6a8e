"""Tool-call history as the model service takes it: bounded, validated fields, and names rendered as JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.protocol.generate import (
    MAX_ARGUMENTS_CHARS,
    MAX_DESCRIPTION_CHARS,
    MAX_ID_CHARS,
    FunctionCall,
    FunctionDef,
    Message,
    ToolCall,
    ToolChoice,
)


@pytest.mark.parametrize(
    "build",
    [
        lambda: FunctionCall(name='f", "x": "', arguments="{}"),
        lambda: FunctionCall(name="f", arguments="x" * (MAX_ARGUMENTS_CHARS + 1)),
        lambda: FunctionCall(name="f", arguments="\ud800"),
        lambda: ToolCall(id="x" * (MAX_ID_CHARS + 1), function=FunctionCall(name="f", arguments="{}")),
        lambda: ToolCall(id="\udc00", function=FunctionCall(name="f", arguments="{}")),
        lambda: FunctionDef(name="f", description="d" * (MAX_DESCRIPTION_CHARS + 1)),
        lambda: FunctionDef(name="f", description="\ud800"),
        lambda: Message(role="tool", content="r", tool_call_id="i" * (MAX_ID_CHARS + 1)),
        lambda: ToolChoice(mode="function", name='f"'),
    ],
)
def test_the_model_service_refuses_unbounded_or_invalid_tool_fields(build) -> None:
    with pytest.raises(ValidationError):
        build()


def test_a_history_call_renders_as_json_whatever_its_name(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    name = 'get "quoted" \\ name'  # the protocol refuses it; the template must still write valid JSON
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": name, "arguments": "{}"}}],
        },
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    block = re.search(r"<tool_call>\n(.*)\n</tool_call>", text, re.DOTALL)
    assert block is not None, text
    assert json.loads(block.group(1)) == {"name": name, "arguments": {}}
