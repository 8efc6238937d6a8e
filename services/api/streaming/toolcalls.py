"""Tool calls in the answer text: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (pure).

The Qwen3 family writes each call as such a block after its reasoning. The parser sees the answer (content)
only, never the reasoning, as it streams: text outside blocks is released at once, except a tail that could
still be the start of ``<tool_call>`` (held until it is decided); a block is held until its closing tag and
then becomes a call when it is a JSON object naming one of the request's tools, or plain content (the block's
whole text, tags included) when it is not: nothing the model wrote is lost. A block left open when the
generation ends is plain content too.

The model's text is not trusted: a block longer than ``MAX_BLOCK_CHARS`` (released as plain content as soon
as it grows past the bound), nested deeper than ``MAX_BLOCK_DEPTH``, or whose ``name`` is not a string is
plain content; parsing never raises. With ``max_calls`` (``parallel_tool_calls: false`` allows one call),
blocks after the allowed calls are plain content too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_BLOCK_CHARS = 256 * 1024  # a block's body (characters) beyond which it is plain content
MAX_BLOCK_DEPTH = 64  # JSON nesting (objects and arrays) beyond which a block is plain content
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


@dataclass(frozen=True, slots=True)
class Call:
    """A parsed call: the function's name and its arguments as JSON text (an object)."""

    name: str
    arguments: str


Item = str | Call  # answer text, or a call


class ToolCallParser:
    """Incremental parser of one answer. ``feed`` text as it comes, ``finish`` once at the end.

    ``names``: the tools a call may name. ``max_calls``: how many calls the answer may make (None: any);
    ``calls`` counts those made so far (a takeover sets it to the calls already stored).
    """

    def __init__(self, names: Iterable[str], max_calls: int | None = None) -> None:
        self._names = frozenset(names)
        self._max_calls = max_calls
        self.calls = 0
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
                if end < 0 and len(self._buf) > MAX_BLOCK_CHARS + len(CLOSE):
                    out.append(OPEN + self._buf)  # too long to be a call: plain content from here on
                    self._buf, self._in_block = "", False
                    continue
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
        allowed = self._max_calls is None or self.calls < self._max_calls
        call = parse_call(body, self._names) if allowed else None
        if call is None:
            return OPEN + body + CLOSE
        self.calls += 1
        return call


def parse_call(body: str, names: frozenset[str]) -> Call | None:
    """The call a block's body stands for, or None (not JSON, not an object, a name that is not one of
    ``names``, arguments that are not an object, a body over ``MAX_BLOCK_CHARS`` or nested deeper than
    ``MAX_BLOCK_DEPTH``). Never raises."""
    if len(body) > MAX_BLOCK_CHARS or _depth(body) > MAX_BLOCK_DEPTH:
        return None
    data = _loads(body)
    if not isinstance(data, dict):
        return None
    name = data.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        if _depth(args) > MAX_BLOCK_DEPTH:
            return None
        args = _loads(args)
    if not isinstance(args, dict):
        return None
    text = json.dumps(args, ensure_ascii=False)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape: keep it escaped
            text = json.dumps(args)
    return Call(name=name, arguments=text)


def _loads(text: str) -> object:
    """``json.loads(text)``, or None for anything it refuses (recursion is bounded by ``_depth`` first,
    and caught here as a last resort)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _depth(text: str) -> int:
    """The deepest nesting of JSON brackets in ``text``, ignoring brackets inside strings (an upper
    bound when ``text`` is not JSON)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub("", text)):
        depth = depth + 1 if bracket in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


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
