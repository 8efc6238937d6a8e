"""Vectorized per-row sampling on the whole ``(B, vocab)`` logits tensor of one decode step.

Every row has its own parameters and its own seeded CPU ``torch.Generator``; a row's token depends only on its
own logits, parameters and generator, never on its batch companions:

- each sampled row draws exactly one uniform number per step from its generator, and the token is found by
  inverse-CDF over the row's (masked) distribution in vocabulary order, so neither the batch size nor which
  kernel path (``topk`` window or full sort) the batch needed changes the answer;
- top-k / top-p are applied as a per-row logit threshold (the smallest kept value), computed from the row's
  own sorted head.

Order of operations (HF / vLLM convention): repetition penalty (HF semantics, prompt + generated tokens),
presence / frequency penalties (OpenAI semantics, generated tokens), temperature, top-k, top-p, draw.
No per-row slices of the logits are kept: everything works on the batch tensor.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Rows with top-p only look for their cut-off inside this many best tokens first (a full-vocabulary sort is
# the fallback when the head does not hold ``top_p`` of the mass).
_TOP_P_WINDOW = 256


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """Resolved sampling parameters of one request. ``temperature == 0`` means greedy; ``top_k == 0`` and
    ``top_p == 1`` mean "no truncation"; ``seed=None`` draws a random seed."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def counts_generated(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def penalised(self) -> bool:
        return self.counts_generated or self.repetition_penalty != 1.0

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


class RowSampler:
    """One request's sampling state: its parameters, its generator and its penalty bookkeeping."""

    def __init__(self, config: SamplingConfig, prompt_ids: torch.Tensor, vocab_size: int) -> None:
        self.config = config
        seed = config.seed if config.seed is not None else secrets.randbits(63)
        # CPU generators: the same seed gives the same draws whatever device the model runs on.
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        device = prompt_ids.device
        self.seen: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[prompt_ids.reshape(-1).to(device)] = True
        if config.counts_generated:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def draw(self) -> float:
        return float(torch.rand((), generator=self.generator))


