"""The prefill of one prompt longer than the per-step token budget, spread over several scheduler steps.

Each :meth:`ChunkedPrefill.advance` does about ``budget`` tokens of work, so running rows keep decoding
between the pieces: first the vision encoder, one image or video at a time (an item costs its visual
tokens; an item larger than the whole budget runs alone in its step, since one item's encoder pass cannot
be split), then the text decoder over the next slice of the prompt, extending the KV cache.

It computes what ``Qwen3VLModel.forward`` computes for one row: the visual features scattered into the
token embeddings at the placeholder tokens, the deepstack features added at the visual positions of the
first decoder layers, and explicit text + 3-D mrope positions of the whole prompt.

Started from a cached prefix (``prefix``: per-layer (keys, values) of at least its first ``n`` tokens, see
``prefix.py``), it skips the media items within those ``n`` tokens and prefills the text from token ``n``
on: only the new part of the prompt costs work.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from services.model.engine.batch import BatchTensors, media_tensors, prefilled_state, prompt_positions

_KINDS = (
    ("pixel_values", "image_grid_thw", "image_token_id"),
    ("pixel_values_videos", "video_grid_thw", "video_token_id"),
)


@dataclass(slots=True)
class _Item:
    """One image or video: its patches, its grid and the prompt positions of its placeholder tokens."""

    pixels: torch.Tensor
    grid: torch.Tensor  # (1, 3)
    positions: torch.Tensor  # (n,) indices into the prompt

    @property
    def cost(self) -> int:
        return int(self.positions.numel())


class ChunkedPrefill:
    """One request's prefill in pieces. Not thread-safe: the scheduler thread owns it."""

    def __init__(
        self,
        model: Any,
        inputs: Mapping[str, Any],
        device: torch.device,
        prefix: tuple[list[tuple[torch.Tensor, torch.Tensor]], int] | None = None,
    ) -> None:
        """``prefix``: cached (keys, values) per layer, (1, kv_heads, >= n, head_dim), whose first ``n``
        tokens equal this prompt's (``n`` < the prompt's length, never inside a media item)."""
        self._model = model
        input_ids = inputs["input_ids"].to(device)
        media = media_tensors(model, inputs, device)
        self.length = int(input_ids.shape[1])
        self._positions, self._delta = prompt_positions(model, input_ids, media)
        self._embeds = model.model.get_input_embeddings()(input_ids)  # (1, L, H)
        self._items: deque[_Item] = deque()
        visual = torch.zeros_like(input_ids[0], dtype=torch.bool)
        for pixels_key, grid_key, token_attr in _KINDS:
            placeholders = input_ids[0] == getattr(model.config, token_attr)
            visual |= placeholders
            if media.get(pixels_key) is not None:
                self._items.extend(_split(media[pixels_key], media[grid_key], placeholders, model))
        self._cache: Any = None
        self.done = 0  # prompt tokens in the cache
        if prefix is not None:
            self._start_from(*prefix)
        self._visual = visual[None]  # (1, L)
        self._before = F.pad(visual.cumsum(0), (1, 0))  # visual tokens before each position
        layers = len(model.config.vision_config.deepstack_visual_indexes)
        hidden = self._embeds.shape[-1]
        count = int(self._before[-1])
        self._deepstack = [self._embeds.new_zeros(count, hidden) for _ in range(layers)] if count else []

    def _start_from(self, layers: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> None:
        """The cache starts as views of the prefix's first ``n`` tokens (never written to: the first update
        concatenates into new tensors); the media items within them are not encoded again."""
        if not 0 < n < self.length:
            raise ValueError(f"a cached prefix of {n} tokens for a prompt of {self.length}")
        cache = DynamicCache()
        for keys, values in layers:
            layer = DynamicLayer()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys[:, :, :n], values[:, :, :n]
            cache.layers.append(layer)
        self._cache, self.done = cache, n
        self._items = deque(item for item in self._items if int(item.positions[0]) >= n)

    @property
    def cost(self) -> int:
        """The work left in budget units: visual tokens of the items still to encode plus text tokens."""
        return sum(item.cost for item in self._items) + self.length - self.done

    def advance(self, budget: int) -> tuple[int, torch.Tensor | None]:
        """Do up to ``budget`` tokens of work (at least one item or one token); returns the tokens of work
        done and, once the whole prompt is in the cache, its last logits (1, V)."""
        spent = 0
        while self._items and (spent == 0 or spent + self._items[0].cost <= budget):
            item = self._items.popleft()
            self._encode(item)
            spent += item.cost
        if self._items or spent >= budget:
            return spent, None
        n = min(budget - spent, self.length - self.done)
        return spent + n, self._decode_text(n)

    def state(self) -> BatchTensors:
        """The batch state once :meth:`advance` returned logits."""
        return prefilled_state(self._cache, self.length, self._delta)

    def _encode(self, item: _Item) -> None:
        out = self._model.model.get_image_features(item.pixels, item.grid, return_dict=True)
        dtype = self._embeds.dtype
        self._embeds[0, item.positions] = torch.cat(out.pooler_output).to(dtype)
        rows = self._before[item.positions]
        for layer, feature in zip(self._deepstack, out.deepstack_features, strict=True):
            layer[rows] = torch.cat(feature).to(dtype)

    def _decode_text(self, n: int) -> torch.Tensor | None:
        start, end = self.done, self.done + n
        visual = self._visual[:, start:end]
        first, last = int(self._before[start]), int(self._before[end])
        out = self._model.model.language_model(
            inputs_embeds=self._embeds[:, start:end],
            attention_mask=torch.ones((1, end), dtype=torch.long, device=self._embeds.device),
            position_ids=self._positions[:, :, start:end],
            cache=self._cache,
            use_cache=True,
            visual_pos_masks=visual if last > first else None,
            deepstack_visual_embeds=[d[first:last] for d in self._deepstack] if last > first else None,
        )
        self._cache, self.done = out.cache, end
        if end < self.length:
            return None
        self._embeds = self._embeds[:, :0]  # no longer needed: free it before the row starts decoding
        hidden = out.last_hidden_state[:, -1:]
        return self._model.get_output_embeddings()(hidden)[:, -1]


def visual_tokens(model: Any, inputs: Any) -> int:
    """Visual tokens the vision encoder produces for ``inputs`` (processor output: each image or video's
    patches / spatial merge**2), what its items cost in :meth:`ChunkedPrefill.advance`; 0 without media
    or for inputs that are not a mapping."""
    if not isinstance(inputs, Mapping):
        return 0
    merge = model.config.vision_config.spatial_merge_size**2
    total = 0
    for pixels_key, grid_key, _ in _KINDS:
        grid = inputs.get(grid_key)
        if grid is not None and inputs.get(pixels_key) is not None:
            total += int(grid.prod(-1).sum()) // merge
    return total


def _split(pixels: torch.Tensor, grids: torch.Tensor, placeholders: torch.Tensor, model: Any) -> list[_Item]:
    """Per-item patches and placeholder positions (items appear in the prompt in the processor's order)."""
    merge = model.config.vision_config.spatial_merge_size**2
    patches = grids.prod(-1)
    positions = placeholders.nonzero().reshape(-1)
    items = []
    for pix, pos, grid in zip(
        pixels.split(patches.tolist()),
        positions.split((patches // merge).tolist()),
        grids.split(1),
        strict=True,
    ):
        items.append(_Item(pixels=pix, grid=grid, positions=pos))
    return items
