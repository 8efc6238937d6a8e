"""KV layout ``slots`` (``KV_LAYOUT=slots``): each decoder layer's keys and values live in one preallocated
buffer (B, H, C, D) with spare columns, so a decode step writes its new column in place instead of re-
concatenating the whole cache (what ``transformers``' ``DynamicLayer`` does every step).

``GrowingLayer`` is a ``DynamicLayer`` whose ``keys`` / ``values`` are views of the first ``used`` columns
of its buffers. Assigning a tensor (what ``batch.merge``, ``batch.select`` and ``batch_select_indices`` do
on a join or a leave) copies it into a fresh buffer with spare columns; assigning back a view of the layer's
own buffer (what ``batch.restore`` does after a failed step) only resets the length, the columns past it
being free again. Views handed out earlier (snapshots, kept prefixes) are never written: writes go only past
the current length, and a rebuilt layer gets new buffers. The buffers grow by whole blocks of ``BLOCK``
columns, so a row holds at most ``BLOCK - 1`` unused columns.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

BLOCK = 128  # columns: buffers are allocated in multiples of this


def _capacity(columns: int) -> int:
    """Columns to allocate for ``columns`` used ones plus at least one free column to write into."""
    return (columns // BLOCK + 1) * BLOCK


class _Buffer:
    """One of a layer's two tensors: a (B, H, C, D) buffer and how many of its columns are in use."""

    __slots__ = ("data", "used")

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.used = 0

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[:, :, : self.used]

    def assign(self, tensor: torch.Tensor | None) -> None:
        """Take ``tensor`` (B, H, T, D) as the cached columns: a leading view of this buffer only sets the
        length; anything else is copied into a new buffer with room to grow."""
        if tensor is None:
            self.data, self.used = None, 0
        elif self._is_own_view(tensor):
            self.used = int(tensor.shape[2])
        else:
            b, h, t, d = tensor.shape
            self.data = tensor.new_empty((b, h, _capacity(t), d))
            self.data[:, :, :t].copy_(tensor)
            self.used = int(t)

    def _is_own_view(self, tensor: torch.Tensor) -> bool:
        data = self.data
        return (
            data is not None
            and tensor.data_ptr() == data.data_ptr()
            and tensor.stride() == data.stride()
            and tensor.shape[:2] == data.shape[:2]
            and tensor.shape[3] == data.shape[3]
            and tensor.shape[2] <= data.shape[2]
        )

    def append(self, states: torch.Tensor) -> torch.Tensor:
        """Write ``states`` (B, H, t, D) after the used columns (growing by whole blocks when full) and
        return the view of all used columns."""
        assert self.data is not None
        t = int(states.shape[2])
        if self.used + t > self.data.shape[2]:
            grown = self.data.new_empty((*self.data.shape[:2], _capacity(self.used + t), self.data.shape[3]))
            grown[:, :, : self.used].copy_(self.data[:, :, : self.used])
            self.data = grown
        self.data[:, :, self.used : self.used + t].copy_(states)
        self.used += t
        return self.data[:, :, : self.used]

    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class GrowingLayer(DynamicLayer):
    """A cache layer over preallocated buffers (see the module docstring); drop-in for ``DynamicLayer``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._k, self._v = _Buffer(), _Buffer()
        super().__init__(*args, **kwargs)

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._k.view()

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._k.assign(tensor)

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._v.view()

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._v.assign(tensor)

    def __copy__(self) -> GrowingLayer:
        """A layer sharing this one's buffers until either is assigned anew (``batch.take`` then selects
        rows, which rebuilds the copy's buffers)."""
        other = object.__new__(GrowingLayer)
        other.__dict__.update(self.__dict__)
        other._k, other._v = _Buffer(), _Buffer()
        other._k.data, other._k.used = self._k.data, self._k.used
        other._v.data, other._v.used = self._v.data, self._v.used
        return other

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the step's keys and values (B, H, t, D) in place; returns all cached keys and values."""
        if not self.is_initialized or self._k.data is None:
            self.device = key_states.device
            self.is_initialized = True
            self._k.assign(key_states[:, :, :0])
            self._v.assign(value_states[:, :, :0])
        return self._k.append(key_states), self._v.append(value_states)

    def allocated_bytes(self) -> int:
        """Bytes of both buffers, spare columns included."""
        return self._k.nbytes() + self._v.nbytes()


def grow_in_place(cache: Any) -> None:
    """Turn every ``DynamicLayer`` of ``cache`` into a ``GrowingLayer`` holding the same columns (one copy of
    each layer's keys and values); layers that already are stay as they are."""
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, GrowingLayer) or not isinstance(layer, DynamicLayer):
            continue
        grown = GrowingLayer()
        if layer.is_initialized and layer.keys is not None:
            grown.device, grown.is_initialized = layer.device, True
            grown.keys, grown.values = layer.keys, layer.values
        cache.layers[i] = grown
