"""A cheap check of a JSON schema before the grammar compiler sees it (pure, torch-free).

xgrammar's compile time grows with what a schema asks of it, not with its size: six properties with
``{"pattern": "[a-z]{1,4000}"}`` (a 408-character schema) took 5-6 s on xgrammar 0.2.9, while a
200-property object takes 40 ms. The costly part is a regular expression's repetition counts (each count
becomes states of the automaton, checked against the whole vocabulary). Refused here, before any compile
(400 naming the parameter):

- a schema over ``MAX_SCHEMA_CHARS`` serialized, or with more than ``MAX_SCHEMA_NODES`` objects, arrays and
  values in all;
- a ``pattern`` (or a ``patternProperties`` key) longer than ``MAX_PATTERN_CHARS``;
- a repetition ``{m}``, ``{m,}`` or ``{m,n}`` in a pattern with a count over ``MAX_PATTERN_REPEAT``, or
  repetition counts adding up to more than ``MAX_TOTAL_REPEAT`` over the whole schema.

What passes may still be slow in ways no cheap rule sees: the compile also has a deadline
(``GRAMMAR_COMPILE_SECONDS``, see ``grammar.py``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from services.protocol.errors import InvalidSchema

MAX_SCHEMA_CHARS = 64 * 1024  # the api's bound on one schema, serialized
MAX_SCHEMA_NODES = 4096  # objects, arrays and values of one schema
MAX_PATTERN_CHARS = 512  # one regular expression
MAX_PATTERN_REPEAT = 128  # one repetition count
MAX_TOTAL_REPEAT = 512  # the repetition counts of all of a schema's patterns together
_REPEAT = re.compile(r"(?<!\\)\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def check_schema(schema: Any, param: str) -> None:
    """Refuse a schema too costly to compile (see the module docstring); ``param`` is the public path the
    error names (``response_format``, ``tools[i].function.parameters``).

    Raises:
        InvalidSchema: the message starts with ``param``, then says which limit the schema passes.
    """
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise InvalidSchema(f"{param}: the JSON schema is over {MAX_SCHEMA_CHARS} characters")
    nodes, total = 0, 0
    stack = [schema]
    while stack:
        node = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise InvalidSchema(f"{param}: the JSON schema has over {MAX_SCHEMA_NODES} nodes")
        if isinstance(node, dict):
            for pattern in _patterns(node):
                total += _repeats(pattern, param)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    if total > MAX_TOTAL_REPEAT:
        raise InvalidSchema(
            f"{param}: the JSON schema is too complex: its patterns' repetition counts add up to {total} "
            f"(at most {MAX_TOTAL_REPEAT})"
        )


def _patterns(node: dict[str, Any]) -> list[str]:
    """The regular expressions a schema object holds: its ``pattern`` and its ``patternProperties`` keys."""
    out = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
    props = node.get("patternProperties")
    if isinstance(props, dict):
        out.extend(props)
    return out


def _repeats(pattern: str, param: str) -> int:
    """The sum of ``pattern``'s repetition counts (the larger bound of each; the lower of an open one)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidSchema(f"{param}: a pattern is over {MAX_PATTERN_CHARS} characters")
    total = 0
    for low, high in _REPEAT.findall(pattern):
        count = max(int(low), int(high) if high else 0)
        if count > MAX_PATTERN_REPEAT:
            raise InvalidSchema(
                f"{param}: the JSON schema is too complex: a pattern repeats {count} times "
                f"(at most {MAX_PATTERN_REPEAT})"
            )
        total += count
    return total
