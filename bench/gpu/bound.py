"""The decode speed limit set by memory bandwidth: every decode step reads the decoder's weights once.

At small batches a decode step is bound by reading the weights, not by arithmetic: a step cannot take less
than ``decode_bytes / bandwidth`` seconds, so ``batch`` rows cannot produce more than
``batch * bandwidth / decode_bytes`` tokens per second. (The KV cache read grows with batch x context and
is left out: the bound is optimistic, more so at batch 64.) Bandwidth is measured on the device with one big
tensor copy, counting bytes read and written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class WeightBytes:
    """Bytes of the model's parameters: all of them, and those one decode step reads."""

    parameters: int  # count of all parameters (tied weights once)
    total: int  # bytes of all parameters (vision encoder included)
    decode: int  # bytes of the text decoder, embeddings included (tied: they are the LM head)


def weight_bytes(model: Any) -> WeightBytes:
    """``model``: a Qwen3-VL ``...ForConditionalGeneration``; the decoder is ``model.model.language_model``
    (plus ``lm_head`` when it is not tied to the embeddings)."""
    every = {id(p): p for p in model.parameters()}
    decoder = {id(p): p for p in model.model.language_model.parameters()}
    decoder.update({id(p): p for p in model.lm_head.parameters()})
    return WeightBytes(
        parameters=sum(p.numel() for p in every.values()),
        total=sum(p.numel() * p.element_size() for p in every.values()),
        decode=sum(p.numel() * p.element_size() for p in decoder.values()),
    )


def step_time_bound(decode_bytes: int, bandwidth: float) -> float:
    """Least seconds per decode step: ``decode_bytes`` (bytes) / ``bandwidth`` (bytes/s).

    Raises:
        ValueError: a value is not positive.
    """
    if decode_bytes <= 0 or bandwidth <= 0:
        raise ValueError("decode_bytes and bandwidth must be positive")
    return decode_bytes / bandwidth


def decode_bound(decode_bytes: int, bandwidth: float, batch: int) -> float:
    """Most tokens per second for ``batch`` rows decoding together (one token per row per step).

    Raises:
        ValueError: a value is not positive.
    """
    if batch <= 0:
        raise ValueError("batch must be positive")
    return batch / step_time_bound(decode_bytes, bandwidth)


def copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` of ``nbytes`` on ``device`` (read + written), the best
    of ``repeats`` copies after one warm-up."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    cuda = src.is_cuda
    best = float("inf")
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first copy is the warm-up
            best = min(best, time.perf_counter() - started)
    return 2 * nbytes / best
