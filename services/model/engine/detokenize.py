"""Incremental, UTF-8-safe detokenization of one request's generated tokens.

Works on bytes: a :class:`TokenTable` maps every token id to the bytes it stands for (byte-level BPE pieces
through the GPT-2 byte alphabet, added tokens through their text, special tokens to nothing), and an
incremental UTF-8 decoder holds back the bytes of a character that is not complete yet. One dictionary lookup
and one small decode per token: no tokenizer call per step, so the cost does not grow with the text.

Reasoning / content: generation starts in the reasoning part (the Thinking template's prompt opens
``<think>``); the first ``</think>`` token switches to the content part. Neither tag is emitted; a ``<think>``
as the very first generated token is dropped too. Later occurrences are ordinary text.

Stop strings apply to the content (the visible answer) only: a thinking model's reasoning routinely contains
strings such as ``"\\n"`` that a user means for the answer. Content that could still become a stop string is
held back until it is disambiguated; on a match the text before it is emitted, the stop string is not, and the
request is finished (``stopped``).
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def _byte_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, reversed: printable Latin-1 bytes stand for themselves, the other 68
    byte values are shifted to code points 256 and up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


@dataclass(frozen=True, slots=True)
class TokenTable:
    """What each token id stands for, shared by all requests of one tokenizer."""

    pieces: tuple[bytes, ...]
    think_start_id: int | None = None
    think_end_id: int | None = None
    special_names: Mapping[int, str] = field(default_factory=dict)  # special tokens (no text) by id

    def piece(self, token_id: int) -> bytes:
        return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else b""

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int | None = None) -> TokenTable:
        """Build the table of a transformers tokenizer (about a second for Qwen's 151k tokens)."""
        n = max(len(tokenizer), vocab_size or 0)
        alphabet = _byte_alphabet()
        added = {i: tok for i, tok in tokenizer.added_tokens_decoder.items()}
        special = set(tokenizer.all_special_ids)
        names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        pieces: list[bytes] = []
        for token_id in range(n):
            name = names[token_id] if token_id < len(names) else None
            pieces.append(_piece(tokenizer, token_id, name, added, special, alphabet))
        return cls(
            pieces=tuple(pieces),
            think_start_id=_token_id(tokenizer, "<think>"),
            think_end_id=_token_id(tokenizer, "</think>"),
            special_names={
                **{i: names[i] for i in special if 0 <= i < len(names) and names[i]},
                **{i: tok.content for i, tok in added.items() if tok.special},
            },
        )


def _piece(
    tokenizer: Any,
    token_id: int,
    name: str | None,
    added: dict[int, Any],
    special: set[int],
    alphabet: dict[str, int],
) -> bytes:
    if name is None or token_id in special:
        return b""
    if token_id in added:
        return b"" if added[token_id].special else added[token_id].content.encode()
    if all(ch in alphabet for ch in name):
        return bytes(alphabet[ch] for ch in name)
    # Not a byte-level vocabulary (e.g. SentencePiece): the token's own decoding is the best available.
    return tokenizer.decode([token_id]).encode()


def _token_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer.convert_tokens_to_ids([text])
    unk = getattr(tokenizer, "unk_token_id", None)
    return ids[0] if ids and ids[0] is not None and ids[0] != unk else None


@dataclass(slots=True)
class Piece:
    """Text released by one token (either part may be empty); ``stopped`` when a stop string completed."""

    reasoning: str = ""
    content: str = ""
    stopped: bool = False


class IncrementalDetokenizer:
    """Per-request state: push generated token ids one at a time, then :meth:`finish` once."""

    def __init__(self, table: TokenTable, stop: Sequence[str] = (), in_reasoning: bool = True) -> None:
        self._table = table
        self._stops = tuple(s for s in stop if s)
        self._in_reasoning = in_reasoning
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # content that might be the start of a stop string
        self._first = True
        self.stopped = False

    @property
    def in_reasoning(self) -> bool:
        """True until the first ``</think>`` token (the answer follows it)."""
        return self._in_reasoning

    def push(self, token_id: int) -> Piece:
        first, self._first = self._first, False
        if token_id == self._table.think_start_id and first:
            return Piece()
        if token_id == self._table.think_end_id and self._in_reasoning:
            self._in_reasoning = False
            return Piece(reasoning=self._utf8.decode(b"", final=True))
        text = self._utf8.decode(self._table.piece(token_id))
        if self._in_reasoning:
            return Piece(reasoning=text)
        return self._content(text)

    def finish(self) -> Piece:
        """Release everything still held back (the request ended for another reason than a stop string)."""
        text = self._utf8.decode(b"", final=True)
        if self._in_reasoning:
            return Piece(reasoning=text)
        piece = self._content(text)
        if not piece.stopped:
            piece.content += self._held
            self._held = ""
        return piece

    def _content(self, text: str) -> Piece:
        if self.stopped:
            return Piece(stopped=True)
        pending = self._held + text
        if not self._stops:
            return Piece(content=pending)
        cut = _first_stop(pending, self._stops)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return Piece(content=pending[:cut], stopped=True)
        keep = _partial_stop_length(pending, self._stops)
        self._held = pending[len(pending) - keep :]
        return Piece(content=pending[: len(pending) - keep])


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
