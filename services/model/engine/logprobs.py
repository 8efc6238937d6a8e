"""Logprob entries of generated tokens: built in the engine from the sampler's numbers, turned into the
protocol's ``DeltaLogprobs`` by the model service. Torch-free (the engine process's parent imports it).

What the numbers are is the sampler's business (``BatchSampler.logprobs``): the log-softmax over the whole
vocabulary of the logits the token was drawn from, after penalties, grammar masks and temperature, before
top-k / top-p truncation. A token that could not be drawn (a masked one) has ``FLOOR`` instead of -inf
(JSON has no infinity; the OpenAI API uses the same number).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.model.engine.base import Candidate, LogprobEntry, TokenLogprobs
from services.model.engine.detokenize import TokenTable
from services.protocol.events import DeltaLogprobs, TokenLogprob, TopLogprob

FLOOR = -9999.0


def candidate(table: TokenTable, token_id: int, logprob: float) -> Candidate:
    """A token's text (a special token by its name), ``logprob`` (within ``[FLOOR, 0]``; NaN, from a row
    whose every token was masked, is ``FLOOR`` too) and its bytes (None for a special token). Text that is
    not valid UTF-8 alone (part of a character) shows U+FFFD; the bytes are exact."""
    logprob = min(float(logprob), 0.0) if float(logprob) >= FLOOR else FLOOR  # NaN >= FLOOR is False
    name = table.special_names.get(token_id)
    if name is not None:
        return name, logprob, None
    raw = table.piece(token_id)
    return raw.decode("utf-8", "replace"), logprob, raw


def entries(
    table: TokenTable,
    tokens: Sequence[int],
    chosen: Sequence[float],
    top_ids: Sequence[Sequence[int]],
    top_values: Sequence[Sequence[float]],
) -> list[LogprobEntry]:
    """One entry per row: its token ``tokens[i]`` with ``chosen[i]`` and its top candidates (ids and
    log-probs, most likely first; empty lists for ``top_logprobs=0``)."""
    out: list[LogprobEntry] = []
    for token, lp, ids, values in zip(tokens, chosen, top_ids, top_values, strict=True):
        tops = tuple(candidate(table, t, v) for t, v in zip(ids, values, strict=True))
        out.append((*candidate(table, token, lp), tops))
    return out


def to_delta_logprobs(logprobs: TokenLogprobs) -> DeltaLogprobs:
    """The protocol form of an output's entries (what a ``Delta`` carries)."""
    return DeltaLogprobs(
        reasoning=[_entry(e) for e in logprobs.reasoning], content=[_entry(e) for e in logprobs.content]
    )


def merge(first: TokenLogprobs | None, later: TokenLogprobs | None) -> TokenLogprobs | None:
    """Entries of two consecutive outputs of one request, in order (either may be None)."""
    if first is None or later is None:
        return first if later is None else later
    return TokenLogprobs(first.reasoning + later.reasoning, first.content + later.content)


def _entry(entry: LogprobEntry) -> TokenLogprob:
    token, logprob, raw, tops = entry
    return TokenLogprob(
        token=token,
        logprob=logprob,
        bytes=None if raw is None else list(raw),
        top_logprobs=[
            TopLogprob(token=t, logprob=v, bytes=None if b is None else list(b)) for t, v, b in tops
        ],
    )
