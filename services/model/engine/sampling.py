"""Vectorized per-row sampling on the whole ``(B, vocab)`` logits tensor of one step.

Every row has its own parameters and its own seeded CPU ``torch.Generator``; a row's token depends only on
its own logits, parameters and generator, never on its batch companions: each sampled row draws exactly one
uniform number per step, and the token is found by inverse CDF in an order fixed by the row's own parameters.

Rows are grouped once per batch change (:meth:`BatchSampler.set_rows`), and every group does only the passes
over the vocabulary it needs (on CPU each pass over a (16, 151936) tensor costs about as much as a decode
step of the tiny model):

- greedy rows: ``argmax``;
- truncating rows (top-k and/or top-p): the sorted head from ``topk``; top-p is applied after top-k on the
  renormalised head (HF / vLLM semantics); rows with top-p only are normalised by the full row's
  log-sum-exp and widen their head (256 -> 4096 -> whole vocabulary) until it holds their top-p mass;
  inverse CDF in descending-probability order;
- rows sampling from the whole distribution: inverse CDF in vocabulary order.

Penalties are sparse (only the tokens a row has seen are touched), applied before everything else:
repetition penalty (HF semantics, prompt + generated tokens) and presence / frequency penalties (OpenAI
semantics, generated tokens). No per-row slices of the logits are kept.

Per-row values are normalised when a :class:`RowSampler` is built (:func:`normalise`), so that no value of
one request can overflow or poison a tensor of the whole batch: ``top_k`` is clamped to ``[0, vocab]``, the
seed is reduced mod 2**64 (what ``torch.Generator.manual_seed`` does itself for every seed it accepts, so
accepted seeds keep their streams), and a non-finite float or a repetition penalty <= 0 is refused with
:class:`InvalidSampling` for that row alone.

Draws are separate from sampling (:func:`draw_step`, then :meth:`BatchSampler.sample` with those draws): a
step that must be retried (a fault isolated row by row) reuses the draws already taken, so every seeded row's
generator still advances exactly once per step.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch.nn.utils.rnn import pad_sequence

from services.model.engine.vocab_ops import row_argmax, row_inverse_cdf, row_topk

# Widths tried, in order, for the head of a top-p-only row.
_HEAD_TIERS = (256, 4096)
# torch.Generator seeds are unsigned 64-bit; manual_seed maps a negative seed s to s + 2**64 itself.
SEED_MODULUS = 2**64
_FLOAT_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


class InvalidSampling(ValueError):
    """A request's sampling value that no normalisation can make meaningful (its row alone is refused)."""


