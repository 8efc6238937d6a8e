"""A cheap lower bound on a prompt's text tokens, checked before any media decoding, chat template or
full tokenization, so that a prompt far over the context is refused for the cost of about one context's
worth of text, not its whole size (a 10 MB prompt used to cost ~15 s of engine CPU and 1.4 GB first).

Two bounds, each stopping as soon as it passes the budget:

1. *Words* (maximal runs of non-whitespace): a byte-level BPE never joins two of them into one token (no
   pre-token of Qwen's tokenizer spans whitespace between two non-whitespace runs), so words <= tokens.
   ``str.split`` over 256 KiB pieces: ~20 ms per MB.
2. *Tokens, piecewise*: the text is tokenized in ~64 KiB pieces cut at pre-token boundaries (BPE never
   merges across them), so the pieces' counts add up to the whole text's count. Only run when the text's
   UTF-8 size could exceed the budget (a token is at least one byte) and the word bound did not decide:
   text without spaces (CJK, long blobs).

Assistant text before its last ``</think>`` is left out (Thinking templates drop earlier reasoning), and
one token of slack is given per piece boundary, so the bound never exceeds what the template renders.
The tool definitions (as the template's ``tojson`` writes them) and the history calls' arguments (rendered
as sent) count too: 128 tools of 64 KiB each are 8 MiB of prompt. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from services.protocol.errors import PromptTooLong
from services.protocol.generate import Message, TextPart, Tool

WORD_PIECE_CHARS = 256 * 1024
TOKEN_PIECE_CHARS = 64 * 1024
THINK_END = "</think>"


@dataclass(slots=True)
class TextBound:
    """Counts against ``budget`` tokens; ``chars_tokenized`` is the work the BPE step did (characters)."""

    tokenizer: Any  # a transformers fast tokenizer (``backend_tokenizer``), or None: words only
    budget: int
    chars_tokenized: int = 0

    def words_at_least(self, texts: list[str]) -> int:
        """A lower bound on the tokens of ``texts`` by words; stops once it passes the budget."""
        total = 0
        for text in texts:
            for start in range(0, len(text), WORD_PIECE_CHARS):
                # a word cut by a piece boundary is counted twice: one of slack per boundary
                total += len(text[start : start + WORD_PIECE_CHARS].split()) - (1 if start else 0)
                if total > self.budget:
                    return total
        return total

    def tokens_at_least(self, texts: list[str]) -> int:
        """The tokens of ``texts`` (each alone) by piecewise BPE; stops once the count passes the budget."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return 0
        total = 0
        for text in texts:
            for piece in _pieces(backend, text):
                self.chars_tokenized += len(piece)
                total += len(backend.encode(piece, add_special_tokens=False).ids)
                if total > self.budget:
                    return total
        return total


def _pieces(backend: Any, text: str) -> Iterator[str]:
    """``text`` in consecutive pieces of about TOKEN_PIECE_CHARS, each ending at a pre-token boundary."""
    start = 0
    while len(text) - start > TOKEN_PIECE_CHARS:
        window = text[start : start + TOKEN_PIECE_CHARS]
        spans = backend.pre_tokenizer.pre_tokenize_str(window)
        # The last pre-tokens of a window may end differently in the whole text (lookahead at its end):
        # cut before the second-to-last one. A window that is one pre-token (no boundary) goes whole.
        cut = spans[-2][1][0] if len(spans) >= 3 else len(window)
        cut = cut or len(window)
        yield window[:cut]
        start += cut
    if start < len(text):
        yield text[start:]


def rendered_texts(messages: list[Message], tools: Sequence[Tool] = ()) -> list[str]:
    """The texts a chat template renders in full: each tool as JSON (``tojson``'s form), the messages'
    text (assistant text only after its last ``</think>``) and the history calls' arguments."""
    texts = [json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools]
    for message in messages:
        texts.extend(c.function.arguments for c in message.tool_calls or () if c.function.arguments)
        parts = [message.content] if isinstance(message.content, str) else message.content
        for part in parts:
            text = part if isinstance(part, str) else part.text if isinstance(part, TextPart) else ""
            if message.role == "assistant" and THINK_END in text:
                text = text.rsplit(THINK_END, 1)[1]
            if text:
                texts.append(text)
    return texts


def check_prompt_text(
    tokenizer: Any,
    messages: list[Message],
    context: int,
    max_tokens: int | None,
    tools: Sequence[Tool] = (),
) -> TextBound:
    """Raise ``PromptTooLong`` when the messages' and tools' text alone cannot fit ``context`` tokens
    together with ``max_tokens`` (None: one token). Cheap: see the module docstring. Returns the counter
    (its ``chars_tokenized`` tells the work done); the exact check follows once the prompt is built."""
    if max_tokens is not None and max_tokens >= context:
        raise PromptTooLong(
            f"max_tokens ({max_tokens}) leaves no room for the prompt in the model's context of "
            f"{context} tokens"
        )
    budget = context - (max_tokens or 1)
    bound = TextBound(tokenizer, budget)
    texts = rendered_texts(messages, tools)
    slack = len(texts)  # one token per text for how it meets the template around it
    if sum(len(t) for t in texts) * 4 <= budget:  # <= 4 UTF-8 bytes per character, >= 1 byte per token
        return bound
    words = bound.words_at_least(texts) - slack
    if words > budget:
        raise PromptTooLong(_message(words, context, max_tokens))
    if sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) <= budget + slack:
        return bound
    tokens = bound.tokens_at_least(texts) - slack
    if tokens > budget:
        raise PromptTooLong(_message(tokens, context, max_tokens))
    return bound


def _message(at_least: int, context: int, max_tokens: int | None) -> str:
    room = f" with max_tokens ({max_tokens})" if max_tokens is not None else ""
    head = f"the prompt (at least {at_least} tokens) does not fit"
    return f"{head} the model's context of {context} tokens{room}"
