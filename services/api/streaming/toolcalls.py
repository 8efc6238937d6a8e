"""Tool calls in the answer text: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (pure).

The Qwen3 family writes each call as such a block after its reasoning. The parser sees the answer (content)
only, never the reasoning, as it streams: text outside blocks is released at once, except a tail that could
still be the start of ``<tool_call>`` (held until it is decided); a block is held until its closing tag and
then becomes a call when it is a JSON object naming one of the request's tools, or plain content (the block's
whole text, tags included) when it is not: nothing the model wrote is lost. A block left open when the
generation ends is plain content too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True, slots=True)
class Call:
    """A parsed call: the function's name and its arguments as JSON text (an object)."""

    name: str
    arguments: str


Item = str | Call  # answer text, or a call


class ToolCallParser:
    """Incremental parser of one answer. ``feed`` text as it comes, ``finish`` once at the end."""

    def __init__(self, names: Iterable[str]) -> None:
        self._names = frozenset(names)
        self._buf = ""
        self._in_block = False

    @property
    def clean(self) -> bool:
        """True when nothing is held back (every fed character is in an item already returned)."""
        return not self._buf and not self._in_block

    def feed(self, text: str) -> list[Item]:
        """The items that ``text`` (appended to what is held) decides, in order."""
        self._buf += text
        out: list[Item] = []
        while self._buf:
            if self._in_block:
                end = self._buf.find(CLOSE)
                if end < 0:
                    break
                body, self._buf = self._buf[:end], self._buf[end + len(CLOSE) :]
                self._in_block = False
                out.append(self._block(body))
                continue
            start = self._buf.find(OPEN)
            if start >= 0:
                if start:
                    out.append(self._buf[:start])
                self._buf, self._in_block = self._buf[start + len(OPEN) :], True
                continue
            keep = _partial_open(self._buf)
            if len(self._buf) > keep:
                out.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
            break
        return _merge(out)

    def finish(self) -> list[Item]:
        """Everything still held, as plain text (an unfinished block keeps its opening tag)."""
        held = (OPEN if self._in_block else "") + self._buf
        self._buf, self._in_block = "", False
        return [held] if held else []

    def _block(self, body: str) -> Item:
        call = parse_call(body, self._names)
        return call if call is not None else OPEN + body + CLOSE


def parse_call(body: str, names: frozenset[str]) -> Call | None:
    """The call a block's body stands for, or None (not JSON, not an object, an unknown name, arguments
    that are not an object)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return Call(name=data["name"], arguments=json.dumps(args, ensure_ascii=False))


def call_id(chunk_id: str, index: int) -> str:
    """The id of a session's ``index``-th call: derived, so a takeover rebuilds the same chunks."""
    return "call_" + hashlib.sha256(f"{chunk_id}:{index}".encode()).hexdigest()[:24]


def _partial_open(text: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``<tool_call>``."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return k
    return 0


def _merge(items: list[Item]) -> list[Item]:
    out: list[Item] = []
    for item in items:
        if isinstance(item, str) and out and isinstance(out[-1], str):
            out[-1] += item
        elif item != "":
            out.append(item)
    return out