# A temperature below this is greedy (the limit of t -> 0; vLLM draws the line at the same 1e-5): dividing
# logits by a smaller one overflows float32 (1 / 1e-40 is inf) and the distribution turns into NaN.
MIN_TEMPERATURE = 1e-5
# ``repetition_penalty`` acts as at least this: a smaller one is 0 in float32 (1e-300), a division by zero.
MIN_REPETITION_PENALTY = 1e-6


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """Resolved sampling parameters of one request. ``temperature`` below ``MIN_TEMPERATURE`` (0 included)
    means greedy; ``top_k == 0`` and ``top_p == 1`` mean "no truncation"; ``seed=None`` draws a random
    seed."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def counts_generated(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def penalised(self) -> bool:
        return self.counts_generated or self.repetition_penalty != 1.0

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


def normalise(config: SamplingConfig, vocab_size: int) -> SamplingConfig:
    """``config`` with every value safe to put in a batched tensor.

    ``top_k`` is clamped to ``[0, vocab_size]`` (a negative one means "no top-k"; any value >= the vocabulary
    keeps the whole head, as ``vocab_size`` does); ``seed`` is reduced mod 2**64 (deterministic; identical to
    what ``manual_seed`` does for the seeds it accepts, so ``-1`` and ``2**64 - 1`` share one stream);
    ``repetition_penalty`` is raised to ``MIN_REPETITION_PENALTY`` (a seen token with a positive logit wins
    either way).

    Raises:
        InvalidSampling: a float field is NaN or infinite, or ``repetition_penalty`` is not positive.
    """
    for name in _FLOAT_FIELDS:
        if not math.isfinite(getattr(config, name)):
            raise InvalidSampling(f"{name} must be a finite number")
    if config.repetition_penalty <= 0.0:
        raise InvalidSampling("repetition_penalty must be greater than 0")
    top_k = min(max(int(config.top_k), 0), vocab_size)
    seed = None if config.seed is None else int(config.seed) % SEED_MODULUS
    penalty = max(config.repetition_penalty, MIN_REPETITION_PENALTY)
    if top_k == config.top_k and seed == config.seed and penalty == config.repetition_penalty:
        return config
    return replace(config, top_k=top_k, seed=seed, repetition_penalty=penalty)


class RowSampler:
    """One request's sampling state: its parameters (normalised, see :func:`normalise`), its generator and
    its penalty bookkeeping.

    Raises:
        InvalidSampling: from :func:`normalise`.
    """

    def __init__(self, config: SamplingConfig, prompt_ids: torch.Tensor, vocab_size: int) -> None:
        config = normalise(config, vocab_size)
        self.config = config
        self.vocab_size = vocab_size
        seed = config.seed if config.seed is not None else secrets.randbits(63)
        # CPU generators: the same seed gives the same draws whatever device the model runs on.
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.seen: set[int] = set()
        self._seen_ids = torch.empty(0, dtype=torch.long)
        self._seen_new: list[int] = []
        self.counts: dict[int, int] = {}
        if config.repetition_penalty != 1.0:
            ids = prompt_ids.reshape(-1).to("cpu", torch.long).unique()
            self._seen_ids = ids[(ids >= 0) & (ids < vocab_size)]
            self.seen = set(self._seen_ids.tolist())

    def draw(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def record(self, token: int) -> None:
        if self.config.repetition_penalty != 1.0 and token not in self.seen:
            self.seen.add(token)
            self._seen_new.append(token)
        if self.config.counts_generated:
            self.counts[token] = self.counts.get(token, 0) + 1

    def seen_ids(self) -> torch.Tensor:
        """Prompt and generated token ids (unique), for the repetition penalty."""
        if self._seen_new:
            self._seen_ids = torch.cat([self._seen_ids, torch.tensor(self._seen_new, dtype=torch.long)])
            self._seen_new = []
        return self._seen_ids


@dataclass(slots=True)
class _Group:
    """Rows of the batch that take the same path, with their parameters as (n, 1) tensors."""

    rows: list[int]
    index: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor  # vocab size where the row has no top-k
    has_top_k: torch.Tensor
    all_top_k: bool
    max_top_k: int

    @classmethod
    def of(cls, rows: list[int], cfgs: Sequence[SamplingConfig], vocab: int, device: torch.device) -> _Group:
        sel = [cfgs[i] for i in rows]
        top_k = [c.top_k if c.top_k > 0 else vocab for c in sel]

        def col(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        return cls(
            rows=rows,
            index=torch.tensor(rows, dtype=torch.long, device=device),
            temperature=col([c.temperature for c in sel]),
            top_p=col([c.top_p for c in sel]),
            top_k=col(top_k, torch.long),
            has_top_k=col([c.top_k > 0 for c in sel], torch.bool),
            all_top_k=all(c.top_k > 0 for c in sel),
            max_top_k=max([c.top_k for c in sel] + [0]),
        )

    def subset(self, keep: torch.Tensor) -> _Group:
        """The rows where ``keep`` (n,) is true, with ``index`` local to this group."""
        local = keep.nonzero().reshape(-1)
        top_k = self.top_k.index_select(0, local)
        return _Group(
            rows=[self.rows[i] for i in local.tolist()],
            index=local,
            temperature=self.temperature.index_select(0, local),
            top_p=self.top_p.index_select(0, local),
            top_k=top_k,
            has_top_k=self.has_top_k.index_select(0, local),
            all_top_k=bool(self.has_top_k.index_select(0, local).all()),
            max_top_k=self.max_top_k,
        )


class BatchSampler:
    """Samples one token for every row of a step. Call :meth:`set_rows` whenever the batch's rows or their
    order change (join / leave): the groups and their parameter tensors are built only then."""

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._rows: list[RowSampler] = []
        self._plain_greedy = True
        self._drawn_from: torch.Tensor | None = None  # the last sample's (B, V) logits, penalties applied

    def set_rows(self, rows: Sequence[RowSampler]) -> None:
        """Group ``rows`` (the batch's rows in order) and build their parameter tensors."""
        self._rows = list(rows)
        cfgs = [r.config for r in self._rows]
        n, v, dev = len(cfgs), self.vocab_size, self.device
        self._any_greedy = any(c.greedy for c in cfgs)
        self._all_greedy = all(c.greedy for c in cfgs)
        self._penalised = [i for i, c in enumerate(cfgs) if c.penalised]
        self._plain_greedy = self._all_greedy and not self._penalised
        self._sampled = [i for i, c in enumerate(cfgs) if not c.greedy]
        head = [i for i in self._sampled if cfgs[i].truncates]
        full = [i for i in self._sampled if not cfgs[i].truncates]
        self._head = _Group.of(head, cfgs, v, dev) if head else None
        self._full = _Group.of(full, cfgs, v, dev) if full else None
        self._head_is_all = len(head) == n
        self._full_is_all = len(full) == n

    def check(self, row: RowSampler) -> None:
        """Build for ``row`` alone what :meth:`set_rows` builds for it in a batch (its group's parameter
        tensors), so that a row that would break the batch's set-up fails before it joins. Raises what
        :meth:`set_rows` would raise."""
        BatchSampler(self.vocab_size, self.device).set_rows([row])

    def sample(self, logits: torch.Tensor, draws: Sequence[float] | None = None) -> torch.Tensor:
        """``logits`` (B, vocab) in the row order of the last :meth:`set_rows`; returns (B,) token ids.

        ``draws`` (B,): this step's uniform numbers from :func:`draw_step` over the same rows (greedy rows'
        entries are ignored); ``None`` draws them here. Passing them lets a failed step be retried without
        drawing twice."""
        if self._plain_greedy:
            self._drawn_from = logits
            return row_argmax(logits)
        # A copy only when penalties write into it: the caller's logits stay untouched.
        x = logits.to(torch.float32, copy=bool(self._penalised))
        if self._penalised:
            self._apply_penalties(x)
        self._drawn_from = x
        if self._all_greedy:
            return row_argmax(x)
        out = row_argmax(x) if self._any_greedy else torch.zeros(len(self._rows), dtype=torch.long)
        out = out.to(x.device)
        u = draw_step(self._rows) if draws is None else draws
        for group, fn, whole in (
            (self._head, self._sample_head, self._head_is_all),
            (self._full, self._sample_full, self._full_is_all),
        ):
            if group is not None:
                part = x if whole else x.index_select(0, group.index)
                gu = torch.tensor([u[i] for i in group.rows], dtype=torch.float32).to(x.device)
                out.index_copy_(0, group.index, fn(part, group, gu))
        return out

    def logprobs(
        self, rows: Sequence[int], tokens: torch.Tensor, k: int
    ) -> tuple[list[float], list[list[int]], list[list[float]]]:
        """Log-probabilities of the last :meth:`sample` call for the rows at ``rows`` (indices in its row
        order): of their tokens (``tokens`` (B,), what was picked for every row) and the ``k`` (0..vocab)
        most likely ids of the same distribution, most likely first. The distribution is
        :func:`log_distribution` of the logits that call drew from (penalties applied, and whatever the
        caller wrote into them before: grammar masks, a forced ``</think>``). Only these rows are computed.

        Returns (chosen (r,), top ids (r, k), top log-probs (r, k)) as Python lists; -inf stays -inf."""
        x = self._drawn_from
        assert x is not None, "sample() first"
        idx = torch.tensor(list(rows), dtype=torch.long, device=x.device)
        temps = [self._rows[i].config.temperature for i in rows]
        lp = log_distribution(x.index_select(0, idx), temps)
        chosen = lp.gather(1, tokens.to(x.device).index_select(0, idx)[:, None]).reshape(-1)
        if k > 0:
            values, ids = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
            return chosen.tolist(), ids.tolist(), values.tolist()
        return chosen.tolist(), [[] for _ in rows], [[] for _ in rows]

    def record(self, tokens: Sequence[int]) -> None:
        """Account the step's tokens (one per row, in row order) for the penalties of the next steps."""
        for i in self._penalised:
            self._rows[i].record(tokens[i])

    # ---- paths ----------------------------------------------------------------------------------------

    def _sample_full(self, x: torch.Tensor, g: _Group, u: torch.Tensor) -> torch.Tensor:
        """Inverse CDF over the whole row in vocabulary order."""
        inv_t = 1.0 / g.temperature
        # exp((x - max) / t) with one fused pass before the exponential.
        weights = torch.addcmul(-x.amax(dim=-1, keepdim=True) * inv_t, x, inv_t).exp_()
        return row_inverse_cdf(weights, u)

    def _sample_head(self, x: torch.Tensor, g: _Group, u: torch.Tensor, tier: int = 0) -> torch.Tensor:
        """Inverse CDF over the kept part of the row's sorted head (descending probability)."""
        width = self._head_width(g, tier)
        vals, ids = row_topk(x, width)
        z = vals / g.temperature
        ranks = torch.arange(width, device=x.device)[None, :]
        z = z.masked_fill(ranks >= g.top_k, float("-inf"))
        log_norm = torch.logsumexp(z, dim=-1, keepdim=True)
        if not g.all_top_k:  # top-p alone is relative to the whole distribution
            full_norm = torch.logsumexp(x / g.temperature, dim=-1, keepdim=True)
            log_norm = torch.where(g.has_top_k, log_norm, full_norm)
        probs = torch.exp(z - log_norm)
        cum = probs.cumsum(dim=-1)
        keep = (cum - probs) < g.top_p
        token = self._draw_sorted(probs * keep, ids, u)
        if width < self.vocab_size:
            # The kept set reaches the head's end while the row may keep more: widen for those rows.
            open_rows = keep[:, -1] & (g.top_k[:, 0] > width)
            if bool(open_rows.any()):
                sub = g.subset(open_rows)
                wider = self._sample_head(x.index_select(0, sub.index), sub, u[sub.index], tier + 1)
                token = token.index_copy(0, sub.index, wider)
        return token

    def _head_width(self, g: _Group, tier: int) -> int:
        if g.all_top_k:
            return min(self.vocab_size, g.max_top_k)
        if tier < len(_HEAD_TIERS):
            return min(self.vocab_size, max(_HEAD_TIERS[tier], g.max_top_k))
        return self.vocab_size

    @staticmethod
    def _draw_sorted(kept: torch.Tensor, ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        cum = kept.cumsum(dim=-1)
        idx = torch.searchsorted(cum, u[:, None] * cum[:, -1:], right=True)
        n_keep = (kept > 0).sum(dim=-1, keepdim=True).clamp_min(1)
        return ids.gather(1, torch.minimum(idx, n_keep - 1)).reshape(-1)

    def _apply_penalties(self, x: torch.Tensor) -> None:
        rep = [i for i in self._penalised if self._rows[i].config.repetition_penalty != 1.0]
        if rep:
            self._repetition(x, rep)
        counted = [i for i in self._penalised if self._rows[i].counts]
        if counted:
            self._presence_frequency(x, counted)

    def _repetition(self, x: torch.Tensor, rows: list[int]) -> None:
        # HF: divide positive logits, multiply negative ones, for every token seen so far.
        seqs = [self._rows[i].seen_ids() for i in rows]
        lengths = [len(s) for s in seqs]
        rows = [r for r, n in zip(rows, lengths, strict=True) if n]
        seqs = [s for s in seqs if len(s)]
        if not rows:
            return
        ids = pad_sequence(seqs, batch_first=True, padding_value=-1).to(x.device)
        # Padding repeats the row's first id: duplicate writes then carry identical values.
        ids = torch.where(ids < 0, ids[:, :1], ids)
        row_idx = torch.tensor(rows, dtype=torch.long, device=x.device)[:, None].expand_as(ids)
        penalty = torch.tensor([self._rows[i].config.repetition_penalty for i in rows], device=x.device)
        vals = x[row_idx, ids]
        penalty = penalty[:, None]
        x[row_idx, ids] = torch.where(vals < 0, vals * penalty, vals / penalty)

    def _presence_frequency(self, x: torch.Tensor, rows: list[int]) -> None:
        # OpenAI: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty.
        width = max(len(self._rows[i].counts) for i in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        delta = torch.zeros((len(rows), width), dtype=torch.float32)
        for k, i in enumerate(rows):
            row = self._rows[i]
            tokens = list(row.counts)
            counts = torch.tensor([row.counts[t] for t in tokens], dtype=torch.float32)
            ids[k, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            cfg = row.config
            delta[k, : len(tokens)] = counts * cfg.frequency_penalty + cfg.presence_penalty
        row_idx = torch.tensor(rows, dtype=torch.long)[:, None].expand_as(ids)
        # Padding entries point at token 0 with a zero delta; accumulate makes duplicates add up.
        x.index_put_((row_idx.to(x.device), ids.to(x.device)), -delta.to(x.device), accumulate=True)


def log_distribution(x: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """(r, V) float32 log-probabilities: ``log_softmax(x / t)`` per row over the whole vocabulary, with
    ``t`` the row's temperature, 1 for a greedy row (below ``MIN_TEMPERATURE``: its token is the row's most
    likely one). Top-k / top-p truncation is not applied. ``x`` (r, V) any float dtype; masked entries
    (-inf) stay -inf; a row with every entry masked is NaN (``logprobs.candidate`` floors it)."""
    t = [v if v >= MIN_TEMPERATURE else 1.0 for v in temperatures]
    t = torch.tensor(t, dtype=torch.float32, device=x.device)
    return torch.log_softmax(x.to(torch.float32) / t[:, None], dim=-1)


def draw_step(rows: Sequence[RowSampler]) -> list[float]:
    """One uniform number in [0, 1) per row for this step: each sampling row's generator draws exactly
    once; greedy rows get 0.0 and draw nothing."""
    return [0.0 if r.config.greedy else r.draw() for r in rows]


def sampling_config(
    temperature: float,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float | None = None,
) -> SamplingConfig:
    """A :class:`SamplingConfig` from optional request-style values (``None`` = no effect). Values are
    taken as they are; :class:`RowSampler` normalises them (see :func:`normalise`)."""
    return SamplingConfig(
        temperature=temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=0 if top_k is None else top_k,
        seed=seed,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
    )
