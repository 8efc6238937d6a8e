"""``argmax`` and ``topk`` over the vocabulary dimension, fast on CPU.

PyTorch's CPU ``argmax``/``topk`` over a (16, 151936) float tensor take ~2-3 ms on one core, about as long
as a whole decode step of the tiny model, while ``amax`` (vectorized) takes ~0.1 ms. So on CPU the row is
viewed as chunks of 128: the chunk maxima find the winning chunk (for top-k: the k best chunks, which must
hold the k best values), and only those few chunks are searched. Results equal ``torch.argmax`` (first
maximum) and ``torch.topk(sorted=True)`` up to the order of exactly tied values. On accelerators the
library kernels are already fast and are used as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 128


def _chunked(x: torch.Tensor, pad: float = float("-inf")) -> torch.Tensor:
    """(B, V) -> (B, ceil(V / CHUNK), CHUNK), padding the tail with ``pad`` (a copy only when V is
    not a multiple of the chunk)."""
    rest = x.shape[-1] % CHUNK
    if rest:
        x = F.pad(x, (0, CHUNK - rest), value=pad)
    return x.view(x.shape[0], -1, CHUNK)


def _worth_chunking(x: torch.Tensor, k: int) -> bool:
    return x.device.type == "cpu" and x.dim() == 2 and k * CHUNK * 4 <= x.shape[-1]


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for a (B, V) tensor."""
    if not _worth_chunking(x, 1):
        return x.argmax(dim=-1)
    chunks = _chunked(x)
    best_chunk = chunks.amax(dim=-1).argmax(dim=-1)
    rows = torch.arange(x.shape[0], device=x.device)
    inner = chunks[rows, best_chunk].argmax(dim=-1)
    return best_chunk * CHUNK + inner


def row_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, dim=-1, sorted=True)`` (values, indices) for a (B, V) tensor."""
    if not _worth_chunking(x, k):
        return x.topk(k, dim=-1, sorted=True)
    chunks = _chunked(x)
    _, best_chunks = chunks.amax(dim=-1).topk(k, dim=-1)  # (B, k)
    cand = chunks.gather(1, best_chunks[:, :, None].expand(-1, -1, CHUNK)).reshape(x.shape[0], -1)
    vals, pos = cand.topk(k, dim=-1, sorted=True)
    offsets = torch.arange(CHUNK, device=x.device)
    ids = (best_chunks[:, :, None] * CHUNK + offsets).reshape(x.shape[0], -1).gather(1, pos)
    return vals, ids


def row_inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each row of non-negative ``weights`` (B, V) and uniform ``u`` (B,), the first index whose
    cumulative weight exceeds ``u`` times the row's total: a draw in vocabulary order.

    Two levels (chunk sums, then one chunk's cumulative sum) instead of a cumulative sum over the whole
    vocabulary, which is a slow sequential pass on CPU."""
    vocab = weights.shape[-1]
    chunks = _chunked(weights, pad=0.0)
    sums = chunks.sum(dim=-1)
    cum = sums.cumsum(dim=-1)
    target = u.reshape(-1, 1).to(cum.dtype) * cum[:, -1:]
    chunk = torch.searchsorted(cum, target, right=True).clamp_max(cum.shape[-1] - 1)
    before = torch.where(chunk > 0, cum.gather(1, (chunk - 1).clamp_min(0)), torch.zeros_like(target))
    rows = torch.arange(weights.shape[0], device=weights.device)
    inner = chunks[rows, chunk[:, 0]].cumsum(dim=-1)
    pos = torch.searchsorted(inner, target - before, right=True).clamp_max(CHUNK - 1)
    return (chunk * CHUNK + pos).clamp_max(vocab - 1).reshape(-1)
