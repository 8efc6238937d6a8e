"""The prompt prefix cache: the KV of prefilled prompts, reused by later prompts that start the same way.

A prompt is keyed by its token ids and, for each image or video, a digest of the pixels the processor made
of it (``PromptKey``): two prompts share a prefix of ``n`` tokens when their first ``n`` ids are equal and
every media item starting within those ``n`` tokens has the same span and digest in both. The KV of the
first ``n`` prompt tokens depends on those tokens (and the items' pixels) only, because attention is causal
and RoPE is applied before keys are cached; the 3-D mrope positions of the tokens after the prefix are
computed from the whole prompt anyway (``prompt_positions``), so a hit prefills only the new tokens and
encodes only the media items after the prefix.

A prefix never ends inside a media item (it is cut back to the item's start: the item's later tokens would
need its whole encoder pass) and never covers the whole prompt (the last token is prefilled again, to get the
logits of the first generated token).

Entries hold the prompt's per-layer (keys, values) tensors as the prefill made them, (1, kv_heads, L,
head_dim): keeping them costs no copy; a hit's prefill starts a ``DynamicCache`` from views of them and its
first update concatenates into new tensors, so an entry is never written to. Least recently used entries go
first when the KV budget (``KVBudget``) needs room. Owned by the scheduler thread; not thread-safe.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

_KINDS = (
    ("pixel_values", "image_grid_thw", "image_token_id"),
    ("pixel_values_videos", "video_grid_thw", "video_token_id"),
)


@dataclass(frozen=True, slots=True)
class MediaSpan:
    """One image or video of a prompt: its placeholder tokens ``[start, end)`` and its pixels' digest."""

    start: int
    end: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class PromptKey:
    """What a prompt's KV depends on: ``ids`` (L,) int64 on the CPU and its media spans by start."""

    ids: torch.Tensor
    spans: tuple[MediaSpan, ...]

    @property
    def length(self) -> int:
        return int(self.ids.numel())


def prompt_key(
    config: Any,
    inputs: Mapping[str, Any],
    digests: Mapping[str, Sequence[bytes | None]] | None = None,
) -> PromptKey:
    """The key of processor ``inputs`` (``input_ids`` (1, L), media tensors) for a model ``config``.

    Each item's digest is ``media_digest`` of its grid and patches, so the same picture resized differently
    (other ``max_pixels``, ``detail``) is another item. ``digests`` gives items' digests already known (by
    pixel key, ``pixel_values`` / ``pixel_values_videos``, one per item in order, None where unknown; the
    media cache keeps them); the others cost one pass over their pixel bytes (~1 GB/s): call it off the
    decode loop (``HFEngine.prepare_sync``)."""
    ids = inputs["input_ids"].reshape(-1).to("cpu", torch.long)
    merge = int(config.vision_config.spatial_merge_size) ** 2
    spans: list[MediaSpan] = []
    for pixels_key, grid_key, token_attr in _KINDS:
        pixels, grids = inputs.get(pixels_key), inputs.get(grid_key)
        if pixels is None or grids is None:
            continue
        starts = (ids == int(getattr(config, token_attr))).nonzero().reshape(-1)
        patches = grids.prod(-1)
        known = list((digests or {}).get(pixels_key) or [None] * len(grids))
        offset = 0
        for item_pixels, grid, n_patches, digest in zip(
            pixels.split(patches.tolist()), grids, patches, known, strict=True
        ):
            n_tokens = int(n_patches) // merge
            start = int(starts[offset])
            spans.append(MediaSpan(start, start + n_tokens, digest or media_digest(grid, item_pixels)))
            offset += n_tokens
    return PromptKey(ids=ids, spans=tuple(sorted(spans, key=lambda s: s.start)))


