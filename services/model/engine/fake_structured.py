"""The fake engine's structured answers (no torch, no xgrammar): deterministic JSON that satisfies the
request's ``response_format`` schema, or a ``<tool_call>`` block for a forced (or, with the
``[[fake:tool_call]]`` directive, a voluntary) call whose arguments satisfy the tool's parameters.

Covers the schema keywords tests use (``type``, ``enum``, ``const``, ``properties``, ``required``, ``items``,
``minItems``, ``minimum``/``maximum``, ``anyOf``/``oneOf``); a ``type`` it does not know is refused with
``InvalidSchema`` like a schema the real engine's compiler rejects.
"""

from __future__ import annotations

import json
import random
from typing import Any

from services.model.engine.schema_limits import check_schema
from services.protocol.errors import InvalidRequest, InvalidSchema
from services.protocol.generate import GenerateRequest

TOOL_DIRECTIVE = "[[fake:tool_call]]"
_TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}
_DEPTH = 16
_MAX_ITEMS = 64  # the fake writes at most this many array items (a real model is cut by max_tokens)


def structured_answer(request: GenerateRequest, prompt: str, rng: random.Random) -> str | None:
    """The answer text the request's constraint asks for, or None when the answer is free.

    Raises:
        InvalidSchema: a schema uses a ``type`` this fake does not know (naming the parameter).
    """
    mode = request.tool_choice.mode if request.tools else "none"
    if mode == "auto" and TOOL_DIRECTIVE in prompt:
        mode = "required"
    if mode in ("required", "function"):
        chosen = [
            (i, t)
            for i, t in enumerate(request.tools)
            if mode == "required" or t.function.name == request.tool_choice.name
        ]
        if not chosen:
            raise InvalidRequest("`tool_choice` names no function of `tools`")
        index, tool = chosen[0]
        param = f"tools[{index}].function.parameters"
        schema = tool.function.parameters or {"type": "object"}
        arguments = _safe_instance(schema, rng, param)
        call = {"name": tool.function.name, "arguments": arguments}
        return "<tool_call>\n" + json.dumps(call, ensure_ascii=False) + "\n</tool_call>"
    rf = request.response_format
    if rf is None or rf.type == "text":
        return None
    schema = rf.json_schema if rf.type == "json_schema" and rf.json_schema else {"type": "object"}
    return json.dumps(_safe_instance(schema, rng, "response_format"), ensure_ascii=False)


def _safe_instance(schema: Any, rng: random.Random, param: str) -> Any:
    """``instance``, with a schema whose values it cannot use (a non-number bound, ...) refused like one
    the real compiler rejects; one too costly to compile (``check_schema``) is refused the same way."""
    check_schema(schema, param)
    try:
        return instance(schema, rng, param)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise InvalidSchema(f"{param}: the JSON schema cannot be used: {type(exc).__name__}") from None


def instance(schema: Any, rng: random.Random, param: str, depth: int = 0) -> Any:
    """A value valid under ``schema`` (the subset above), chosen with ``rng``."""
    if not isinstance(schema, dict) or depth > _DEPTH:
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return instance(schema[key][0], rng, param, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = kind[0] if kind else "string"
    if kind not in _TYPES:
        raise InvalidSchema(f"{param}: the JSON schema cannot be used: unsupported type {str(kind)[:40]!r}")
    return _value(kind, schema, rng, param, depth)


def _value(kind: str, schema: dict[str, Any], rng: random.Random, param: str, depth: int) -> Any:
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: instance(sub, rng, param, depth + 1) for name, sub in props.items()}
    if kind == "array":
        count = min(max(int(schema.get("minItems", 1)), 0), _MAX_ITEMS)
        return [instance(schema.get("items", {}), rng, param, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        low = int(schema.get("minimum", 0))
        high = max(low, int(schema.get("maximum", low + 9)))
        return rng.randint(low, high)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return rng.choice(["alpha", "beta", "gamma"])


def pieces(text: str, size: int = 4) -> list[str]:
    """``text`` as fake "tokens" of ``size`` characters."""
    return [text[i : i + size] for i in range(0, len(text), size)]
