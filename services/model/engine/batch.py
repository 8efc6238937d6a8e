"""The tensors of the running batch and the two model calls: prefill one request, decode one step for all.

Rows are left-padded to a common length. RoPE is applied before keys are cached, so where the padding sits
does not matter; only the attention mask and the explicit per-row positions do. Every call passes explicit
``position_ids`` of shape (4, B, L): row 0 the text index, rows 1-3 the 3-D mrope position (text index plus
the row's own rope delta from its prefill). The model's shared ``model.model.rope_deltas`` is never used: a
multimodal prefill of one request would otherwise shift the positions of every other row.

Two layouts of the running batch's KV (``KV_LAYOUT``): ``concat``, a ``BatchTensors`` whose transformers
``DynamicCache`` is re-concatenated on every step, join and leave; and ``slots``, a ``kv_slots.SlotBatch``
whose rows keep their KV in place. The functions below (``merge``, ``select``, ``settle``, ``take``,
``decode``, ``snapshot``, ``restore``, ``nbytes``, ``lost``) take either; a prefill always makes a one-row
``BatchTensors``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from services.model.engine.kv_slots import SlotBatch, SlotConfig

_MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids")
_FLOAT_KEYS = ("pixel_values", "pixel_values_videos")


@dataclass(slots=True)
class BatchTensors:
    """Model-side state of the running rows, all in the same row order.

    ``tokens`` (B, 1) are the tokens to feed next (sampled, not yet in the cache); ``next_pos`` (B,) their
    text positions; ``delta`` (B,) each row's mrope delta; ``mask`` (B, T) marks real cache columns.
    """

    cache: DynamicCache
    mask: torch.Tensor
    next_pos: torch.Tensor
    delta: torch.Tensor
    tokens: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])


Batch = BatchTensors | SlotBatch
"""The running batch in either KV layout."""


def prefill(model: Any, inputs: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, BatchTensors]:
    """Run one request's prompt (with its pixels) alone; returns its last logits (1, V) and its batch state
    (``tokens`` is a placeholder until its first token is sampled)."""
    input_ids = inputs["input_ids"].to(device)
    mask = torch.ones_like(input_ids)
    media = media_tensors(model, inputs, device)
    positions, delta = prompt_positions(model, input_ids, media)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **media,
    )
    return out.logits[:, -1], prefilled_state(out.cache, int(input_ids.shape[1]), delta)


def media_tensors(model: Any, inputs: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The processor's media tensors on the model's device, pixels in the model's dtype."""
    media = {k: inputs[k].to(device) for k in _MEDIA_KEYS if inputs.get(k) is not None}
    for key in _FLOAT_KEYS:
        if key in media:
            media[key] = media[key].to(model.dtype)
    return media


def prefilled_state(cache: DynamicCache, length: int, delta: torch.Tensor) -> BatchTensors:
    """The batch state of one fully prefilled prompt of ``length`` tokens."""
    device = delta.device
    return BatchTensors(
        cache=cache,
        mask=torch.ones((1, length), dtype=torch.long, device=device),
        next_pos=torch.full((1,), length, dtype=torch.long, device=device),
        delta=delta.reshape(1).to(dtype=torch.long),
        tokens=torch.zeros((1, 1), dtype=torch.long, device=device),
    )


def prompt_positions(
    model: Any, input_ids: torch.Tensor, media: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit positions (4, 1, L) of the prompt (text index, then 3-D mrope) and its delta (1,)."""
    length = int(input_ids.shape[1])
    text = torch.arange(length, device=input_ids.device).view(1, 1, length)
    mrope, delta = _mrope_positions(model, input_ids, media)
    return torch.cat([text, mrope], dim=0), delta


def _mrope_positions(
    model: Any, input_ids: torch.Tensor, media: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D mrope positions (3, 1, L) of the prompt and its delta (1,)."""
    has_media = media.get("image_grid_thw") is not None or media.get("video_grid_thw") is not None
    if not has_media or media.get("mm_token_type_ids") is None:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, 1, -1)
        return positions, torch.zeros(1, dtype=torch.long, device=input_ids.device)
    positions, delta = model.model.get_rope_index(
        input_ids,
        media["mm_token_type_ids"],
        image_grid_thw=media.get("image_grid_thw"),
        video_grid_thw=media.get("video_grid_thw"),
        attention_mask=torch.ones_like(input_ids),
    )
    return positions, delta.reshape(-1)


