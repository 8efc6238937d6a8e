"""Incremental detokenization with the real Qwen tokenizer (from the tiny checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.model.engine.detokenize import IncrementalDetokenizer, Piece, TokenTable

THINK, END_THINK, IM_END, EOT = 151667, 151668, 151645, 151643

TEXTS = [
    "Hello 世界! 你好，今天天气很好。",
    "emoji 🎉👩‍👩‍👧 family, flags 🇫🇷🇯🇵 and 👍🏽",
    "combining: e\u0301 a\u0308 n\u0303 — Zalgo z\u0351\u0352\u0353o",
    "日本語のテキストとカタカナ、한국어 텍스트, Ελληνικά, עברית",
    "mixed 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ and code `x = 1`\n\tend",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def table(tokenizer: Any) -> TokenTable:
    return TokenTable.from_tokenizer(tokenizer, 151_936)


def _feed(table: TokenTable, ids: list[int], **kwargs: Any) -> list[Piece]:
    detok = IncrementalDetokenizer(table, **kwargs)
    pieces = []
    for token in ids:
        pieces.append(detok.push(token))
        if pieces[-1].stopped:
            return pieces
    pieces.append(detok.finish())
    return pieces


def _joined(pieces: list[Piece]) -> tuple[str, str]:
    return "".join(p.reasoning for p in pieces), "".join(p.content for p in pieces)


def test_table_knows_the_think_tags(table: TokenTable) -> None:
    assert (table.think_start_id, table.think_end_id) == (THINK, END_THINK)
    assert table.piece(IM_END) == b"" and table.piece(EOT) == b""
    assert table.piece(151_900) == b""  # model vocabulary beyond the tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_equals_full_decode(tokenizer: Any, table: TokenTable, text: str) -> None:
    ids = tokenizer.encode(text)
    assert len(ids) > 8
    for in_reasoning in (True, False):
        pieces = _feed(table, ids, in_reasoning=in_reasoning)
        chunks = [p.reasoning if in_reasoning else p.content for p in pieces]
        assert "".join(chunks) == tokenizer.decode(ids)  # NFC-normalised: not always `text`
        assert not any("\ufffd" in c for c in chunks)


def test_multi_byte_characters_span_several_tokens(tokenizer: Any, table: TokenTable) -> None:
    ids = tokenizer.encode(TEXTS[1])
    pieces = _feed(table, ids, in_reasoning=False)
    assert any(p.content == "" for p in pieces[:-1])  # some tokens carry only part of a character


@pytest.mark.parametrize("text", TEXTS[:3])
def test_end_think_splits_reasoning_and_content_at_every_boundary(
    tokenizer: Any, table: TokenTable, text: str
) -> None:
    ids = tokenizer.encode(text)
    for cut in range(len(ids) + 1):
        head, tail = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:])
        if "\ufffd" in head + tail:
            continue  # the tag cannot sit inside a character
        pieces = _feed(table, [THINK, *ids[:cut], END_THINK, *ids[cut:], IM_END])
        assert _joined(pieces) == (head, tail)


def test_later_tags_are_ordinary_text(tokenizer: Any, table: TokenTable) -> None:
    ids = tokenizer.encode("a")
    pieces = _feed(table, [*ids, THINK, END_THINK, *ids, END_THINK])
    assert _joined(pieces) == ("a<think>", "a</think>")


def test_special_tokens_are_not_emitted(tokenizer: Any, table: TokenTable) -> None:
    ids = tokenizer.encode("hi")
    pieces = _feed(table, [151644, *ids, 151655, IM_END, EOT], in_reasoning=False)
    assert _joined(pieces) == ("", "hi")


def test_stop_strings_across_token_boundaries(tokenizer: Any, table: TokenTable) -> None:
    text = "The answer is 42. END of story; 世界🎉 done"
    ids = tokenizer.encode(text)
    for start in range(len(text) - 1):
        for length in (2, 3, 5, 7):
            stop = text[start : start + length]
            if len(stop) < 2:
                continue
            cut = text.index(stop)
            pieces = _feed(table, ids, stop=["@@never", stop], in_reasoning=False)
            assert pieces[-1].stopped, stop
            assert _joined(pieces) == ("", text[:cut]), stop
            assert not any("\ufffd" in p.content for p in pieces)


def test_stop_prefix_is_held_back_then_released(tokenizer: Any, table: TokenTable) -> None:
    ids = tokenizer.encode("abc END")
    detok = IncrementalDetokenizer(table, stop=["ENDX"], in_reasoning=False)
    emitted = "".join(detok.push(t).content for t in ids)
    assert emitted == "abc "  # " END" may still become "ENDX"
    tail = detok.finish()
    assert not tail.stopped and emitted + tail.content == "abc END"


def test_stop_strings_do_not_apply_to_reasoning(tokenizer: Any, table: TokenTable) -> None:
    ids = tokenizer.encode("line one\nline two")
    answer = tokenizer.encode("yes\nno")
    pieces = _feed(table, [*ids, END_THINK, *answer], stop=["\n"])
    assert pieces[-1].stopped
    assert _joined(pieces) == ("line one\nline two", "yes")


# A hand-made table for byte sequences a random model can produce: pieces that never complete a character.
LEAD3, CONT, ASCII_A, LEAD2_CONT, STRAY, END = 0, 1, 2, 3, 4, 5
BYTES = TokenTable(pieces=(b"\xe4", b"\xbd", b"a", b"\xe4\xbd", b"\x80", b""), think_end_id=END)


def _run(ids: list[int], in_reasoning: bool = False, stop: tuple[str, ...] = ()) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(BYTES, stop, in_reasoning=in_reasoning)
    texts = []
    for token in ids:
        piece = detok.push(token)
        texts.append(piece.reasoning + piece.content)
    tail = detok.finish()
    return texts, tail.reasoning + tail.content


@pytest.mark.parametrize("in_reasoning", [True, False])
@pytest.mark.parametrize("stop", [(), ("zz",)])
def test_broken_utf8_is_released_as_replacement_once_proven_broken(
    in_reasoning: bool, stop: tuple[str, ...]
) -> None:
    # A lead byte followed by ASCII can never complete: U+FFFD comes out with the 'a', not later.
    assert _run([LEAD3, ASCII_A], in_reasoning, stop) == (["", "\ufffda"], "")
    # A stray continuation byte is invalid at once.
    assert _run([STRAY, ASCII_A], in_reasoning, stop) == (["\ufffd", "a"], "")
    # Two of three bytes, then the request ends: one replacement at finish, nothing lost or doubled.
    assert _run([LEAD2_CONT], in_reasoning, stop) == ([""], "\ufffd")
    assert _run([LEAD3, CONT], in_reasoning, stop) == (["", ""], "\ufffd")
    # A held partial character followed by a new lead byte: the old one is released, the new one held.
    assert _run([LEAD3, LEAD3, ASCII_A], in_reasoning, stop) == (["", "\ufffd", "\ufffda"], "")


def test_partial_character_before_end_think_stays_reasoning() -> None:
    detok = IncrementalDetokenizer(BYTES, in_reasoning=True)
    assert detok.push(LEAD3) == Piece()
    assert detok.push(END) == Piece(reasoning="\ufffd")  # flushed into the reasoning, not the answer
    assert detok.push(ASCII_A) == Piece(content="a")
    assert detok.finish() == Piece()
