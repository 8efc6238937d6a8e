"""The fake engine's deterministic "model": prompt rendering, words from the prompt and seed, stop strings.

Prompt "tokens" are the words of the rendered messages (each image counts 64, each video 128). The output is
derived from the prompt text and the seed only: some reasoning words, ``</think>`` (one token, no text), then
answer words, then end of sequence ("stop"). Stop strings apply to the answer only, as in the real engine.
Directives anywhere in the prompt, for tests:

- ``[[fake:tokens=N]]``  N text tokens (``</think>`` included) before the end-of-sequence token, instead
                         of 14-44; completion_tokens is then N + 1 (EOS counts, as with the real model)
- ``[[fake:error]]``     fail with finish_reason "error" after three tokens
- ``[[fake:tool_call]]`` with tools and ``tool_choice: auto``: the answer calls the first tool

A structured answer (``fake_structured.py``: JSON for a response format, a ``<tool_call>`` block for a forced
call) replaces the answer words; ``max_reasoning_tokens`` caps the reasoning words before ``</think>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from services.model.engine.base import FinalOutput, LogprobEntry, Output, Prepared, TokenLogprobs, TokenOutput
from services.model.engine.choices import ChoiceGroup
from services.protocol.errors import InvalidMedia
from services.protocol.generate import ImagePart, Message, TextPart, choice_seed

THINK_END = "</think>"
IMAGE_TOKENS = 64
VIDEO_TOKENS = 128
ERROR_AFTER_TOKENS = 3
_WORDS = (
    "the cat sits on a warm mat while light falls through an open window and the room stays quiet",
    "a small dog waits by the door for someone to come home with bread and milk after the rain stops",
)
_VOCAB = " ".join(_WORDS).split()
_TOKENS_DIRECTIVE = re.compile(r"\[\[fake:tokens=(\d+)\]\]")


@dataclass(slots=True)
class FakeInputs:
    text: str
    fail: bool
    length: int
    answer: list[str] | None = None  # a structured answer's "tokens", replacing the answer words
    reasoning_budget: int | None = None


def fake_inputs(text: str, seed: int | None) -> FakeInputs:
    """The fake's "processor output" for a rendered prompt: its text, the error directive, its length."""
    match = _TOKENS_DIRECTIVE.search(text)
    length = int(match.group(1)) if match else _natural_length(text, seed)
    return FakeInputs(text=text, fail="[[fake:error]]" in text, length=max(1, length))


@dataclass(slots=True)
class FakeRow:
    """One running request of the fake engine (touched by the engine thread only)."""

    prepared: Prepared
    submitted_at: float
    words: Iterator[str]
    stops: list[str]
    text: str = ""  # everything generated so far, the </think> marker included
    emitted: int = 0  # how much of ``text`` went out already
    generated: int = 0
    unreported: int = 0  # tokens not yet accounted for in a TokenOutput
    done: bool = False
    logprobs: TokenLogprobs | None = None  # entries of the unreported tokens (top_logprobs set)
    index: int = 0  # the choice this row generates
    group: ChoiceGroup | None = None  # the request's choices (set by the engine)

    @property
    def request_id(self) -> str:
        return self.prepared.request_id


# --- rows: generation, stop strings, outputs -----------------------------------------------------------
def new_row(prepared: Prepared, submitted_at: float, index: int = 0) -> FakeRow:
    """The row of choice ``index``: its words come from the prompt and ``choice_seed(seed, index)`` (an
    unseeded request's choices differ by their index), so every choice of a seeded request is
    reproducible and the choices differ from one another."""
    inputs: FakeInputs = prepared.inputs
    seed = prepared.sampling.seed
    key: int | str | None = choice_seed(seed, index) if seed is not None or index == 0 else f"choice-{index}"
    words = _words(inputs.text, key, inputs.length, inputs.answer, inputs.reasoning_budget)
    stops = [s for s in prepared.sampling.stop if s]
    return FakeRow(prepared=prepared, submitted_at=submitted_at, words=words, stops=stops, index=index)


def advance(row: FakeRow) -> list[tuple[str, Output]]:
    """Generate one token: this step's outputs for the row, its FinalOutput last when it ends."""
    inputs: FakeInputs = row.prepared.inputs
    if inputs.fail and row.generated >= ERROR_AFTER_TOKENS:
        return finish(row, "error", "fake engine failure")
    word = next(row.words, None)
    row.generated += 1
    row.unreported += 1
    _keep_logprob(row, word)
    if word is None:  # end of sequence: the EOS token counts, like the real model's <|im_end|>
        return finish(row, "stop")
    row.text += word
    content_start = _content_start(row.text)
    cut = _first_stop(row.text, row.stops, content_start, row.emitted)
    if cut is not None:
        row.text = row.text[:cut]
        return finish(row, "stop")
    if row.generated >= row.prepared.sampling.max_tokens:
        return finish(row, "length")
    upto = len(row.text) - _held_back(row.text[content_start:], row.stops)
    if upto <= row.emitted and not row.unreported:
        return []
    return [(row.request_id, _output(row, upto))]


def finish(row: FakeRow, reason: str, error: str | None = None) -> list[tuple[str, Output]]:
    """Flush held-back text (and unreported tokens), then the FinalOutput."""
    row.done = True
    out: list[tuple[str, Output]] = []
    if row.emitted < len(row.text) or row.unreported or row.logprobs is not None:
        out.append((row.request_id, _output(row, len(row.text))))
    out.append((row.request_id, final(row, reason, error)))
    return out