class BatchSampler:
    """Samples one token for every row of a step. Call :meth:`set_rows` whenever the batch's rows or their
    order change (join / leave); the per-row parameter tensors are built only then, not every step."""

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._rows: list[RowSampler] = []
        self._plain_greedy = True

    def set_rows(self, rows: Sequence[RowSampler]) -> None:
        self._rows = list(rows)
        cfgs = [r.config for r in self._rows]
        self._all_greedy = all(c.greedy for c in cfgs)
        self._penalised = any(c.penalised for c in cfgs)
        self._plain_greedy = self._all_greedy and not self._penalised
        self._truncates = any(c.truncates and not c.greedy for c in cfgs)
        dev = self.device
        self._greedy_mask = torch.tensor([c.greedy for c in cfgs], dtype=torch.bool, device=dev)
        temps = [1.0 if c.greedy else c.temperature for c in cfgs]
        self._temperature = torch.tensor(temps, dtype=torch.float32, device=dev)[:, None]
        self._top_p = torch.tensor([c.top_p for c in cfgs], dtype=torch.float32, device=dev)[:, None]
        top_k = [c.top_k if c.top_k > 0 else self.vocab_size for c in cfgs]
        self._top_k = torch.tensor(top_k, dtype=torch.long, device=dev)[:, None]
        truncating = [c.truncates and not c.greedy for c in cfgs]
        self._truncating_mask = torch.tensor(truncating, dtype=torch.bool, device=dev)[:, None]
        self._window = min(self.vocab_size, max([_TOP_P_WINDOW] + [c.top_k for c in cfgs]))
        if self._penalised:
            self._build_penalty_state(cfgs)

    def _build_penalty_state(self, cfgs: Sequence[SamplingConfig]) -> None:
        dev, v = self.device, self.vocab_size
        rep = [c.repetition_penalty for c in cfgs]
        self._rep = torch.tensor(rep, dtype=torch.float32, device=dev)[:, None]
        self._presence = torch.tensor([c.presence_penalty for c in cfgs], device=dev)[:, None]
        self._frequency = torch.tensor([c.frequency_penalty for c in cfgs], device=dev)[:, None]
        no_seen = torch.zeros(v, dtype=torch.bool, device=dev)
        no_counts = torch.zeros(v, dtype=torch.float32, device=dev)
        self._seen = torch.stack([r.seen if r.seen is not None else no_seen for r in self._rows])
        self._counts = torch.stack([r.counts if r.counts is not None else no_counts for r in self._rows])
        # Rows keep views into the batch tensors, so the vectorized in-place updates of `record` are what
        # the next `set_rows` stacks again.
        for i, row in enumerate(self._rows):
            if row.seen is not None:
                row.seen = self._seen[i]
            if row.counts is not None:
                row.counts = self._counts[i]

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, vocab) in the row order of the last :meth:`set_rows`; returns (B,) token ids."""
        if self._plain_greedy:
            return logits.argmax(dim=-1)
        x = logits.float()
        if self._penalised:
            x = self._apply_penalties(x)
        greedy_tokens = x.argmax(dim=-1)
        if self._all_greedy:
            return greedy_tokens
        x = x / self._temperature
        if self._truncates:
            x = self._truncate(x)
        sampled = self._inverse_cdf(torch.softmax(x, dim=-1))
        return torch.where(self._greedy_mask, greedy_tokens, sampled)

    def record(self, tokens: torch.Tensor) -> None:
        """Account the step's tokens (B,) for the penalties of the following steps."""
        if not self._penalised:
            return
        idx = tokens.reshape(-1, 1).to(self.device)
        self._counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
        self._seen.scatter_(1, idx, True)

    def _apply_penalties(self, x: torch.Tensor) -> torch.Tensor:
        # HF repetition penalty: divide positive logits, multiply negative ones, for every token seen so far.
        penalised = torch.where(x < 0, x * self._rep, x / self._rep)
        x = torch.where(self._seen, penalised, x)
        # OpenAI: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty.
        return x - self._counts * self._frequency - (self._counts > 0).float() * self._presence

    def _truncate(self, x: torch.Tensor) -> torch.Tensor:
        """Mask, per row, every logit below the smallest one that top-k and top-p keep."""
        cutoff = self._cutoff(x, self._window)
        if cutoff is None:
            cutoff = self._cutoff(x, self.vocab_size)
        assert cutoff is not None
        return x.masked_fill(x < cutoff, float("-inf"))

    def _cutoff(self, x: torch.Tensor, window: int) -> torch.Tensor | None:
        head, _ = x.topk(window, dim=-1, sorted=True)
        probs = torch.exp(head - torch.logsumexp(x, dim=-1, keepdim=True))
        cum = probs.cumsum(dim=-1)
        ranks = torch.arange(window, device=x.device)[None, :]
        keep = ((cum - probs) < self._top_p) & (ranks < self._top_k)
        if window < self.vocab_size:
            # A row whose kept set reaches the window's end may continue past it: look at the full row.
            open_ended = keep[:, -1:] & (self._top_k > window) & self._truncating_mask
            if bool(open_ended.any()):
                return None
        n_keep = keep.sum(dim=-1, keepdim=True).clamp_min(1)
        cutoff = head.gather(1, n_keep - 1)
        # Rows that do not truncate keep everything, whatever their companions need.
        return cutoff.masked_fill(~self._truncating_mask, float("-inf"))

    def _inverse_cdf(self, probs: torch.Tensor) -> torch.Tensor:
        draws = [0.0 if r.config.greedy else r.draw() for r in self._rows]
        u = torch.tensor(draws, dtype=torch.float32).to(probs.device)
        cum = probs.cumsum(dim=-1)
        target = (u * cum[:, -1])[:, None]
        idx = torch.searchsorted(cum, target, right=True)
        return idx.clamp_max(self.vocab_size - 1).reshape(-1)


def sampling_config(
    temperature: float,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float | None = None,
) -> SamplingConfig:
    """A :class:`SamplingConfig` from optional request-style values (``None`` = no effect)."""
    return SamplingConfig(
        temperature=temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=0 if top_k is None else top_k,
        seed=seed,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
    )