def decode(model: Any, batch: Batch, out: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step for every row; appends to the cache and returns the logits (B, V).

    With ``out`` (a (B, V) tensor of the output head's dtype and device) the logits are written there: the
    base model runs, then the output head as one matrix product into ``out`` (what the model's own head
    computes). On CPU a fresh (B, V) tensor per step is costly once it is large (B=64: 39 MB, beyond
    glibc's mmap threshold, so every step page-faults it in anew); a reused buffer is not."""
    if isinstance(batch, SlotBatch):
        return batch.decode(model, out)
    ones = torch.ones((batch.size, 1), dtype=batch.mask.dtype, device=batch.mask.device)
    mask = torch.cat([batch.mask, ones], dim=1)
    pos = batch.next_pos[:, None]
    mrope = pos + batch.delta[:, None]
    kwargs = {
        "input_ids": batch.tokens,
        "attention_mask": mask,
        "position_ids": torch.stack([pos, mrope, mrope, mrope]),
        "cache": batch.cache,
        "use_cache": True,
    }
    if out is None:
        result = model(**kwargs, logits_to_keep=1)
        logits = result.logits[:, -1]
    else:
        result = model.model(**kwargs)
        head = model.get_output_embeddings()
        logits = torch.mm(result.last_hidden_state[:, -1], head.weight.t(), out=out)
    batch.cache = result.cache
    batch.mask = mask
    batch.next_pos = batch.next_pos + 1
    return logits


class LogitsBuffer:
    """One reused (rows, V) logits tensor for the steps of a scheduler: grown when a step needs more rows,
    never shrunk; each step's logits are a view of its first rows, valid until the next step."""

    def __init__(self, model: Any) -> None:
        weight = model.get_output_embeddings().weight
        self._vocab, self._dtype, self._device = int(weight.shape[0]), weight.dtype, weight.device
        self._buf = torch.empty((0, self._vocab), dtype=self._dtype, device=self._device)

    def rows(self, n: int) -> torch.Tensor:
        if n > self._buf.shape[0]:
            self._buf = torch.empty((n, self._vocab), dtype=self._dtype, device=self._device)
        return self._buf[:n]


def merge(parts: list[Batch], slot_config: SlotConfig | None = None) -> Batch:
    """Join row groups into one batch, in order. A ``SlotBatch`` first takes the others' rows into free
    slots (their KV copied once, its own rows untouched unless the buffers are reshaped, at most once for
    all the parts); with ``slot_config`` (``KV_LAYOUT=slots``) prefilled rows start a new ``SlotBatch``;
    otherwise caches and masks are left-padded to the longest and concatenated."""
    first = parts[0]
    if isinstance(first, SlotBatch) or slot_config is not None:
        target = first if isinstance(first, SlotBatch) else SlotBatch.like(slot_config, first)  # type: ignore[arg-type]
        joining = parts[1:] if target is first else parts
        if any(isinstance(p, SlotBatch) for p in joining):
            raise ValueError("one slot batch at a time: merge prefilled rows into it")
        target.join(joining)  # type: ignore[arg-type]
        return target
    plain = [p for p in parts if isinstance(p, BatchTensors)]
    if len(plain) != len(parts):
        raise ValueError("a slot batch goes first in a merge")
    return _concat(plain)


def settle(batch: Batch) -> None:
    """After a step's leaves and joins: a ``SlotBatch`` compacts rows that have become sparse
    (``SlotBatch.settle``); ``concat`` has nothing to do (``select`` already dropped the rows)."""
    if isinstance(batch, SlotBatch):
        batch.settle()


def lost(batch: Batch) -> bool:
    """Whether the batch's KV is gone (a ``SlotBatch`` whose reallocation failed half-way): its rows can
    only be failed."""
    return isinstance(batch, SlotBatch) and batch.lost


def _concat(parts: list[BatchTensors]) -> BatchTensors:
    """Concatenate row groups into one batch, left-padding caches and masks to the longest."""
    if len(parts) == 1:
        return parts[0]
    width = max(int(p.mask.shape[1]) for p in parts)
    cache = parts[0].cache
    for i, layer in enumerate(cache.layers):
        layer.keys = torch.cat([_left_pad(p.cache.layers[i].keys, width, 2) for p in parts], dim=0)
        layer.values = torch.cat([_left_pad(p.cache.layers[i].values, width, 2) for p in parts], dim=0)
    return BatchTensors(
        cache=cache,
        mask=torch.cat([_left_pad(p.mask, width, 1) for p in parts], dim=0),
        next_pos=torch.cat([p.next_pos for p in parts]),
        delta=torch.cat([p.delta for p in parts]),
        tokens=torch.cat([p.tokens for p in parts]),
    )


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - int(t.shape[dim])
    if missing == 0:
        return t
    # F.pad lists (left, right) pairs starting from the last dimension.
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


def bytes_per_token(model: Any) -> int:
    """Bytes of one token's keys and values in every decoder layer, in the model's dtype."""
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * int(text.num_hidden_layers) * int(kv_heads) * int(head_dim) * model.dtype.itemsize


def nbytes(batch: Batch) -> int:
    """Bytes of the batch's cached keys and values (a ``SlotBatch``: its buffers' whole allocation)."""
    if isinstance(batch, SlotBatch):
        return batch.nbytes()
    return sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in batch.cache.layers
        if layer.keys is not None
    )


CacheSnapshot = list[tuple[torch.Tensor, torch.Tensor]] | tuple[list[int], torch.Tensor]


def snapshot(batch: Batch) -> CacheSnapshot:
    """What undoes a decode that failed half-way. Free: a ``DynamicCache``'s layers replace their tensors
    on update (``torch.cat``), they never write into them, so its per-layer (keys, values) are kept; a
    ``SlotBatch`` writes only past its rows' lengths, so its lengths are kept."""
    if isinstance(batch, SlotBatch):
        return batch.snapshot()
    return [(layer.keys, layer.values) for layer in batch.cache.layers]


def restore(batch: Batch, saved: CacheSnapshot) -> None:
    """Put back the state of :func:`snapshot` (the mask and positions change only after a decode
    succeeded, so the batch is then as it was before the failed call)."""
    if isinstance(batch, SlotBatch):
        assert isinstance(saved, tuple)
        batch.restore(saved)
        return
    assert isinstance(saved, list)
    for layer, (keys, values) in zip(batch.cache.layers, saved, strict=True):
        layer.keys, layer.values = keys, values


def take(batch: Batch, rows: list[int]) -> BatchTensors:
    """An independent copy of the rows at ``rows`` (their own cache object and tensors, in the ``concat``
    layout whatever ``batch``'s): decoding it leaves ``batch`` untouched. Costs the memory of those rows'
    cache."""
    if isinstance(batch, SlotBatch):
        return _concat([_slot_row(batch, i) for i in rows])
    cache = copy.copy(batch.cache)
    cache.layers = [copy.copy(layer) for layer in batch.cache.layers]
    return select(replace(batch, cache=cache), rows)


def repeated(state: BatchTensors, n: int) -> BatchTensors:
    """``state``'s one row as ``n`` rows that share its memory (expanded views, no copy): what a join into
    slots reads (``SlotBatch.join`` copies each row into its own slot), so that an ``n`` > 1 request's
    prompt is copied once, into its slots, and not first into ``n`` rows as :func:`take` would. Read-only:
    nothing may decode it or write into it (the prefix cache may hold the same tensors). Raises ValueError
    for a state of more than one row."""
    rows = int(state.mask.shape[0])
    if rows != 1:
        raise ValueError(f"repeated takes one row, got {rows}")
    cache = copy.copy(state.cache)
    cache.layers = [copy.copy(layer) for layer in state.cache.layers]
    for layer in cache.layers:
        layer.keys = layer.keys.expand(n, -1, -1, -1)
        layer.values = layer.values.expand(n, -1, -1, -1)
    return BatchTensors(
        cache=cache,
        mask=state.mask.expand(n, -1),
        next_pos=state.next_pos.expand(n),
        delta=state.delta.expand(n),
        tokens=state.tokens.expand(n, -1),
    )


def _slot_row(batch: SlotBatch, row: int) -> BatchTensors:
    """Row ``row`` of a ``SlotBatch`` as a one-row ``BatchTensors`` with its own (copied) cache."""
    layers, length = batch.row_kv(row)
    cache = DynamicCache()
    for i, (keys, values) in enumerate(layers):
        cache.update(keys, values, i)  # a first update concatenates into new tensors: a copy
    state = prefilled_state(cache, length, batch.delta[row : row + 1])
    state.tokens = batch.tokens[row : row + 1].clone()
    return state


def select(batch: Batch, keep: list[int]) -> Batch:
    """Keep only the rows at ``keep`` (in that order). ``concat``: then drop leading columns that are
    padding for all; ``slots``: the others' slots are freed, nothing is copied (``settle`` compacts)."""
    if isinstance(batch, SlotBatch):
        return batch.select(keep)
    idx = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    batch.cache.batch_select_indices(idx)
    mask = batch.mask.index_select(0, idx)
    first = int(mask.any(dim=0).to(torch.int8).argmax())
    if first > 0:
        mask = mask[:, first:]
        for layer in batch.cache.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
    return BatchTensors(
        cache=batch.cache,
        mask=mask,
        next_pos=batch.next_pos.index_select(0, idx),
        delta=batch.delta.index_select(0, idx),
        tokens=batch.tokens.index_select(0, idx),
    )
