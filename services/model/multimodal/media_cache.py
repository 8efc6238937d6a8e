"""The processed-media cache: what the processor made of one image or video, keyed by its raw input.

A chat resends its images with every turn. The prefix cache (``engine/prefix.py``) already spares the KV and
the vision encoder of a resent item, but each turn would still decode it, resize it, run the processor's
normalisation and patching, and hash its pixels for the prefix key. This cache keeps, per item, the
processor's output (pixel patches, grid (t, h, w)), the prompt text the processor puts in its place (image
pads; a video's timestamps and pads), its pixel digest and how many pixels it decoded to, under a BLAKE2b
key of its raw bytes (the base64 text as received) and every parameter that changes the result (the item's
resize band from ``detail`` and ``mm_processor_kwargs``, a video's sampling rate and frame cap, the
service's media limits and the processor's band). A hit skips all that work; the template and tokenizer
still run.

One cache serves exactly one processor (the engine's): the key names the request's parameters and the
processor's pixel band, but not the rest of the processor's configuration (patch size, normalisation,
temporal patch size, its chat template's placeholders), so a cache shared by two processors would hand one
the other's tensors. A new processor (a new engine) gets a new cache.

Bounded in bytes (``MEDIA_CACHE_BYTES``; the tensors' bytes), least recently used out first; an item larger
than the whole bound is not kept. Thread-safe: ``prepare`` runs in worker threads. Two threads that miss on
the same item both process it and the later ``put`` replaces the earlier entry (the results are equal).

Entries are shared, never copied: a one-item request's inputs hold the cached tensors themselves (a copy of
a 1024 x 1024 image's 25 MB of patches costs ~10-20 ms on a CPU). Nothing downstream writes into them:
``batch.media_tensors`` moves them with ``.to()`` (a new tensor, or the same one read-only) and the vision
encoder reads them; ``tests/model/test_media_cache.py`` checks an entry is unchanged after a generation.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from services.model.engine.base import MediaCacheStats

__all__ = ["MediaCache", "MediaCacheStats", "ProcessedMedia", "media_key"]


@dataclass(frozen=True, slots=True)
class ProcessedMedia:
    """One item as the processor made it, alone.

    ``tensors``: the processor's output for this item (``pixel_values`` (patches, C * 2 * 16 * 16) and
    ``image_grid_thw`` (1, 3), or the ``_videos`` pair); ``placeholder``: the prompt text that replaces the
    item's pad token; ``digest``: ``prefix.media_digest`` of its grid and pixels; ``pixels``: decoded pixels
    (width x height, times frames for a video) that count against the request's pixel budget;
    ``checked_pixels``: a video's pixels as its decoder checked them against what was left of that budget
    before and while decoding (``DecodedVideo.checked_pixels``; 0 for an image), so that a hit refuses
    exactly what a miss refuses; ``nbytes``: the tensors' bytes."""

    tensors: dict[str, torch.Tensor]
    placeholder: str
    digest: bytes
    pixels: int
    checked_pixels: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def media_key(kind: str, parameters: object, data: Iterable[str]) -> bytes:
    """The cache key of one item: BLAKE2b over its ``kind``, the ``repr`` of every processing parameter
    (a tuple of frozen dataclasses and numbers) and each of its base64 texts (a file's, or a frame list's,
    each length-prefixed so that no two lists collide)."""
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{kind}\0{parameters!r}\0".encode())
    for text in data:
        raw = text.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.digest()


class MediaCache:
    """LRU entries of ``ProcessedMedia`` by ``media_key``, at most ``max_bytes`` of tensors in all; for
    one processor only (see the module's docstring)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self.epoch = uuid.uuid4().hex  # names this cache's totals in its stats (a new engine: a new epoch)
        self._entries: OrderedDict[bytes, ProcessedMedia] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._nbytes = 0
        self._hits = self._misses = self._evictions = 0
        self._version = 0  # changes so far (lookups and puts): orders the stats' snapshots

    def get(self, key: bytes) -> ProcessedMedia | None:
        """The entry for ``key`` (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            self._version += 1
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry

    def put(self, key: bytes, entry: ProcessedMedia) -> None:
        """Keep ``entry`` (replacing one under the same key), evicting the least recently used entries
        until the bound holds; an entry larger than the bound is not kept."""
        size = entry.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            self._version += 1
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= old.nbytes
            while self._entries and self._nbytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._nbytes -= evicted.nbytes
                self._evictions += 1
            self._entries[key] = entry
            self._nbytes += size

    def stats(self) -> MediaCacheStats:
        """A consistent snapshot: totals since this cache was made (hits, misses, evictions), its size now
        (entries, bytes of tensors), its ``version`` (changes so far: of two snapshots of one cache, the
        one with the larger version is newer) and its ``epoch``. Threads that take snapshots may hand them
        on out of order; observers keep the newest (``MediaCacheStats.newer_than``)."""
        with self._lock:
            return MediaCacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                nbytes=self._nbytes,
                version=self._version,
                epoch=self.epoch,
            )