def _output(row: FakeRow, upto: int) -> TokenOutput:
    """The text between what was emitted and ``upto``, split around the ``</think>`` marker."""
    start, row.emitted = row.emitted, max(row.emitted, upto)
    marker = row.text.find(THINK_END)
    if marker < 0:
        reasoning, content = row.text[start : row.emitted], ""
    else:
        reasoning = row.text[start : min(row.emitted, marker)]
        content = row.text[max(start, marker + len(THINK_END)) : row.emitted]
    tokens, row.unreported = row.unreported, 0
    logprobs, row.logprobs = row.logprobs, None
    return TokenOutput(reasoning=reasoning, content=content, tokens=tokens, logprobs=logprobs)


def _keep_logprob(row: FakeRow, word: str | None) -> None:
    """The fake's logprob entry of the token ``word`` (None: end of sequence), held until the row's next
    output: a reasoning token until ``</think>`` (itself included), then an answer token."""
    k = row.prepared.sampling.top_logprobs
    if k is None:
        return
    if row.logprobs is None:
        row.logprobs = TokenLogprobs([], [])
    reasoning = THINK_END not in row.text
    entry = fake_logprob(word, row.generated, k)
    (row.logprobs.reasoning if reasoning else row.logprobs.content).append(entry)


def fake_logprob(word: str | None, position: int, k: int) -> LogprobEntry:
    """A deterministic entry: the token (``<|im_end|>``, a special token without bytes, for None) with a
    log-probability from its text and position, and ``k`` candidates sorted most likely first, the token
    itself first among them."""
    digest = hashlib.blake2b(f"{position}\x00{word}".encode("utf-8", "surrogatepass"), digest_size=4).digest()
    logprob = -(int.from_bytes(digest, "big") % 1000) / 400.0
    token = (
        (word, logprob, word.encode("utf-8", "surrogatepass"))
        if word is not None
        else ("<|im_end|>", logprob, None)
    )
    others = [w for w in _VOCAB if w != word][: max(k - 1, 0)]
    tops = [token[:3]] if k else []
    tops += [(" " + w, logprob - 0.5 * (i + 1), (" " + w).encode()) for i, w in enumerate(others)]
    return (*token, tuple(tops))


def final(row: FakeRow, reason: str, error: str | None = None) -> FinalOutput:
    return FinalOutput(reason, row.prepared.prompt_tokens, row.generated, error)


def _content_start(text: str) -> int:
    """Where the answer begins (after ``</think>``); the end of the text while still reasoning."""
    marker = text.find(THINK_END)
    return len(text) if marker < 0 else marker + len(THINK_END)


def _first_stop(text: str, stops: list[str], content_start: int, emitted: int) -> int | None:
    """Earliest start of a stop string in the answer, searching only what could not match before.

    Like the real engine, stop strings apply to the answer only: reasoning routinely contains them."""
    best: int | None = None
    for stop in stops:
        idx = text.find(stop, max(content_start, emitted - len(stop) + 1))
        if idx >= 0 and (best is None or idx < best):
            best = idx
    return best


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


# --- prompt and output text ----------------------------------------------------------------------------
def render(messages: list[Message]) -> tuple[str, int]:
    """The chat-template-like prompt text and the media token count; media must be valid base64."""
    lines: list[str] = []
    media_tokens = 0
    for message in messages:
        parts = [TextPart(text=message.content)] if isinstance(message.content, str) else message.content
        pieces: list[str] = []
        for part in parts:
            if isinstance(part, TextPart):
                pieces.append(part.text)
                continue
            for data in getattr(part, "frames", None) or [part.data]:  # a frame-list video: each frame
                _check_base64(data, part.type)
            is_image = isinstance(part, ImagePart)
            media_tokens += IMAGE_TOKENS if is_image else VIDEO_TOKENS
            pieces.append("<image>" if is_image else "<video>")
        lines.append(f"<|im_start|>{message.role}\n{' '.join(pieces)}<|im_end|>")
    lines.append("<|im_start|>assistant\n<think>\n")
    return "\n".join(lines), media_tokens


def _check_base64(data: str, kind: str) -> None:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidMedia(f"{kind} data is not valid base64") from exc
    if not raw:
        raise InvalidMedia(f"{kind} data is empty")


def _rng(text: str, seed: int | str | None) -> random.Random:
    # surrogatepass: a lone surrogate in a prompt (valid JSON) must not fail the row.
    digest = hashlib.blake2b(f"{seed}\x00{text}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _natural_length(text: str, seed: int | None) -> int:
    rng = _rng(text, seed)
    return rng.randint(8, 24) + 1 + rng.randint(5, 19)


def _words(
    text: str,
    seed: int | str | None,
    length: int,
    answer: list[str] | None = None,
    reasoning_budget: int | None = None,
) -> Iterator[str]:
    """``length`` tokens: reasoning words (at most ``reasoning_budget``), ``</think>``, then answer words
    ending with a full stop, or the structured ``answer``'s tokens."""
    rng = _rng(text, seed)
    thinking = max(0, (length - 1) // 2)
    if reasoning_budget is not None:
        thinking = min(thinking, reasoning_budget)
    for i in range(thinking):
        yield ("" if i == 0 else " ") + rng.choice(_VOCAB)
    if answer is not None:
        yield THINK_END
        yield from answer
        return
    if length > thinking:
        yield THINK_END
    count = length - thinking - 1
    for i in range(count):
        word = rng.choice(_VOCAB)
        if i == 0:
            yield "\n\n" + word.capitalize()
        else:
            yield " " + word + ("." if i == count - 1 else "")