def media_digest(grid: torch.Tensor, pixels: torch.Tensor) -> bytes:
    """BLAKE2b (16 bytes) over one item's grid (t, h, w) and its patches' bytes (patches, dim)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(grid.to("cpu", torch.long).numpy().tobytes())
    h.update(pixels.detach().to("cpu").contiguous().view(torch.uint8).numpy())
    return h.digest()


def shared_prefix(cached: PromptKey, new: PromptKey) -> int:
    """Tokens at the start of ``new`` whose KV ``cached``'s KV holds (see the module doc): 0 to
    ``new.length - 1``."""
    limit = min(cached.length, new.length - 1)
    if limit <= 0:
        return 0
    differ = (cached.ids[:limit] != new.ids[:limit]).nonzero()
    n = int(differ[0]) if differ.numel() else limit
    theirs = {s.start: s for s in cached.spans}
    for span in new.spans:  # by start: the first item that is not shared ends the prefix
        if span.start >= n:
            break
        if theirs.get(span.start) != span or span.end > n:
            return span.start
    return n


@dataclass(slots=True, eq=False)
class PrefixEntry:
    """One cached prompt: its key and per-layer (keys, values), each (1, kv_heads, L, head_dim)."""

    key: PromptKey
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


@dataclass(slots=True)
class PrefixStats:
    """Totals since start: lookups that reused a prefix, lookups that did not, prompt tokens reused."""

    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0


class PrefixCache:
    """LRU entries of prompt KV; ``lookup`` finds the longest reusable prefix of a new prompt.

    ``min_tokens``: a shared prefix shorter than this is not worth a hit (every chat prompt shares its first
    few template tokens) and counts as a miss."""

    def __init__(self, min_tokens: int = 16) -> None:
        self.min_tokens = max(1, min_tokens)
        self.stats = PrefixStats()
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # by id(entry), oldest first
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, key: PromptKey) -> tuple[PrefixEntry, int] | None:
        """The entry sharing the longest prefix with ``key`` and that prefix's length in tokens (at least
        ``min_tokens``); None when there is none. Changes nothing (see :meth:`record`)."""
        best: tuple[PrefixEntry, int] | None = None
        for entry in self._entries.values():
            n = shared_prefix(entry.key, key)
            if n >= self.min_tokens and (best is None or n > best[1]):
                best = (entry, n)
        return best

    def record(self, hit: tuple[PrefixEntry, int] | None) -> None:
        """Count the outcome of a :meth:`find` whose prompt is now prefilled; a hit's entry becomes the
        most recently used."""
        if hit is None:
            self.stats.misses += 1
            return
        if id(hit[0]) in self._entries:
            self._entries.move_to_end(id(hit[0]))
        self.stats.hits += 1
        self.stats.reused_tokens += hit[1]

    def lookup(self, key: PromptKey) -> tuple[PrefixEntry, int] | None:
        """:meth:`find` and :meth:`record` in one."""
        hit = self.find(key)
        self.record(hit)
        return hit

    def insert(self, key: PromptKey, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> PrefixEntry:
        """Keep a prefilled prompt's KV (the tensors themselves, never copied). Entries whose whole prompt is
        a prefix of ``key`` are dropped: the new entry serves every lookup they could."""
        for old in list(self._entries.values()):
            if old.key.length <= key.length and _covers(key, old.key):
                self._drop(old)
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        entry = PrefixEntry(key=key, layers=layers, nbytes=nbytes)
        self._entries[id(entry)] = entry
        self.nbytes += nbytes
        return entry

    def evict(self, nbytes: int) -> int:
        """Drop least recently used entries until ``nbytes`` are freed or none is left; returns the bytes
        freed."""
        freed = 0
        while freed < nbytes and self._entries:
            _, entry = self._entries.popitem(last=False)
            self.nbytes -= entry.nbytes
            freed += entry.nbytes
        return freed

    def clear(self) -> None:
        self.evict(self.nbytes + 1)

    def _drop(self, entry: PrefixEntry) -> None:
        if self._entries.pop(id(entry), None) is not None:
            self.nbytes -= entry.nbytes


def _covers(longer: PromptKey, shorter: PromptKey) -> bool:
    """``shorter``'s whole prompt (ids and media) is the start of ``longer``'s."""
    if not torch.equal(longer.ids[: shorter.length], shorter.ids):
        return False
    theirs = {s.start: s for s in longer.spans}
    return all(theirs.get(s.start) == s for s in shorter.spans)
