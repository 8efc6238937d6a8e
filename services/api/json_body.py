"""Bounded decoding of client JSON bodies, and the one style of ``param`` paths in errors.

Everything a client sends is checked here before any model, schema or store sees it:

- malformed JSON, ``NaN``/``Infinity`` (not JSON, though Python's parser takes them), numbers beyond a
  double (``1e999``) and bytes that are not UTF-8 are a 400 ``invalid_json``;
- nesting deeper than :data:`MAX_DEPTH` levels is a 400 (the parser's own recursion error included), so no
  later recursive code (validation, re-encoding for the model service) can overflow the stack;
- a string or key holding an unpaired UTF-16 surrogate (``"\\ud83d"`` escaped alone: valid JSON, but not
  Unicode text, so it cannot be encoded as UTF-8 for the tokenizer or the store) is a 400 naming its place.

``param`` paths use one style everywhere: ``messages[0].content[1].image_url.url`` (list indexes in brackets,
field names joined by dots), as in the OpenAI API's own errors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from services.api.errors import BadRequest, param_path

# JSON nested deeper than this is refused; real requests (tool schemas included) stay far below.
MAX_DEPTH = 64


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: valid JSON syntax, but no number any field of ours can hold
        raise ValueError("number out of range")
    return value


def parse_json_body(body: bytes) -> Any:
    """Decode a request body and check it (see the module docstring).

    Raises:
        BadRequest: ``invalid_json`` (malformed, non-UTF-8, NaN/Infinity, too deep) or
            ``invalid_unicode`` (an unpaired surrogate), with ``param`` naming the place when known.
    """
    try:
        data = json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise _too_deep(None) from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("malformed JSON in the request body", code="invalid_json") from None
    check_tree(data)
    return data


def check_tree(data: Any) -> None:
    """Walk decoded JSON without recursion: depth at most :data:`MAX_DEPTH`, every string and key UTF-8
    encodable. Raises ``BadRequest`` naming the first offending place."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, str):
            _check_text(value, loc)
            continue
        if isinstance(value, dict):
            children: Iterable[tuple[str | int, Any]] = value.items()
        elif isinstance(value, list):
            children = enumerate(value)
        else:
            continue
        if len(loc) >= MAX_DEPTH:
            raise _too_deep(loc)
        for key, child in children:
            if isinstance(key, str):
                _check_text(key, loc)
            stack.append((child, (*loc, key)))


def _check_text(text: str, loc: tuple[str | int, ...]) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        param = param_path(loc) or None
        raise BadRequest(
            f"{param or 'the request body'} contains an unpaired UTF-16 surrogate (\\ud800-\\udfff escaped "
            "alone), which is not valid Unicode text",
            param=param,
            code="invalid_unicode",
        ) from None


def _too_deep(loc: tuple[str | int, ...] | None) -> BadRequest:
    param = param_path(loc[:MAX_DEPTH]) if loc else None
    return BadRequest(
        f"the request body is nested more than {MAX_DEPTH} levels deep", param=param, code="invalid_json"
    )
